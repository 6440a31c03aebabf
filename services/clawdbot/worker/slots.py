"""Hot model update by double buffer: each model has an active slot and a standby slot.

A load fills the standby slot off the event loop (read the files, build the runtime),
validates what it built and warms it up, and only then swaps it in: one assignment, so
every request sees either the old model or the new one, whole. Requests hold the
generation they started on until they finish; the old generation is released (its
memory freed) when its last request leaves. A load that fails anywhere before the swap
leaves the active model serving and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from clawdbot.common.errors import GatewayError

log = logging.getLogger(__name__)


class LoadFailed(Exception):
    """A model could not be loaded, validated or warmed up; the message says why."""


class Servable(Protocol):
    version: str

    def warm_up(self) -> None:
        """Run one small request through, so the first real one is not the slow one;
        raise LoadFailed if the answer shows the model is broken."""
        ...

    def close(self) -> None:
        """Free what the model holds (called once no request uses it)."""
        ...


M = TypeVar("M", bound=Servable)


@dataclass(frozen=True)
class LoadReport:
    version: str
    previous_version: str
    load_ms: float
    warmup_ms: float


class _Generation(Generic[M]):
    def __init__(self, model: M) -> None:
        self.model = model
        self.in_flight = 0
        self.retired = False

    def release_if_idle(self) -> None:
        if self.retired and self.in_flight == 0:
            try:
                self.model.close()
            except Exception:
                log.exception("releasing a replaced model failed", extra={"version": self.model.version})


class ModelSlot(Generic[M]):
    """The serving model of one name, and the loading of its next version."""

    def __init__(self, name: str, build: Callable[[str], M]) -> None:
        self.name = name
        self._build = build  # blocking: source ("" = configured) -> a loaded model
        self._active: _Generation[M] | None = None
        self._loading = asyncio.Lock()  # one load at a time per model
        self.state = "loading"  # loading | ready | unavailable
        self.detail = ""  # why unavailable, or why the last load failed

    @property
    def version(self) -> str:
        return self._active.model.version if self._active else ""

    @property
    def in_flight(self) -> int:
        return self._active.in_flight if self._active else 0

    @contextlib.contextmanager
    def use(self) -> Iterator[M]:
        """The active model, held for the duration of one request (streams included)."""
        generation = self._active
        if generation is None:
            why = f": {self.detail}" if self.detail else "."
            raise GatewayError.unavailable(f"The local model `{self.name}` is {self.state}{why}")
        generation.in_flight += 1
        try:
            yield generation.model
        finally:
            generation.in_flight -= 1
            generation.release_if_idle()

    async def load(self, source: str = "") -> LoadReport:
        """Build, validate and warm up a new version, then swap it in. Raises LoadFailed."""
        async with self._loading:
            started = time.perf_counter()
            try:
                model = await asyncio.to_thread(self._build, source)
                loaded = time.perf_counter()
                await asyncio.to_thread(model.warm_up)
            except Exception as exc:
                reason = str(exc) if isinstance(exc, LoadFailed) else f"{type(exc).__name__}: {exc}"
                if self._active is None:
                    self.state = "unavailable"
                self.detail = f"loading {source or 'the configured model'} failed: {reason}"
                log.error("model load failed", extra={"model": self.name, "source": source, "error": reason})
                raise LoadFailed(self.detail) from exc
            warmed = time.perf_counter()
            previous, self._active = self._active, _Generation(model)
            self.state, self.detail = "ready", ""
            if previous is not None:
                previous.retired = True
                previous.release_if_idle()
            report = LoadReport(
                version=model.version,
                previous_version=previous.model.version if previous else "",
                load_ms=(loaded - started) * 1000,
                warmup_ms=(warmed - loaded) * 1000,
            )
            log.info("model serving", extra={"model": self.name, **report.__dict__})
            return report

    def describe(self) -> dict[str, Any]:
        return {"state": self.state, "detail": self.detail, "version": self.version, "in_flight": self.in_flight}
