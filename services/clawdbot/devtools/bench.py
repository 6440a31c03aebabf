"""Throughput/latency benchmark driver behind ``make bench``.

Drives ``wrk`` at the mock upstream directly (the baseline) and, unless
``--skip-gateway``, at the whole mesh started by ``clawdbot.runner`` in front
of that same mock, then prints a table plus the latency the gateway adds and
writes everything to ``.clawdbot/bench/latest.json``.

Through the gateway the same load runs with the runner's static key ("gateway"),
with a virtual key made for the bench through ``POST /v1/admin/keys``
("virtual-key", unless ``--skip-virtual-key``: issue 16 wants it within 10% of the
static key's figure), and as cache hits; the report puts the two keys side by side.

Targets are reported, never asserted: the exit status is non-zero only when a
tool (wrk, the mock, the runner) fails to start or run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import clawdbot

BENCH_MODEL = "mock-1"
REQUEST_BODY: dict[str, Any] = {
    "model": BENCH_MODEL,
    "messages": [{"role": "user", "content": "hi"}],
}
# Deterministic, so the gateway caches it: after the first request, every one is a hit.
CACHED_BODY: dict[str, Any] = {**REQUEST_BODY, "temperature": 0}
# The same question in Anthropic's Messages API and OpenAI's Responses API: translated to
# the one internal request and back (the Responses row stores each response, the default).
MESSAGES_BODY: dict[str, Any] = {**REQUEST_BODY, "max_tokens": 64}
RESPONSES_BODY: dict[str, Any] = {"model": BENCH_MODEL, "input": "hi"}
# Rows whose added latency the report gives beside the Chat Completions row's.
DIALECT_ROWS = ("messages", "responses")
# The mock runs without --api-key and ignores this; it only keeps the request shape
# identical to what goes through the gateway.
DIRECT_API_KEY = "bench-direct"
MOCK_READY_TIMEOUT_S = 20.0
RUNNER_READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 15.0
WRK_TIMEOUT = "10s"
WRK_OVERRUN_S = 60.0
RESULTS_PATH = Path(".clawdbot") / "bench" / "latest.json"
# The virtual key the bench makes: held to the bench's model, so that its allowlist is
# checked on every request as a real app's key would be.
VIRTUAL_KEY_SPEC: dict[str, Any] = {"name": "bench", "models": ["mock-*"], "metadata": {"made_by": "make bench"}}
LOG_DIR = Path(".clawdbot") / "bench" / "logs"

_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


class BenchError(Exception):
    """A tool failed to start or run; the bench exits non-zero."""


# -- wrk output parsing -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class SocketErrors:
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests_per_sec: float
    requests: int
    duration_s: float
    latency_avg_ms: float
    latency_max_ms: float
    percentiles_ms: dict[str, float]
    non_2xx_3xx: int = 0
    socket_errors: SocketErrors = field(default_factory=SocketErrors)

    @property
    def p50_ms(self) -> float | None:
        return self.percentiles_ms.get("50")

    @property
    def p99_ms(self) -> float | None:
        return self.percentiles_ms.get("99")

    @property
    def success_pct(self) -> float:
        # wrk counts a timed-out request both as completed and as a timeout error, and
        # never counts requests lost to read/write errors as completed; so timeouts are
        # subtracted from the successes and read/write errors added to the attempts.
        # Connect errors are attempts to open sockets, not requests, so they are left out.
        errs = self.socket_errors
        attempts = self.requests + errs.read + errs.write
        if attempts <= 0:
            return 0.0
        ok = max(0, self.requests - self.non_2xx_3xx - errs.timeout)
        return 100.0 * ok / attempts


def _to_ms(value: str, unit: str) -> float:
    # wrk prints at most 2 decimals; rounding drops float noise such as 0.20700000000000002.
    return round(float(value) * _TIME_UNITS_MS[unit], 6)


def parse_wrk_output(text: str) -> WrkResult:
    """Parse the human-readable output of ``wrk --latency``."""
    time_re = r"([\d.]+)(us|ms|s|m|h)"
    latency = re.search(rf"^\s*Latency\s+{time_re}\s+{time_re}\s+{time_re}", text, re.MULTILINE)
    total = re.search(rf"^\s*(\d+) requests in {time_re}", text, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    if latency is None or total is None or rps is None:
        raise ValueError("not wrk output (missing Latency, 'requests in' or Requests/sec)")
    percentiles = {
        m.group(1): _to_ms(m.group(2), m.group(3))
        for m in re.finditer(rf"^\s*(\d+(?:\.\d+)?)%\s+{time_re}\s*$", text, re.MULTILINE)
    }
    if not percentiles:
        raise ValueError("no latency distribution in wrk output (was --latency passed?)")
    errors = SocketErrors()
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock is not None:
        errors = SocketErrors(*(int(g) for g in sock.groups()))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests_per_sec=float(rps.group(1)),
        requests=int(total.group(1)),
        duration_s=_to_ms(total.group(2), total.group(3)) / 1000.0,
        latency_avg_ms=_to_ms(latency.group(1), latency.group(2)),
        latency_max_ms=_to_ms(latency.group(5), latency.group(6)),
        percentiles_ms=percentiles,
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=errors,
    )


# -- wrk invocation ---------------------------------------------------------


def _lua_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def wrk_script(body: str, api_key: str | None) -> str:
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = {_lua_string(body)}",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    if api_key:
        lines.append(f'wrk.headers["Authorization"] = {_lua_string("Bearer " + api_key)}')
    return "\n".join(lines) + "\n"


def run_wrk(url: str, connections: int, duration_s: float, script: Path) -> tuple[WrkResult, str]:
    threads = 1 if connections == 1 else 2
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        WRK_TIMEOUT,
        "--latency",
        "-s",
        str(script),
        url,
    ]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=duration_s + WRK_OVERRUN_S,
            check=False,
        )
    except FileNotFoundError as exc:
        raise BenchError("wrk not found; install it (apt-get install -y wrk)") from exc
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {' '.join(cmd)}") from exc
    if proc.returncode != 0:
        raise BenchError(f"wrk exited {proc.returncode}: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    try:
        return parse_wrk_output(proc.stdout), proc.stdout
    except ValueError as exc:
        raise BenchError(f"cannot parse wrk output ({exc}):\n{proc.stdout}") from exc


# -- managed subprocesses ---------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Children must import the same clawdbot tree as this process, wherever cwd is.
    services_root = str(Path(clawdbot.__file__).resolve().parent.parent)
    parts = [services_root, *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(content[-lines:])


@dataclass
class Managed:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    ready: dict[str, Any]


def wait_ready_file(
    name: str, proc: subprocess.Popen[bytes], path: Path, timeout_s: float, log_path: Path
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                # A writer that isn't atomic may be caught mid-write; look again shortly.
                data = None
            if isinstance(data, dict):
                return data
        code = proc.poll()
        if code is not None:
            raise BenchError(
                f"{name} exited with status {code} before becoming ready; log {log_path}:\n{_log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise BenchError(
                f"{name} not ready after {timeout_s:.0f}s (no {path}); log {log_path}:\n{_log_tail(log_path)}"
            )
        time.sleep(0.1)


def stop_process(name: str, proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM, wait, then SIGKILL the whole process group (it has its own session)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            print(f"bench: {name} ignored SIGTERM for {grace_s:.0f}s; killing", file=sys.stderr)
    # The child leads its own process group, so anything it spawned and failed to reap
    # (e.g. a mesh member) is still reachable through the group after it exits.
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        pass
    else:
        if proc.poll() is not None:
            print(f"bench: {name} left processes behind; killing them", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@contextlib.contextmanager
def managed_process(name: str, cmd: list[str], ready_file: Path, timeout_s: float) -> Iterator[Managed]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}.log"
    log: IO[bytes] = log_path.open("wb")
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            start_new_session=True,
        )
    except OSError as exc:
        log.close()
        raise BenchError(f"cannot start {name}: {exc}") from exc
    try:
        ready = wait_ready_file(name, proc, ready_file, timeout_s, log_path)
        yield Managed(name=name, proc=proc, log_path=log_path, ready=ready)
    finally:
        stop_process(name, proc)
        log.close()


def preflight(url: str, body: bytes, api_key: str | None) -> str | None:
    """One request before measuring, so a broken target is explained, not just counted."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:500].decode(errors="replace")
        return f"HTTP {exc.code}: {detail}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def create_virtual_key(base_url: str, admin_key: str, spec: dict[str, Any] = VIRTUAL_KEY_SPEC) -> str:
    """A new virtual key's secret, made with the admin key through the admin API."""
    req = urllib.request.Request(
        base_url.rstrip("/") + "/v1/admin/keys",
        data=json.dumps(spec).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {admin_key}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            created = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:500].decode(errors="replace")
        raise BenchError(f"cannot create the bench's virtual key: HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise BenchError(f"cannot create the bench's virtual key: {type(exc).__name__}: {exc}") from exc
    secret = created.get("key") if isinstance(created, dict) else None
    if not isinstance(secret, str) or not secret:
        raise BenchError(f"the admin API created no key: {created}")
    return secret


# -- orchestration ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    target: str
    connections: int
    threads: int
    result: WrkResult
    wrk_output: str

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {
            "target": self.target,
            "connections": self.connections,
            "threads": self.threads,
            "requests_per_sec": r.requests_per_sec,
            "success_pct": round(r.success_pct, 3),
            "p50_ms": r.p50_ms,
            "p75_ms": r.percentiles_ms.get("75"),
            "p90_ms": r.percentiles_ms.get("90"),
            "p99_ms": r.p99_ms,
            "latency_avg_ms": r.latency_avg_ms,
            "latency_max_ms": r.latency_max_ms,
            "requests": r.requests,
            "duration_s": r.duration_s,
            "non_2xx_3xx": r.non_2xx_3xx,
            "socket_errors": asdict(r.socket_errors),
            "wrk_output": self.wrk_output,
        }


def bench_target(
    target: str,
    url: str,
    api_key: str | None,
    connections: Sequence[int],
    duration_s: float,
    warmup_s: float,
    workdir: Path,
    request_body: dict[str, Any] = REQUEST_BODY,
) -> list[Row]:
    body = json.dumps(request_body, separators=(",", ":"))
    problem = preflight(url, body.encode(), api_key)
    if problem is not None:
        print(f"bench: warning: {target} preflight failed: {problem}", file=sys.stderr)
    script = workdir / f"{target}.lua"
    script.write_text(wrk_script(body, api_key))
    if warmup_s > 0:
        run_wrk(url, max(connections), warmup_s, script)
    rows: list[Row] = []
    for conns in connections:
        print(f"bench: {target} c={conns} for {duration_s:g}s ...", file=sys.stderr, flush=True)
        result, raw = run_wrk(url, conns, duration_s, script)
        rows.append(Row(target, conns, 1 if conns == 1 else 2, result, raw))
    return rows


def gateway_config(mock_port: int, workdir: Path) -> str:
    return (
        f"cache: {{object_dir: {workdir / 'objects'}}}\n"
        "jobs: {enabled: false}\n"
        "orchestrator: {enabled: false}\n"
        "models:\n"
        f"  - name: {BENCH_MODEL}\n"
        "    task: chat\n"
        "    connector: openai\n"
        f"    base_url: http://127.0.0.1:{mock_port}/v1\n"
    )


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(rows: Sequence[Row]) -> str:
    header = f"{'target':<12} {'conns':>6} {'req/s':>11} {'success%':>9} {'p50 ms':>9} {'p99 ms':>9}"
    out = [header, "-" * len(header)]
    for row in rows:
        r = row.result
        out.append(
            f"{row.target:<12} {row.connections:>6} {r.requests_per_sec:>11.1f} "
            f"{r.success_pct:>9.2f} {_fmt(r.p50_ms, '.3f'):>9} {_fmt(r.p99_ms, '.3f'):>9}"
        )
    return "\n".join(out)


def added_latency(rows: Sequence[Row]) -> dict[str, Any]:
    """Gateway minus direct: p50 at the lowest and p99 at the highest connection count."""
    by_key = {(row.target, row.connections): row.result for row in rows}
    conns = sorted({row.connections for row in rows})
    out: dict[str, Any] = {}
    if not conns:
        return out
    for label, pct, c in (("p50", "50", conns[0]), ("p99", "99", conns[-1])):
        gw, direct = by_key.get(("gateway", c)), by_key.get(("direct", c))
        if gw is None or direct is None:
            continue
        gw_v, direct_v = gw.percentiles_ms.get(pct), direct.percentiles_ms.get(pct)
        if gw_v is not None and direct_v is not None:
            out[f"{label}_c{c}_ms"] = round(gw_v - direct_v, 3)
    # The other dialects' p50 at the lowest connection count, beside Chat Completions'.
    direct = by_key.get(("direct", conns[0]))
    direct_p50 = direct.percentiles_ms.get("50") if direct else None
    for target in DIALECT_ROWS:
        row = by_key.get((target, conns[0]))
        p50 = row.percentiles_ms.get("50") if row else None
        if p50 is not None and direct_p50 is not None:
            out[f"{target}_p50_c{conns[0]}_ms"] = round(p50 - direct_p50, 3)
    return out


def key_comparison(rows: Sequence[Row]) -> dict[str, Any]:
    """The static key ("gateway") against the virtual key, per connection count: req/s,
    the p50 each adds over the direct run, and virtual / static throughput."""
    by_key = {(row.target, row.connections): row.result for row in rows}
    out: dict[str, Any] = {}
    for conns in sorted({row.connections for row in rows}):
        static, virtual = by_key.get(("gateway", conns)), by_key.get(("virtual-key", conns))
        if static is None or virtual is None:
            continue
        direct = by_key.get(("direct", conns))
        direct_p50 = direct.p50_ms if direct is not None else None

        def added(result: WrkResult, base: float | None = direct_p50) -> float | None:
            return None if result.p50_ms is None or base is None else round(result.p50_ms - base, 3)

        out[f"c{conns}"] = {
            "static": {"requests_per_sec": static.requests_per_sec, "added_p50_ms": added(static)},
            "virtual": {"requests_per_sec": virtual.requests_per_sec, "added_p50_ms": added(virtual)},
            "requests_per_sec_ratio": (
                round(virtual.requests_per_sec / static.requests_per_sec, 4) if static.requests_per_sec > 0 else None
            ),
        }
    return out


def format_key_comparison(comparison: dict[str, Any]) -> str:
    header = (
        f"{'conns':>6} {'static req/s':>13} {'virtual req/s':>14} {'virtual/static':>15} "
        f"{'static +p50 ms':>15} {'virtual +p50 ms':>16}"
    )
    out = ["static key vs virtual key (same load through the gateway):", header, "-" * len(header)]
    for label, figures in comparison.items():
        static, virtual, ratio = figures["static"], figures["virtual"], figures["requests_per_sec_ratio"]
        out.append(
            f"{label[1:]:>6} {static['requests_per_sec']:>13.1f} {virtual['requests_per_sec']:>14.1f} "
            f"{_fmt(ratio, '.3f'):>15} {_fmt(static['added_p50_ms'], '+.3f'):>15} "
            f"{_fmt(virtual['added_p50_ms'], '+.3f'):>16}"
        )
    return "\n".join(out)


def write_results(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def parse_connections(value: str) -> list[int]:
    try:
        conns = [int(part) for part in value.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {value}") from exc
    if not conns or any(c < 1 for c in conns):
        raise argparse.ArgumentTypeError("connection counts must be positive integers")
    return list(dict.fromkeys(conns))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m clawdbot.devtools.bench",
        description="wrk benchmark: mock upstream directly vs. through the gateway.",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument(
        "--connections",
        type=parse_connections,
        default=[1, 64],
        help="comma-separated connection counts (default 1,64)",
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per target (0 = none)")
    parser.add_argument("--skip-gateway", action="store_true", help="only benchmark the mock")
    parser.add_argument(
        "--skip-virtual-key", action="store_true", help="no run with a virtual key (only the runner's static key)"
    )
    parser.add_argument(
        "--runner-timeout",
        type=float,
        default=RUNNER_READY_TIMEOUT_S,
        help="seconds to wait for the runner's ready file",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace, rows: list[Row]) -> None:
    """Append one Row per (target, connections); rows survive a failure part-way."""
    if shutil.which("wrk") is None:
        raise BenchError("wrk not found; install it (apt-get install -y wrk)")
    with tempfile.TemporaryDirectory(prefix="clawdbot-bench-") as tmp:
        workdir = Path(tmp)
        mock_ready = workdir / "mock.ready.json"
        mock_cmd = [
            sys.executable,
            "-m",
            "clawdbot.devtools.mock_upstream",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--ready-file",
            str(mock_ready),
            "--model",
            BENCH_MODEL,
        ]
        with managed_process("mock", mock_cmd, mock_ready, MOCK_READY_TIMEOUT_S) as mock:
            mock_port = int(mock.ready["port"])
            rows += bench_target(
                "direct",
                f"http://127.0.0.1:{mock_port}/v1/chat/completions",
                DIRECT_API_KEY,
                args.connections,
                args.duration,
                args.warmup,
                workdir,
            )
            if args.skip_gateway:
                return
            config = workdir / "bench-config.yaml"
            config.write_text(gateway_config(mock_port, workdir))
            runner_ready = workdir / "runner.ready.json"
            runner_cmd = [
                sys.executable,
                "-m",
                "clawdbot.runner",
                "--config",
                str(config),
                "--ephemeral-ports",
                "--ready-file",
                str(runner_ready),
            ]
            with managed_process("runner", runner_cmd, runner_ready, args.runner_timeout) as gw:
                base = gw.ready.get("url")
                if not isinstance(base, str) or not base:
                    raise BenchError(f"runner ready file has no 'url': {gw.ready}")
                key = gw.ready.get("api_key")
                rows += bench_target(
                    "gateway",
                    base.rstrip("/") + "/v1/chat/completions",
                    key if isinstance(key, str) else None,
                    args.connections,
                    args.duration,
                    args.warmup,
                    workdir,
                )
                if not args.skip_virtual_key:
                    # Right after the static key's run, so both see the machine alike.
                    if not isinstance(key, str) or not key:
                        raise BenchError(f"runner ready file has no 'api_key' to make a virtual key with: {gw.ready}")
                    rows += bench_target(
                        "virtual-key",
                        base.rstrip("/") + "/v1/chat/completions",
                        create_virtual_key(base, key),
                        args.connections,
                        args.duration,
                        args.warmup,
                        workdir,
                    )
                rows += bench_target(
                    "cache-hit",
                    base.rstrip("/") + "/v1/chat/completions",
                    key if isinstance(key, str) else None,
                    args.connections,
                    args.duration,
                    args.warmup,
                    workdir,
                    CACHED_BODY,
                )
                for target, path, body in (
                    ("messages", "/v1/messages", MESSAGES_BODY),
                    ("responses", "/v1/responses", RESPONSES_BODY),
                ):
                    rows += bench_target(
                        target,
                        base.rstrip("/") + path,
                        key if isinstance(key, str) else None,
                        args.connections,
                        args.duration,
                        args.warmup,
                        workdir,
                        body,
                    )


def build_report(args: argparse.Namespace, rows: Sequence[Row], error: str | None) -> dict[str, Any]:
    return {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "skipped": ["gateway"] if args.skip_gateway else (["virtual-key"] if args.skip_virtual_key else []),
        "error": error,
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "request_body": REQUEST_BODY,
        "results": [row.to_json() for row in rows],
        "added_latency_ms": added_latency(rows),
        "virtual_key": {"spec": VIRTUAL_KEY_SPEC, "vs_static_key": key_comparison(rows)},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows: list[Row] = []
    error: str | None = None
    try:
        run(args, rows)
    except BenchError as exc:
        error = str(exc)
        print(f"bench: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    if rows:
        print(format_table(rows))
    report = build_report(args, rows, error)
    added = report["added_latency_ms"]
    if added:
        print()
        for key, value in added.items():
            # "p50_c1_ms" (Chat Completions) or "messages_p50_c1_ms" (another dialect).
            *target, label, conns, _ = key.split("_")
            route = target[0] if target else "gateway"
            print(f"added latency ({route} - direct) {label} at c={conns[1:]}: {value:+.3f} ms")
    elif not args.skip_gateway and error is None:
        print("\nadded latency: n/a (missing direct or gateway results)")
    comparison = report["virtual_key"]["vs_static_key"]
    if comparison:
        print()
        print(format_key_comparison(comparison))
    # Partial results are still written so a failed gateway start keeps the baseline.
    write_results(RESULTS_PATH, report)
    print(f"\nresults: {RESULTS_PATH}")
    return 1 if error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
