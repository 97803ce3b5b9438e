"""nginx is an optional peer: without it (or its stream module) the tests that need it
skip, saying what is missing and how to install it, rather than fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.features import nginx_origin


def test_no_binary_skips_with_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nginx_origin.shutil, "which", lambda name: None)
    monkeypatch.setattr(nginx_origin.os, "access", lambda path, mode: False)
    with pytest.raises(pytest.skip.Exception, match="nginx is not installed.*libnginx-mod-stream"):
        nginx_origin.require_nginx()


def test_no_stream_module_skips_naming_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(nginx_origin.shutil, "which", lambda name: "/usr/sbin/nginx")
    monkeypatch.setattr(nginx_origin, "NGINX_STREAM_MODULE", tmp_path / "absent.so")
    with pytest.raises(
        pytest.skip.Exception, match=f"stream module missing at {tmp_path}/absent.so"
    ):
        nginx_origin.require_nginx()


def test_origin_without_nginx_skips_instead_of_failing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A test that builds the origin directly (no fixture) skips too."""
    monkeypatch.setattr(nginx_origin.shutil, "which", lambda name: None)
    monkeypatch.setattr(nginx_origin.os, "access", lambda path, mode: False)
    with pytest.raises(pytest.skip.Exception):
        nginx_origin.NginxProxyOrigin(tmp_path, [1], [2])


def test_present_nginx_is_returned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    module = tmp_path / "ngx_stream_module.so"
    module.write_bytes(b"")
    monkeypatch.setattr(nginx_origin.shutil, "which", lambda name: "/opt/nginx")
    monkeypatch.setattr(nginx_origin, "NGINX_STREAM_MODULE", module)
    assert nginx_origin.require_nginx() == "/opt/nginx"
