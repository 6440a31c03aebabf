"""Embeddings/s of the local MiniLM runtime with and without dynamic batching.

`python -m clawdbot.worker.bench_embeddings [--requests 256] [--concurrency 32]`:
many single-sentence requests at once, through the worker's Batcher, at batch window 0
(every request is its own model call) and at the configured default window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from clawdbot.common.config import WorkerConfig
from clawdbot.worker.batching import Batcher
from clawdbot.worker.runtimes.minilm import MiniLM


async def _run(model: MiniLM, window_ms: float, max_batch: int, requests: int, concurrency: int) -> dict[str, float]:
    calls = 0

    def counted(_size: int) -> None:
        nonlocal calls
        calls += 1

    batcher = Batcher(model.embed, window_ms / 1000, max_batch, counted)
    texts = [f"request number {i}: how is the weather in city {i % 17} today?" for i in range(requests)]
    gate = asyncio.Semaphore(concurrency)

    async def one(text: str) -> None:
        async with gate:
            await batcher.embed([text])

    started = time.perf_counter()
    await asyncio.gather(*(one(t) for t in texts))
    elapsed = time.perf_counter() - started
    return {"window_ms": window_ms, "embeddings_per_s": requests / elapsed, "model_calls": calls}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    defaults = WorkerConfig()
    model = MiniLM.load(Path(defaults.model_dir) / "all-minilm-l6-v2")
    model.embed(["warm up"])
    results = [
        asyncio.run(_run(model, window, defaults.max_batch, args.requests, args.concurrency))
        for window in (0.0, defaults.batch_window_ms)
    ]
    print(
        f"\n{'batch window':>14} {'embeddings/s':>14} {'model calls':>12}   ({args.requests} requests, "
        f"{args.concurrency} at a time)"
    )
    for r in results:
        print(f"{r['window_ms']:>11.1f} ms {r['embeddings_per_s']:>14.1f} {r['model_calls']:>12.0f}")
    out = Path(".clawdbot/bench/embeddings.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
