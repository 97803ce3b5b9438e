"""Which validation library declares Portunus's request bodies: msgspec or pydantic v2.

    python -m bench.schema_lib            (prints a Markdown table; --json for raw numbers)

The same rule body (``POST /v1/rules``: client, listen port or range, up to 8
targets, caps) is declared in both libraries with the same bounds and unknown-key
refusal, then:

1. **validate**: 10,000 parsed JSON bodies (dicts, as the web and control
   processes hold them) converted to the typed object, best of 5 runs; plus
   10,000 invalid bodies (a port out of range in the last target), where the
   library has to build its error;
2. **import**: a fresh interpreter importing the library and declaring the
   body, minus a bare interpreter, median of 7;
3. **weight**: the installed size of the library and of what it pulls in.

Both libraries must already be installed in the interpreter that runs this.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

N = 10_000

_MSGSPEC_DECL = """
from typing import Annotated, Literal
import msgspec
from msgspec import Meta, Struct
Port = Annotated[int, Meta(ge=1, le=65535)]
Cap = Annotated[int, Meta(ge=1, le=10**12)]
class RateLimit(Struct, forbid_unknown_fields=True, omit_defaults=True):
    bandwidth_in_bps: Cap | None = None
    bandwidth_out_bps: Cap | None = None
    new_connections_per_sec: Cap | None = None
    concurrent_connections: Cap | None = None
class Target(Struct, forbid_unknown_fields=True):
    host: Annotated[str, Meta(min_length=1, max_length=255)]
    port: Port | None = None
    port_start: Port | None = None
    port_end: Port | None = None
    priority: Annotated[int, Meta(ge=1, le=1000)] = 1
    proxy_protocol: Literal["v1", "v2"] | None = None
class RuleBody(Struct, forbid_unknown_fields=True):
    targets: Annotated[list[Target], Meta(min_length=1, max_length=8)]
    client: str | int = "local"
    protocol: Literal["tcp", "udp"] = "tcp"
    listen_port: Port | None = None
    listen_port_start: Port | None = None
    listen_port_end: Port | None = None
    sni_pattern: Annotated[str, Meta(max_length=253)] | None = None
    proxy_protocol: Literal["v1", "v2"] | None = None
    prefer_ipv6: bool = False
    rate_limit: RateLimit | None = None
    health_check_interval_secs: Annotated[float, Meta(ge=0.1, le=3600)] = 5.0
def validate(doc):
    return msgspec.convert(doc, RuleBody, strict=True)
Error = msgspec.ValidationError
"""

_PYDANTIC_DECL = """
from typing import Annotated, Literal
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
Cap = Annotated[StrictInt, Field(ge=1, le=10**12)]
class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
class RateLimit(_M):
    bandwidth_in_bps: Cap | None = None
    bandwidth_out_bps: Cap | None = None
    new_connections_per_sec: Cap | None = None
    concurrent_connections: Cap | None = None
class Target(_M):
    host: Annotated[StrictStr, Field(min_length=1, max_length=255)]
    port: Port | None = None
    port_start: Port | None = None
    port_end: Port | None = None
    priority: Annotated[StrictInt, Field(ge=1, le=1000)] = 1
    proxy_protocol: Literal["v1", "v2"] | None = None
class RuleBody(_M):
    targets: Annotated[list[Target], Field(min_length=1, max_length=8)]
    client: StrictStr | StrictInt = "local"
    protocol: Literal["tcp", "udp"] = "tcp"
    listen_port: Port | None = None
    listen_port_start: Port | None = None
    listen_port_end: Port | None = None
    sni_pattern: Annotated[StrictStr, Field(max_length=253)] | None = None
    proxy_protocol: Literal["v1", "v2"] | None = None
    prefer_ipv6: StrictBool = False
    rate_limit: RateLimit | None = None
    health_check_interval_secs: Annotated[float, Field(ge=0.1, le=3600)] = 5.0
