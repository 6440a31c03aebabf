"""Jobs/s through Kafka with one and with two consumer processes.

`python -m clawdbot.devtools.bench_jobs [--jobs 600] [--delay-ms 50]`: a mesh started by the
runner (local Kafka and Redis) against the mock provider answering each call after a
fixed delay; all jobs are submitted through Envoy, and the clock runs from the first
submission until the last job has its result stored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from clawdbot.common.redis_client import redis_client
from clawdbot.devtools.bench import MOCK_READY_TIMEOUT_S, managed_process

MODEL = "mock-1"


def mesh_config(mock_port: int, consumers: int, workdir: Path) -> str:
    return (
        f"cache: {{enabled: false}}\n"
        f"jobs: {{consumers: {consumers}}}\n"
        "orchestrator: {enabled: false}\n"
        "models:\n"
        f"  - {{name: {MODEL}, task: chat, base_url: 'http://127.0.0.1:{mock_port}/v1'}}\n"
    )


async def _measure(url: str, key: str, redis_port: int, jobs: int, delay_ms: float) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "bench"}], "mock": {"delay_ms": delay_ms}}
    gate = asyncio.Semaphore(32)
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {key}"}, timeout=60) as http:

        async def submit() -> str:
            async with gate:
                r = await http.post(f"{url}/v1/jobs", json={"kind": "chat", "request": body})
                r.raise_for_status()
                return str(r.json()["id"])

        started = time.perf_counter()
        ids = await asyncio.gather(*(submit() for _ in range(jobs)))
        submitted = time.perf_counter() - started
    # The runner's Redis, with the password the mesh uses when REDIS_PASSWORD is set.
    store = redis_client(f"redis://127.0.0.1:{redis_port}/0")
    try:
        while True:
            raws = await store.mget([f"clawdbot:job:{i}" for i in ids])
            done = [json.loads(raw) for raw in raws if raw and json.loads(raw)["status"] in ("succeeded", "failed")]
            if len(done) == jobs:
                break
            await asyncio.sleep(0.05)
    finally:
        await store.aclose()
    elapsed = time.perf_counter() - started
    failed = sum(1 for job in done if job["status"] == "failed")
    return {"jobs_per_s": jobs / elapsed, "seconds": elapsed, "submit_s": submitted, "failed": failed}


def run_one(consumers: int, args: argparse.Namespace, workdir: Path, mock_port: int) -> dict[str, Any]:
    config = workdir / f"jobs-{consumers}.yaml"
    config.write_text(mesh_config(mock_port, consumers, workdir))
    ready = workdir / f"runner-{consumers}.ready.json"
    state = workdir / f"state-{consumers}"
    cmd = [sys.executable, "-m", "clawdbot.runner", "--config", str(config), "--ephemeral-ports"]
    cmd += ["--ready-file", str(ready), "--state-dir", str(state)]
    with managed_process(f"jobs-runner-{consumers}", cmd, ready, 240) as mesh:
        info = mesh.ready
        result = asyncio.run(_measure(info["url"], info["api_key"], info["ports"]["redis"], args.jobs, args.delay_ms))
    return {"consumers": consumers, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="clawdbot-bench-jobs-") as tmp:
        workdir = Path(tmp)
        mock_ready = workdir / "mock.ready.json"
        mock_cmd = [sys.executable, "-m", "clawdbot.devtools.mock_upstream", "--host", "127.0.0.1", "--port", "0"]
        mock_cmd += ["--ready-file", str(mock_ready), "--model", MODEL]
        with managed_process("jobs-mock", mock_cmd, mock_ready, MOCK_READY_TIMEOUT_S) as mock:
            for consumers in (1, 2):
                print(f"bench: {args.jobs} jobs, {consumers} consumer process(es) ...", file=sys.stderr, flush=True)
                results.append(run_one(consumers, args, workdir, int(mock.ready["port"])))
    print(f"\n{args.jobs} jobs, upstream answering after {args.delay_ms:g} ms, submitted 32 at a time")
    print(f"{'consumers':>10} {'jobs/s':>9} {'seconds':>9} {'submitted/s':>12} {'failed':>7}")
    for r in results:
        submitted = args.jobs / r["submit_s"]
        print(f"{r['consumers']:>10} {r['jobs_per_s']:>9.1f} {r['seconds']:>9.2f} {submitted:>12.1f} {r['failed']:>7}")
    out = Path(".clawdbot/bench/jobs.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
