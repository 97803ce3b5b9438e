"""Jinja2 templates and the versioned static assets of the Web UI.

Assets are small hand-written files kept in memory; their URL carries a hash of
their content (``/static/<version>/app.css``), so they are served with a year of
``immutable`` caching and a new release (or any edited file) gets a new URL.
Templates autoescape everything: values from the control process (rule targets,
client names, audit targets) are operator input and never trusted as HTML.
"""

from __future__ import annotations

import hashlib
import mimetypes
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from portunus import __version__

WEB = Path(__file__).resolve().parent.parent
STATIC_DIR = WEB / "static"
TEMPLATE_DIR = WEB / "templates"
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def _load_assets() -> tuple[str, dict[str, tuple[bytes, str]]]:
    files: dict[str, tuple[bytes, str]] = {}
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(STATIC_DIR.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            data = path.read_bytes()
            digest.update(path.name.encode() + b"\0" + data)
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype.endswith("javascript"):
                ctype += "; charset=utf-8"
            files[path.name] = (data, ctype)
    return f"{__version__}-{digest.hexdigest()[:10]}", files


ASSET_VERSION, ASSETS = _load_assets()
ASSET_CACHE = "public, max-age=31536000, immutable"


def asset(name: str) -> str:
    return f"/static/{ASSET_VERSION}/{name}"


async def static_file(request: Request) -> Response:
    """Only the current version is served: an old URL is a 404, never stale content."""
    entry = ASSETS.get(request.path_params["name"])
    if entry is None or request.path_params["version"] != ASSET_VERSION:
        return Response("not found\n", status_code=404, media_type="text/plain")
    data, ctype = entry
    etag = f'"{ASSET_VERSION}"'
    headers = {"Cache-Control": ASSET_CACHE, "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=ctype, headers=headers)


def human_bytes(value: Any, suffix: str = "") -> str:
    try:
        n = float(value)
    except (TypeError, ValueError):
        return "–"
    i = 0
    while abs(n) >= 1024 and i < len(_UNITS) - 1:
        n /= 1024
        i += 1
    return (f"{n:.0f}" if i == 0 else f"{n:.1f}") + f" {_UNITS[i]}{suffix}"


def human_rate(value: Any) -> str:
    return human_bytes(value, "/s")


def when(value: Any) -> str:
    """An RFC 3339 string or Unix seconds as ``YYYY-MM-DD HH:MM:SS`` UTC."""
    if value in (None, ""):
        return "–"
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(value).replace("T", " ").split(".")[0].rstrip("Z")


def ago(value: Any) -> str:
    if not value:
        return "–"
    try:
        then = datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return str(value)
    secs = max(0, int(time.time() - then))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit} ago"
    return f"{secs}s ago"


ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters.update(bytes=human_bytes, rate=human_rate, when=when, ago=ago)
ENV.globals.update(asset=asset, version=__version__)


def render(
    request: Request,
    template: str,
    status: int = 200,
    *,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    """A full page; pages are personal (they show the caller's view), so never cached."""
    context.setdefault("ident", getattr(request.state, "ident", None))
    context.setdefault("path", request.url.path)
    html = ENV.get_template(template).render(request=request, **context)
    hdrs = {"Cache-Control": "no-store"}
    hdrs.update(headers or {})
    return HTMLResponse(html, status_code=status, headers=hdrs)


routes = [Route("/static/{version}/{name}", static_file, methods=["GET", "HEAD"])]
