"""clients.list paging, filters and one client, end to end: the real server, its CLI
and /v1, and a real ``portunus-client`` (which advertises ``quiet_link``)."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.edge.clients import ClientFactory
from tests.e2e.edge.test_edge_server import mint, start_edge
from tests.e2e.features.helpers import ServerFactory


def test_pages_filters_and_one_client(server: ServerFactory, clients: ClientFactory, tmp_path: Path) -> None:
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
    assert status == 200 and [c["client_id"] for c in up["clients"]] == [live.client_id] and up["total"] == 1
    assert "quiet_link" in up["clients"][0]["capabilities"]
    off = srv.cli_json("list-clients", "--disconnected", "--all", "--limit", "1")
    assert sorted(c["client_id"] for c in off["clients"]) == sorted(minted) and off["next_cursor"] is None

    # The CLI: one page with a hint on stderr, or --all.
    res = srv.cli("list-clients", "--limit", "2")
    assert res.code == 0 and "2 of 6 shown" in res.stderr and "--cursor" in res.stderr, res
    assert [c["client_id"] for c in srv.cli_json("list-clients", "--all", "--limit", "4")["clients"]] == everyone

    # One client by name or id.
    status, one = srv.http("GET", "/v1/clients/live-1")
    assert status == 200 and one["client_id"] == live.client_id and one["connected"] is True
    status, same = srv.http("GET", f"/v1/clients/{live.client_id}")
    assert status == 200 and same["client_name"] == "live-1"
    status, err = srv.http("GET", "/v1/clients/nobody")
    assert status == 404 and err["error"]["code"] == "client_not_found", err
