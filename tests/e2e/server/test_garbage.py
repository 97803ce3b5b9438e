"""Garbage in, errors out, service on: malformed JSON, wrong shapes and oversize
requests on the control socket and on the HTTP API get a 4xx-class error (and, on
the socket, a closed connection where the protocol says so); neither the control
nor the web process restarts, and the server keeps serving."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from portunus.errors import classify
from tests.e2e.support import (
    LOOPBACK,
    MiB,
    ServerFactory,
    ServerProc,
    echo,
    echo_roundtrip,
    wait_for,
)

RPC_LIMIT = 1 * MiB  # docs/rpc.md
HTTP_LIMIT = 64 * 1024  # README: request bodies up to 64 KiB


@pytest.fixture(scope="module")
def srv(server_module: ServerFactory) -> Iterator[ServerProc]:
    s = server_module(shards=1)
    pids = {name: s.child(name).pid for name in ("control", "web")}  # type: ignore[union-attr]
    yield s
    # Whatever the module threw at it, nothing crashed or was respawned.
    assert {name: s.child(name).pid for name in ("control", "web")} == pids  # type: ignore[union-attr]
    assert s.events("control.rpc_crash") == [] and s.events("child.restarting") == []


class RawRpc:
    """A raw control-socket connection: send bytes, read reply lines, see EOF."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed without a reply (buffer {self.buf[:200]!r})")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg

    def closed(self) -> bool:
        """True when the server closed the connection (EOF with nothing pending)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(srv: ServerProc) -> Iterator[RawRpc]:
    conn = RawRpc(srv.socket_path)
    yield conn
    conn.close()


def _is_4xx(error: dict[str, Any]) -> bool:
    return 400 <= classify(str(error.get("code")))[0] < 500


def still_serving(srv: ServerProc, origin, ports) -> None:  # type: ignore[no-untyped-def]
    assert srv.rpc("health", token=None) == {"status": "ok"}
    assert srv.http("GET", "/v1/health", token=None).status == 200
    org = origin(echo)
    port = ports.port()
    rule = srv.rpc(
        "rules.push", {"listen_port": port, "targets": [{"host": LOOPBACK, "port": org.port}]}
    )
    assert rule["state"] == "active"
    assert echo_roundtrip(port)
    srv.rpc("rules.remove", {"id": rule["id"]})


# ------------------------------------------------------------------ control socket


@pytest.mark.parametrize(
    "line",
    [
        b"this is not json\n",
        b'{"id": 1, "method": "health"\n',  # truncated object
        b"[1, 2, 3]\n",
        b'"a string"\n',
        b"\xff\xfe\x00\x01 binary\n",
    ],
)
def test_socket_garbage_gets_bad_request_and_close(
    srv: ServerProc, raw: RawRpc, line: bytes
) -> None:
    raw.send(line)
    msg = raw.reply()
    assert msg["error"]["code"] == "bad_request", msg
    assert _is_4xx(msg["error"])
    assert raw.closed(), "the connection must be closed after a line that is not a JSON object"


def test_socket_bad_fields_get_an_error_and_the_connection_lives(
    srv: ServerProc, raw: RawRpc
) -> None:
    token = srv.token
    requests: list[dict[str, Any]] = [
        {"id": 1, "token": token, "method": 7},
        {"id": 2, "token": token, "method": ""},
        {"id": 3, "token": token, "method": "rules.list", "params": [1, 2]},
        {"id": 4, "token": token, "method": "no.such.method"},
        {
            "id": 5,
            "token": token,
            "method": "rules.push",
            "params": {"listen_port": "x", "targets": 5},
        },
        {"id": 6, "token": token, "method": "rules.get", "params": {"id": "seven"}},
        {"id": 7, "token": token, "method": "rules.stats", "params": {"id": -1}},
        {"id": 8, "token": 12345, "method": "rules.list"},
    ]
    for req in requests:
        raw.send(json.dumps(req).encode() + b"\n")
        msg = raw.reply()
        assert msg.get("id") == req["id"], msg
        assert "error" in msg and "result" not in msg, msg
        assert _is_4xx(msg["error"]), msg
    # Same connection, still usable.
    raw.send(json.dumps({"id": 99, "token": token, "method": "rules.list"}).encode() + b"\n")
    assert "rules" in raw.reply()["result"]


def test_socket_oversize_request_is_refused(srv: ServerProc, raw: RawRpc, origin, ports) -> None:  # type: ignore[no-untyped-def]
    big = (
        json.dumps(
            {
                "id": 1,
                "token": srv.token,
                "method": "rules.list",
                "params": {"pad": "x" * (RPC_LIMIT + 1024)},
            }
        ).encode()
        + b"\n"
    )
    try:
        raw.send(big)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may stop reading once the limit is passed; its reply is still queued
    msg = raw.reply()
    assert msg["error"]["code"] == "bad_request" and "exceeds" in msg["error"]["message"], msg
    assert raw.closed()
    still_serving(srv, origin, ports)


def test_socket_line_without_newline_then_close(srv: ServerProc, raw: RawRpc) -> None:
    """A last request without its newline is still answered (then EOF)."""
    raw.send(json.dumps({"id": 5, "method": "health"}).encode())
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.reply() == {"id": 5, "result": {"status": "ok"}}


# ------------------------------------------------------------------ HTTP


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "validation.json"),
        (b"", "validation.body"),
        (b"[]", None),
        (b'"text"', None),
        (b"\xff\xfe\xfd", "validation.json"),
        (b'{"listen_port": 1}', None),  # no targets
        (b'{"listen_port": "eighty", "targets": [{"host": "127.0.0.1", "port": 9}]}', None),
        (b'{"listen_port": NaN, "targets": []}', "validation.json"),
    ],
)
def test_http_malformed_rule_bodies_are_400(srv: ServerProc, body: bytes, code: str | None) -> None:
    before = srv.rules()
    resp = srv.http("POST", "/v1/rules", raw=body)
    assert resp.status == 400, resp
    err = resp.json()["error"]
    assert err["code"].startswith("validation"), err
    if code is not None:
        assert err["code"] == code, err
    assert err["message"]
    assert srv.rules() == before


def test_http_validation_names_the_field(srv: ServerProc) -> None:
    resp = srv.http(
        "POST", "/v1/rules", {"listen_port": 70000, "targets": [{"host": LOOPBACK, "port": 9}]}
    )
    assert resp.status == 400, resp
    err = resp.json()["error"]
    assert err["code"].startswith("validation.") and "listen_port" in json.dumps(err), err


def test_http_malformed_update_body_is_400(srv: ServerProc, ports) -> None:  # type: ignore[no-untyped-def]
    rule = srv.rpc(
        "rules.push", {"listen_port": ports.port(), "targets": [{"host": LOOPBACK, "port": 9}]}
    )
    try:
        resp = srv.http("PUT", f"/v1/rules/{rule['id']}", raw=b'{"rate_limit": ')
        assert resp.status == 400 and resp.error_code == "validation.json", resp
        resp = srv.http("PUT", f"/v1/rules/{rule['id']}", {"listen_port": 1})
        assert (
            resp.status == 400
            and resp.error_code is not None
            and resp.error_code.startswith("validation")
        ), resp
    finally:
        srv.rpc("rules.remove", {"id": rule["id"]})


def test_http_oversize_body_with_length_is_413(srv: ServerProc, origin, ports) -> None:  # type: ignore[no-untyped-def]
    body = b'{"pad": "' + b"x" * HTTP_LIMIT + b'"}'
    try:
        resp = srv.http("POST", "/v1/rules", raw=body, timeout=15)
    except (BrokenPipeError, ConnectionResetError) as exc:
        pytest.fail(f"the server cut the connection instead of answering 413: {exc!r}")
    assert resp.status == 413, resp
    assert resp.error_code == "validation.body_too_large", resp
    still_serving(srv, origin, ports)


def test_http_oversize_chunked_body_is_413(srv: ServerProc, origin, ports) -> None:  # type: ignore[no-untyped-def]
    def chunks() -> Iterator[bytes]:
        yield b'{"pad": "'
        for _ in range(HTTP_LIMIT // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    conn = http.client.HTTPConnection(LOOPBACK, srv.api_port, timeout=15)
    try:
        try:
            conn.request(
                "POST",
                "/v1/rules",
                body=chunks(),
                encode_chunked=True,
                headers={
                    "Authorization": f"Bearer {srv.token}",
                    "Content-Type": "application/json",
                },
            )
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-stream; the answer is still readable
        resp = conn.getresponse()
        status, payload = resp.status, json.loads(resp.read())
    finally:
        conn.close()
    assert status == 413, payload
    assert payload["error"]["code"] == "validation.body_too_large"
    still_serving(srv, origin, ports)


def test_http_garbage_request_line_keeps_server_up(srv: ServerProc, origin, ports) -> None:  # type: ignore[no-untyped-def]
    with socket.create_connection((LOOPBACK, srv.api_port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n")
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert data == b"" or data.startswith(b"HTTP/1.1 4"), data[:200]
    still_serving(srv, origin, ports)


def _read_all(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def test_http_unfinished_oversized_headers_get_400_at_once(srv: ServerProc, origin, ports) -> None:  # type: ignore[no-untyped-def]
    with socket.create_connection((LOOPBACK, srv.api_port), timeout=5) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (17 * 1024))
        data = _read_all(s)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), data[:200]
    assert json.loads(body)["error"]["code"] == "bad_request"
    still_serving(srv, origin, ports)


def test_http_connections_over_the_cap_push_out_the_oldest_idle_one(
    srv: ServerProc, origin, ports
) -> None:  # type: ignore[no-untyped-def]
    """At the cap (256) a new connection is served; the connection that has waited
    longest for a request is closed with 503 ``unavailable`` to make room for it."""
    held = []
    for _ in range(256):
        held.append(socket.create_connection((LOOPBACK, srv.api_port), timeout=5))
        time.sleep(0.001)  # an order the server sees: held[0] is the oldest
    try:
        with socket.create_connection((LOOPBACK, srv.api_port), timeout=5) as extra:
            extra.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert _read_all(extra).startswith(b"HTTP/1.1 200"), "the newcomer is served"
        data = _read_all(held[0])
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), data[:200]
        assert json.loads(body)["error"]["code"] == "unavailable"
    finally:
        for s in held:
            s.close()
    # The web process sees the closes a moment later; then it serves again.
    wait_for(
        lambda: srv.http("GET", "/v1/health", token=None).status == 200,
        10,
        what="the API after the cap",
    )
    still_serving(srv, origin, ports)
