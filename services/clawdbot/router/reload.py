"""Hot swap of the router's registry by double buffer.

A reload (file change, POST /v1/admin/reload, gRPC) reads and validates the whole file,
builds the next snapshot beside the live one, health-checks and warms the instances it
adds (one GET /models each, which also opens a pooled connection), then swaps it in with
one assignment. Requests already running keep the snapshot they started with; instances
that left are forgotten once their last request finished. An invalid file is refused with
the validator's message and the live snapshot keeps serving.

Only `models` and `model_router` change on reload; ports and the rest need a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from clawdbot.common.config import MODEL_URLS_ENV, Config, ConfigError, load_config
from clawdbot.common.errors import GatewayError
from clawdbot.router.registry import Instance
from clawdbot.router.snapshot import SnapshotOwner

log = logging.getLogger(__name__)

# How long a changed configuration file must stay unchanged before the watcher loads it.
_SETTLE_S = 0.3



def with_model_urls(config: Config, env: Mapping[str, str]) -> Config:
    raw = env.get(MODEL_URLS_ENV)
    if not raw:
        return config
    urls: dict[str, str] = json.loads(raw)
    models = tuple(m.model_copy(update={"base_url": urls[m.name]}) if m.name in urls else m for m in config.models)
    return config.model_copy(update={"models": models})


@dataclass
class ReloadResult:
    version: int
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    unhealthy: list[str] = field(default_factory=list)
    took_ms: float = 0.0


class Reloader:
    """Owns the config file; the servicer owns the live snapshot it swaps."""

    def __init__(
        self,
        source: Path,
        servicer: SnapshotOwner,
        env: Mapping[str, str] | None = None,
        check_timeout_s: float = 3.0,
    ) -> None:
        self.source = source
        self._servicer = servicer
        self._env = dict(os.environ) if env is None else dict(env)
        self._check_timeout_s = check_timeout_s
        self._lock = asyncio.Lock()
        self._seen = self._stat()
        self._drains: set[asyncio.Task[None]] = set()

    def _stat(self) -> tuple[int, int]:
        """What tells a changed file: its modification time and size."""
        try:
            stat = self.source.stat()
        except OSError:
            return (0, 0)
        return (stat.st_mtime_ns, stat.st_size)

    async def reload(self, reason: str) -> ReloadResult:
        async with self._lock:  # one reload at a time; a second waits and re-reads
            started = time.perf_counter()
            self._seen = self._stat()
            try:
                config = with_model_urls(load_config(self.source, self._env), self._env)
            except ConfigError as exc:
                log.error("reload refused", extra={"reason": reason, "error": str(exc)})
                raise GatewayError(
                    400,
                    f"Reload refused; still serving the previous configuration. {exc}",
                    "invalid_request_error",
                    "invalid_config",
                ) from None
            live = {i.id: i for i in self._servicer.snapshot.registry.instances()}
            snapshot = self._servicer.build_snapshot(config)
            fresh = {i.id: i for i in snapshot.registry.instances()}
            added = [i for i in fresh.values() if i.id not in live or live[i.id].base_url != i.base_url]
            unhealthy = await self._check([*added])
            for instance_id in unhealthy:
                # Probed again through half-open before it gets real traffic.
                self._servicer.breaker(instance_id).trip()
            self._servicer.snapshot = snapshot
            took_ms = (time.perf_counter() - started) * 1000
            removed = [i for i in live if i not in fresh]
            result = ReloadResult(
                version=snapshot.version,
                added=[i.id for i in added],
                removed=removed,
                kept=[i for i in fresh if i in live and i not in {a.id for a in added}],
                unhealthy=unhealthy,
                took_ms=took_ms,
            )
            if removed:
                task = asyncio.create_task(self._forget_when_drained(set(removed), snapshot.routing.deadline_s))
                self._drains.add(task)
                task.add_done_callback(self._drains.discard)
            log.info(
                "reloaded",
                extra={
                    "reason": reason,
                    "version": result.version,
                    "added": result.added,
                    "removed": removed,
                    "unhealthy": unhealthy,
                    "took_ms": round(took_ms, 2),
                },
            )
            return result

    async def _check(self, instances: list[Instance]) -> list[str]:
        """Ids of the instances whose GET /models failed."""
        if not instances:
            return []
        timeout = aiohttp.ClientTimeout(total=self._check_timeout_s)

        async def healthy(session: aiohttp.ClientSession, instance: Instance) -> bool:
            headers = {"Authorization": f"Bearer {instance.api_key}"} if instance.api_key else {}
            try:
                async with session.get(f"{instance.base_url}/models", headers=headers, timeout=timeout) as resp:
                    return resp.status < 500
            except (aiohttp.ClientError, TimeoutError):
                return False

        async with aiohttp.ClientSession() as session:
            verdicts = await asyncio.gather(*(healthy(session, i) for i in instances))
        return [i.id for i, ok in zip(instances, verdicts, strict=True) if not ok]

    async def _forget_when_drained(self, removed: set[str], deadline_s: float) -> None:
        """Once the instances that left have no request in flight, drop their state."""
        for _ in range(max(1, int(deadline_s / 0.1))):
            if not any(self._servicer.in_flight(i) for i in removed):
                break
            await asyncio.sleep(0.1)
        self._servicer.forget(removed)
        log.info("drained", extra={"instances": sorted(removed)})

    async def watch(self, interval_s: float = 1.0) -> None:
        """Reload when the file changes; a bad edit is logged and the live snapshot stays."""
        while True:
            await asyncio.sleep(interval_s)
            changed = self._stat()
            if changed == self._seen:
                continue
            # A file being written (truncated, then filled) changes again within moments:
            # reload only once it has settled, never from a half-written file.
            await asyncio.sleep(_SETTLE_S)
            if self._stat() != changed:
                continue
            try:
                await self.reload("file changed")
            except GatewayError as err:
                log.warning("keeping the live snapshot", extra={"error": err.message})

    async def close(self) -> None:
        for task in list(self._drains):
            task.cancel()
