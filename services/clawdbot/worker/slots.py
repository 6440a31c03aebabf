"""Hot model update by double buffer: each model has an active slot and a standby slot.

A load fills the standby slot off the event loop (read the files, build the runtime),
validates what it built and warms it up, and only then swaps it in: one assignment, so
every request sees either the old model or the new one, whole. Requests hold the
generation they started on until they finish; the old generation is released (its
memory freed) when its last request leaves. A load that fails anywhere before the swap
leaves the active model serving and says why. At shutdown a slot closes for good (close()).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
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

    def interrupt(self) -> None:
        """Ask the computations in progress to stop as soon as they can, and take no more
        (at shutdown; close() follows once settle() says none runs)."""
        ...

    def settle(self, timeout_s: float) -> Awaitable[bool]:
        """Wait up to timeout_s for no computation to be using the model; whether none is."""
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
        self.finished = False  # closed, or left open for good (see ModelSlot.close)

    def release_if_idle(self) -> None:
        if self.retired and self.in_flight == 0:
            self.close()

    def close(self) -> None:
        if self.finished:
            return
        self.finished = True
        try:
            self.model.close()
        except Exception:
            log.exception("releasing a model failed", extra={"version": self.model.version})


class ModelSlot(Generic[M]):
    """The serving model of one name, and the loading of its next version."""

    def __init__(self, name: str, build: Callable[[str], M]) -> None:
        self.name = name
        self._build = build  # blocking: source ("" = configured) -> a loaded model
        self._active: _Generation[M] | None = None
        self._loading = asyncio.Lock()  # one load at a time per model
        self.state = "loading"  # loading | ready | unavailable
        self.detail = ""  # why unavailable, or why the last load failed
        self._closed = False  # shut down: no request or load takes a model any more

    @property
    def version(self) -> str:
        return self._active.model.version if self._active else ""

    @property
    def in_flight(self) -> int:
        return self._active.in_flight if self._active else 0

    @contextlib.contextmanager
    def use(self) -> Iterator[M]:
        """The active model, held for the duration of one request (streams included)."""
        generation = None if self._closed else self._active
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
            if self._closed:
                # Shut down while this one loaded: it never serves.
                _Generation(model).close()
                raise LoadFailed(self.detail)
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

    async def close(self, settle_s: float) -> None:
        """Shut the slot for good: its model stops computing and is freed once no thread
        uses it any more, waiting at most settle_s for that. A model still computing then
        (llama.cpp evaluating a prompt is one C call) stays open: freeing it under the
        computation would crash the process, whose exit frees it anyway."""
        self._closed = True
        self.state, self.detail = "unavailable", "the worker is shutting down"
        generation, self._active = self._active, None
        if generation is None:
            return
        # Not retired: a request leaving meanwhile must not free it while a thread may
        # still compute in it (ChatTask.close would block the loop waiting for it).
        generation.model.interrupt()
        if await generation.model.settle(settle_s):
            generation.close()
        else:
            generation.finished = True  # nor later
            log.warning(
                "model still computing at shutdown: left open",
                extra={"model": self.name, "version": generation.model.version, "waited_s": settle_s},
            )

    def describe(self) -> dict[str, Any]:
        return {"state": self.state, "detail": self.detail, "version": self.version, "in_flight": self.in_flight}
