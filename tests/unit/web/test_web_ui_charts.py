"""Server-drawn SVG charts and the push form's body: pure functions, no server."""

from __future__ import annotations

from portunus.web.ui import rule_form
from portunus.web.ui.charts import HEIGHT, MAX_POINTS, WIDTH, traffic_chart


def _series(n: int, each: int) -> dict[str, object]:
    return {
        "resolution": "minute",
        "from": 0,
        "to": n * 60,
        "series": [
            {"ts": i * 60, "bytes_in": each, "bytes_out": each // 2, "connections": 0}
            for i in range(n)
        ],
    }


def test_rates_are_bytes_per_second_and_fill_the_box() -> None:
    c = traffic_chart(_series(3, 6000))
    assert c.peak == 100.0  # 6000 B in a 60 s bucket
    points = [tuple(map(float, p.split(","))) for p in c.line_in.split()]
    assert points[0][0] == 0 and points[-1][0] == WIDTH
    assert all(y == HEIGHT - (HEIGHT - 8) for _, y in points)  # the peak sits at the top margin
    out = [float(p.split(",")[1]) for p in c.line_out.split()]
    assert all(
        abs(y - (HEIGHT - (HEIGHT - 8) / 2)) < 0.1 for y in out
    )  # half the rate, half the height


def test_a_day_of_minutes_is_downsampled_without_changing_the_rate() -> None:
    c = traffic_chart(_series(1440, 600))
    assert len(c.line_in.split()) <= MAX_POINTS
    assert c.peak == 10.0


def test_an_empty_series_draws_a_flat_line() -> None:
    c = traffic_chart({"resolution": "hour", "from": 0, "to": 0, "series": []})
    assert c.peak == 0 and c.line_in == f"0,{float(HEIGHT)}"


def test_form_to_body_like_the_cli() -> None:
    body = rule_form.rule_body(
        {
            "listen": "8080",
            "targets[0].host": "h",
            "targets[0].port": "80",
            "targets[2].host": "g",
            "targets[2].port": "81",
            "targets[2].priority": "2",
            "sni_pattern": "*.example.com",
            "prefer_ipv6": "1",
        }
    )
    assert body == {
        "client": "local",
        "protocol": "tcp",
        "listen_port": 8080,
        "targets": [{"host": "h", "port": 80}, {"host": "g", "port": 81, "priority": 2}],
        "sni_pattern": "*.example.com",
        "prefer_ipv6": True,
    }
    # not a number: kept as text, so the schema check words the error as the API does
    assert rule_form.rule_body({"listen": "80x"})["listen_port"] == "80x"
    assert rule_form.form_field("listen_port_start") == "listen"
    assert rule_form.form_field("targets[3].port_end") == "targets[3].port"
    assert rule_form.target_rows({"targets[4].host": "x"}) == 6
