"""`make bench`'s virtual-key rows: the key made through the admin API, and the static key
vs virtual key comparison in the report."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from clawdbot.devtools.bench import (
    VIRTUAL_KEY_SPEC,
    BenchError,
    Row,
    WrkResult,
    create_virtual_key,
    format_key_comparison,
    key_comparison,
)


def row(target: str, conns: int, rps: float, p50: float) -> Row:
    result = WrkResult(
        requests_per_sec=rps,
        requests=int(rps * 3),
        duration_s=3.0,
        latency_avg_ms=p50,
        latency_max_ms=p50 * 4,
        percentiles_ms={"50": p50, "99": p50 * 3},
    )
    return Row(target, conns, 1 if conns == 1 else 2, result, "")


def test_static_and_virtual_keys_side_by_side() -> None:
    rows = [
        row("direct", 1, 5000.0, 0.2),
        row("direct", 64, 20000.0, 3.0),
        row("gateway", 1, 1000.0, 1.0),
        row("gateway", 64, 4000.0, 15.0),
        row("virtual-key", 1, 950.0, 1.05),
        row("virtual-key", 64, 3800.0, 16.0),
        row("cache-hit", 1, 1500.0, 0.7),
    ]
    comparison = key_comparison(rows)
    assert comparison == {
        "c1": {
            "static": {"requests_per_sec": 1000.0, "added_p50_ms": 0.8},
            "virtual": {"requests_per_sec": 950.0, "added_p50_ms": 0.85},
            "requests_per_sec_ratio": 0.95,
        },
        "c64": {
            "static": {"requests_per_sec": 4000.0, "added_p50_ms": 12.0},
            "virtual": {"requests_per_sec": 3800.0, "added_p50_ms": 13.0},
            "requests_per_sec_ratio": 0.95,
        },
    }
    table = format_key_comparison(comparison).splitlines()
    assert table[0].startswith("static key vs virtual key")
    assert "virtual req/s" in table[1] and "virtual +p50 ms" in table[1]
    assert table[3].split() == ["1", "1000.0", "950.0", "0.950", "+0.800", "+0.850"]
    assert table[4].split() == ["64", "4000.0", "3800.0", "0.950", "+12.000", "+13.000"]


def test_no_comparison_without_both_keys() -> None:
    assert key_comparison([row("direct", 1, 5000.0, 0.2), row("gateway", 1, 1000.0, 1.0)]) == {}
    # Without a direct run the throughputs still compare; the added p50 is unknown.
    (figures,) = key_comparison([row("gateway", 8, 100.0, 1.0), row("virtual-key", 8, 50.0, 2.0)]).values()
    assert figures["requests_per_sec_ratio"] == 0.5 and figures["virtual"]["added_p50_ms"] is None


class _AdminApi(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None, dict[str, Any]]] = []
    status = 201

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        answer = {"id": "key_1", "key": "sk-cb-secret"} if self.status == 201 else {"error": {"message": "no"}}
        raw = json.dumps(answer).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *_args: Any) -> None:
        return None


@pytest.fixture
def admin_api() -> Iterator[tuple[str, type[_AdminApi]]]:
    handler = type("Handler", (_AdminApi,), {"seen": [], "status": 201})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_the_virtual_key_is_made_with_the_admin_key(admin_api: tuple[str, type[_AdminApi]]) -> None:
    url, handler = admin_api
    assert create_virtual_key(url + "/", "cb-admin") == "sk-cb-secret"
    assert handler.seen == [("/v1/admin/keys", "Bearer cb-admin", VIRTUAL_KEY_SPEC)]


def test_a_refused_key_stops_the_bench(admin_api: tuple[str, type[_AdminApi]]) -> None:
    url, handler = admin_api
    handler.status = 403
    with pytest.raises(BenchError, match="HTTP 403"):
        create_virtual_key(url, "cb-user")
