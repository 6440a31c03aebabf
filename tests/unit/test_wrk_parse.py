from __future__ import annotations

import pytest

from clawdbot.devtools.bench import SocketErrors, parse_wrk_output, wrk_script

# Captured from `wrk -t1 -c1 -d3s --latency` against the mock upstream.
WRK_C1 = """\
Running 3s test @ http://127.0.0.1:37563/v1/chat/completions
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   125.71us   93.75us   4.05ms   99.13%
    Req/Sec     8.17k   258.74     8.36k    90.32%
  Latency Distribution
     50%  115.00us
     75%  119.00us
     90%  139.00us
     99%  209.00us
  25192 requests in 3.10s, 10.74MB read
Requests/sec:   8127.29
Transfer/sec:      3.46MB
"""

# Captured from `wrk -t2 -c8 -d2s --latency` with a script that injected 503s and
# dropped connections through the mock's `mock` body field.
WRK_ERRORS = """\
Running 2s test @ http://127.0.0.1:46503/v1/chat/completions
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.88ms  225.43us   4.23ms   83.56%
    Req/Sec     3.84k   190.02     4.24k    57.14%
  Latency Distribution
     50%  804.00us
     75%    0.88ms
     90%    1.23ms
     99%    1.64ms
  16051 requests in 2.10s, 6.28MB read
  Socket errors: connect 0, read 1926, write 0, timeout 0
  Non-2xx or 3xx responses: 4493
Requests/sec:   7643.09
Transfer/sec:      2.99MB"""


def test_clean_run() -> None:
    r = parse_wrk_output(WRK_C1)
    assert r.requests_per_sec == pytest.approx(8127.29)
    assert r.requests == 25192
    assert r.duration_s == pytest.approx(3.10)
    assert r.latency_avg_ms == pytest.approx(0.12571)
    assert r.latency_max_ms == pytest.approx(4.05)
    assert r.percentiles_ms == pytest.approx({"50": 0.115, "75": 0.119, "90": 0.139, "99": 0.209})
    assert r.p50_ms == pytest.approx(0.115)
    assert r.p99_ms == pytest.approx(0.209)
    assert r.non_2xx_3xx == 0
    assert r.socket_errors == SocketErrors()
    assert r.success_pct == pytest.approx(100.0)


def test_errors_and_mixed_units() -> None:
    r = parse_wrk_output(WRK_ERRORS)
    assert r.requests == 16051
    assert r.percentiles_ms["50"] == pytest.approx(0.804)
    assert r.percentiles_ms["75"] == pytest.approx(0.88)
    assert r.p99_ms == pytest.approx(1.64)
    assert r.non_2xx_3xx == 4493
    assert r.socket_errors == SocketErrors(connect=0, read=1926, write=0, timeout=0)
    # Requests lost to read errors never complete, so they count as failed attempts.
    assert r.success_pct == pytest.approx(100 * (16051 - 4493) / (16051 + 1926))


def test_seconds_and_timeouts() -> None:
    slow = (
        WRK_C1.replace("4.05ms", "2.00s")
        .replace("99%  209.00us", "99%    1.50s")
        .replace("25192 requests in 3.10s", "100 requests in 1.00m")
        .replace(
            "Requests/sec:   8127.29",
            "  Socket errors: connect 0, read 0, write 0, timeout 10\nRequests/sec:      1.67",
        )
    )
    r = parse_wrk_output(slow)
    assert r.latency_max_ms == pytest.approx(2000.0)
    assert r.p99_ms == pytest.approx(1500.0)
    assert r.duration_s == pytest.approx(60.0)
    assert r.socket_errors.timeout == 10
    assert r.success_pct == pytest.approx(90.0)


def test_rejects_non_wrk_output() -> None:
    with pytest.raises(ValueError):
        parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n")
    without_latency_flag = "\n".join(line for line in WRK_C1.splitlines() if "%" not in line or "Latency" in line)
    with pytest.raises(ValueError, match="--latency"):
        parse_wrk_output(without_latency_flag)


def test_wrk_script_quotes_body_and_key() -> None:
    script = wrk_script('{"a":"x\\"y"}', 'k"1')
    assert 'wrk.method = "POST"' in script
    assert 'wrk.body = "{\\"a\\":\\"x\\\\\\"y\\"}"' in script
    assert 'wrk.headers["Authorization"] = "Bearer k\\"1"' in script
    assert "Authorization" not in wrk_script("{}", None)