def validate(doc):
    return RuleBody.model_validate(doc)
Error = ValidationError
"""

DECLS = {"msgspec": _MSGSPEC_DECL, "pydantic": _PYDANTIC_DECL}


def bodies(valid: bool) -> list[dict[str, Any]]:
    """10,000 distinct bodies: single ports and ranges, 1-8 targets, caps on some."""
    out = []
    for i in range(N):
        n_targets = 1 + i % 8
        body: dict[str, Any] = {
            "client": f"edge-{i % 50}",
            "protocol": "udp" if i % 5 == 0 else "tcp",
            "targets": [
                {"host": f"10.0.{k}.{i % 250 + 1}", "port": 8000 + k, "priority": k + 1}
                for k in range(n_targets)
            ],
        }
        if i % 3 == 0:
            body["listen_port_start"], body["listen_port_end"] = 20000, 20009
        else:
            body["listen_port"] = 10000 + i % 50000
        if i % 4 == 0:
            body["rate_limit"] = {"bandwidth_in_bps": 10**6 + i, "concurrent_connections": 100}
        if not valid:
            body["targets"][-1]["port"] = 70000
        out.append(body)
    return out


def _time_validation(lib: str) -> dict[str, float]:
    ns: dict[str, Any] = {}
    # The declarations above, compiled without this module's postponed annotations.
    exec(compile(DECLS[lib], f"<{lib}>", "exec", dont_inherit=True), ns)
    validate, error = ns["validate"], ns["Error"]
    good, bad = bodies(True), bodies(False)
    best_ok = best_err = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for doc in good:
            validate(doc)
        best_ok = min(best_ok, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for doc in bad:
            try:
                validate(doc)
            except error:
                pass
            else:
                raise AssertionError(f"{lib} accepted port 70000")
        best_err = min(best_err, time.perf_counter() - t0)
    return {"valid_ms": best_ok * 1000, "invalid_ms": best_err * 1000}


def _import_ms(code: str) -> float:
    runs = []
    for _ in range(7):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs) * 1000


def _installed_kib(dists: list[str]) -> float:
    total = 0
    for name in dists:
        for f in md.distribution(name).files or ():
            p = Path(str(f.locate()))
            if p.is_file():
                total += p.stat().st_size
    return total / 1024


def _closure(name: str) -> list[str]:
    """The distribution and its required (non-extra) dependencies, recursively."""
    seen: list[str] = []
    todo = [name]
    while todo:
        dist = todo.pop()
        if dist.lower() in (s.lower() for s in seen):
            continue
        seen.append(dist)
        for req in md.requires(dist) or ():
            if "extra ==" in req:
                continue
            dep = req.split(";")[0].split("[")[0].strip()
            for sep in "<>=!~ (":
                dep = dep.split(sep)[0]
            todo.append(dep)
    return seen


def run() -> dict[str, Any]:
    bare = _import_ms("pass")
    out: dict[str, Any] = {"bodies": N}
    for lib in DECLS:
        deps = _closure(lib)
        out[lib] = {
            "version": md.version(lib),
            **_time_validation(lib),
            "import_ms": _import_ms(DECLS[lib]) - bare,
            "installed_kib": _installed_kib(deps),
            "distributions": deps,
        }
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"| library | {r['bodies']:,} valid bodies | {r['bodies']:,} invalid | import + declare "
        "| installed (with deps) |",
        "|---|---|---|---|---|",
    ]
    for lib in DECLS:
        x = r[lib]
        lines.append(
            f"| {lib} {x['version']} | {x['valid_ms']:.0f} ms | {x['invalid_ms']:.0f} ms "
            f"| {x['import_ms']:.0f} ms | {x['installed_kib'] / 1024:.1f} MiB "
            f"({', '.join(x['distributions'])}) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = run()
    print(json.dumps(result, indent=2) if args.json else markdown(result))


if __name__ == "__main__":
    main()
