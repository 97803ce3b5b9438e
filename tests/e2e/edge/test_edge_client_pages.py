"""clients.list paging, filters and one client, end to end: the real server, its CLI
and /v1, and a real ``portunus-client`` (which advertises ``quiet_link``)."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.edge.clients import ClientFactory
from tests.e2e.edge.test_edge_server import mint, start_edge
from tests.e2e.features.helpers import ServerFactory


def test_pages_filters_and_one_client(
    server: ServerFactory, clients: ClientFactory, tmp_path: Path
) -> None:
    srv = server()
    live = start_edge(srv, clients, tmp_path, "live-1")
    minted = [mint(srv, f"off-{c}")["client_id"] for c in "abcd"]
    everyone = ["local", *sorted([live.client_id, *minted])]

    # HTTP: pages follow next_cursor; total counts every match.
    status, first = srv.http("GET", "/v1/clients?limit=2")
    assert status == 200, first
    assert [c["client_id"] for c in first["clients"]] == everyone[:2]
    assert first["total"] == 6 and first["next_cursor"]
    seen, cursor = [c["client_id"] for c in first["clients"]], first["next_cursor"]
    while cursor:
        status, page = srv.http("GET", f"/v1/clients?limit=2&cursor={cursor}")
        assert status == 200, page
        seen += [c["client_id"] for c in page["clients"]]
        cursor = page["next_cursor"]
    assert seen == everyone

    # An edited cursor is 400 validation.cursor over HTTP and exit 2 in the CLI.
    bad = first["next_cursor"][:-3] + ("AAA" if not first["next_cursor"].endswith("AAA") else "BBB")
    status, err = srv.http("GET", f"/v1/clients?cursor={bad}")
    assert status == 400 and err["error"]["code"] == "validation.cursor", err
    res = srv.cli("list-clients", "--cursor", bad)
    assert res.code == 2 and "validation.cursor" in res.stderr, res
    status, err = srv.http("GET", "/v1/clients?limit=1001")
    assert status == 400, err

    # Filters: the connected edge (its hello advertised quiet_link), a name prefix.
    status, up = srv.http("GET", "/v1/clients?connected=true&name_prefix=live-")
    assert (
        status == 200
        and [c["client_id"] for c in up["clients"]] == [live.client_id]
        and up["total"] == 1
    )
    assert "quiet_link" in up["clients"][0]["capabilities"]
    off = srv.cli_json("list-clients", "--disconnected", "--all", "--limit", "1")
    assert (
        sorted(c["client_id"] for c in off["clients"]) == sorted(minted)
        and off["next_cursor"] is None
    )

    # The CLI: one page with a hint on stderr, or --all.
    res = srv.cli("list-clients", "--limit", "2")
    assert res.code == 0 and "2 of 6 shown" in res.stderr and "--cursor" in res.stderr, res
    assert [
        c["client_id"] for c in srv.cli_json("list-clients", "--all", "--limit", "4")["clients"]
    ] == everyone

    # One client by name or id.
    status, one = srv.http("GET", "/v1/clients/live-1")
    assert status == 200 and one["client_id"] == live.client_id and one["connected"] is True
    status, same = srv.http("GET", f"/v1/clients/{live.client_id}")
    assert status == 200 and same["client_name"] == "live-1"
    status, err = srv.http("GET", "/v1/clients/nobody")
    assert status == 404 and err["error"]["code"] == "client_not_found", err


def test_web_ui_pages_the_clients(server: ServerFactory) -> None:
    """The Web UI over the real control: the clients page follows the real cursor with
    its filters, the dashboard counts from ``total``, a client's page is clients.get."""
    import html
    import re

    srv = server()
    ids = sorted(mint(srv, f"off-{i:03d}")["client_id"] for i in range(120))

    def page(path: str) -> str:
        answer = srv.http("GET", path)
        assert answer.status == 200, (path, answer)
        return answer.body.decode()

    def next_link(text: str) -> str | None:
        found = re.search(r'<a href="([^"]+)">Next page →</a>', text)
        return html.unescape(found.group(1)) if found else None

    first = page("/clients")
    assert "121 clients" in first and first.count('<a href="/clients/') == 100
    link = next_link(first)
    assert link is not None and link.startswith("/clients?cursor=")
    second = page(link)
    assert f'<a href="/clients/{ids[-1]}">' in second and next_link(second) is None

    # filters ride along with the cursor; local is connected, so every match is an edge
    offline = page("/clients?connected=false&name_prefix=off-")
    assert "120 clients match the filters" in offline and ">local</a>" not in offline
    link = next_link(offline)
    assert link is not None and "connected=false&name_prefix=off-&cursor=" in link
    last = page(link)
    assert last.count('<a href="/clients/') == 20 and f'<a href="/clients/{ids[-1]}">' in last
    assert page("/clients?name_prefix=off-0").count('<a href="/clients/') == 100  # off-000..099

    dash = page("/")
    assert "0 / 120" in dash and "120 clients offline" in dash and "and 110 more" in dash
    assert "off-050" in page("/clients/off-050")
    missing = srv.http("GET", "/clients/nobody")
    assert missing.status == 404 and b"client_not_found" in missing.body
