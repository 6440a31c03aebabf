"""The health service's verdicts, as this router applies them.

The router watches the health service's Watch stream and keeps the latest verdict per
instance: `unavailable` or `probing` takes an instance out of the candidates (unless no
instance of the model would be left: then it is tried anyway, as Envoy's panic threshold
does, rather than failing every request); a penalty lowers its score. When the stream
breaks (the health service restarts, or none runs), the verdicts are dropped: the router
falls back to its own circuit breakers instead of acting on stale news.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Final

import grpc

from clawdbot.gen.v1 import monitor_pb2, monitor_pb2_grpc

log = logging.getLogger(__name__)

# Longer than the health service's heartbeat: a stream quiet for this long is dead.
SILENCE_S: Final = 15.0
RETRY_S: Final = 1.0


@dataclass(frozen=True)
class Verdict:
    status: str  # available | unavailable | probing
    penalty: float
    reason: str

    @property
    def excluded(self) -> bool:
        return self.status != "available"


class HealthView:
    def __init__(self) -> None:
        self.verdicts: dict[str, Verdict] = {}
        self.connected = False
        self.version = 0

    def apply(self, update: monitor_pb2.InstanceVerdicts) -> None:
        fresh = {v.instance_id: Verdict(v.status, v.penalty, v.reason) for v in update.verdicts}
        for instance_id, verdict in fresh.items():
            # Worth a line: a change, or news other than "available" about a new instance.
            before = self.verdicts.get(instance_id, Verdict("available", 0.0, ""))
            if (before.status, before.penalty) != (verdict.status, verdict.penalty):
                log.info(
                    "health verdict",
                    extra={"instance": instance_id, "status": verdict.status, "penalty": verdict.penalty},
                )
        self.verdicts, self.version = fresh, update.version

    def _lost(self, why: str) -> None:
        if self.connected or self.verdicts:
            log.warning("health verdicts dropped: the watch ended", extra={"error": why})
        self.verdicts, self.connected = {}, False

    async def watch(self, stub: monitor_pb2_grpc.HealthMonitorStub, watcher: str) -> None:
        """Follow the verdicts until cancelled, reconnecting whenever the stream ends."""
        while True:
            call = stub.Watch(monitor_pb2.WatchRequest(watcher=watcher))
            try:
                while True:
                    async with asyncio.timeout(SILENCE_S):
                        update = await call.read()
                    if update is grpc.aio.EOF:  # type: ignore[attr-defined]
                        self._lost("the stream ended")
                        break
                    if not self.connected:
                        log.info("watching health verdicts", extra={"version": update.version})
                    self.connected = True
                    self.apply(update)
            except grpc.aio.AioRpcError as err:
                self._lost(err.code().name)
            except TimeoutError:
                self._lost(f"no word for {SILENCE_S:g} s")
            finally:
                call.cancel()
            await asyncio.sleep(RETRY_S)
