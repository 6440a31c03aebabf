"""What makes a stopping service leave on time, whatever its threads are doing.

A graceful stop (common/service.py) can be held up by work Python cannot interrupt: a
thread inside llama.cpp evaluating a long prompt, or any C call. asyncio.run waits for its
default executor's threads at exit and the interpreter joins every executor thread, so
such a thread kept a worker alive, at full CPU, long after it was told to stop; and when
its runner was gone there was nobody left to kill it. Three guarantees, each for one way
of failing:

- `arm()`, called when shutdown is requested, sets a hard deadline of the service's grace
  plus SHUTDOWN_MARGIN_S (room for the drain notice, background work and cleanups; kept
  under the runner's own patience, grace + 10 s, so a service stuck under a live runner
  says what it was stuck in before the runner's SIGKILL). Past it, a thread logs where
  every thread is and `os._exit`s. A C call holding the GIL would keep that thread from
  running: faulthandler's watchdog, a C thread that needs no GIL, dumps the stacks to
  stderr and exits BACKSTOP_S later.
- `watch_parent()`: a service started by the runner (which names itself in
  CLAWDBOT_PARENT_PID) stops when the runner is gone. PR_SET_PDEATHSIG (set by
  runner/supervisor.py before exec) is the first line; this is the second, should that
  signal never come (the kernel drops the setting on a set-user-ID exec, and a failed
  prctl goes unnoticed in a child before exec). A service started any other way (a
  container, a shell) watches nothing.
- `finish()`, at the end of a graceful stop: threads still computing get SETTLE_S to end;
  those that do not are abandoned (their results have nobody left to go to): telemetry and
  logs are flushed and the process `_exit`s at once instead of waiting for them.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# The runner's pid, given to each child it starts (runner/supervisor.py): its lifeline.
PARENT_PID_ENV = "CLAWDBOT_PARENT_PID"
# Past a service's grace: the drain notice (1.5 s), background work asked to stop (5 s),
# cleanups and the telemetry flush.
SHUTDOWN_MARGIN_S = 8.0
# After the deadline, when a C call holds the GIL and the deadline's Python thread cannot run.
BACKSTOP_S = 2.0
# getppid() is a cheap system call: four a second costs nothing and bounds the delay.
PARENT_POLL_S = 0.25
# What threads still computing get at the end of a graceful stop before they are abandoned.
SETTLE_S = 2.0
# Exit status when the deadline ends the process (faulthandler's backstop exits with 1 too).
DEADLINE_EXIT_CODE = 1


def shutdown_deadline_s(grace_s: float, margin_s: float = SHUTDOWN_MARGIN_S) -> float:
    """Seconds from a shutdown request to the process being gone, at the latest."""
    return grace_s + margin_s


def busy_threads() -> list[threading.Thread]:
    """Threads the interpreter would wait for at exit: alive, not daemons, not this one."""
    current, main = threading.current_thread(), threading.main_thread()
    return [t for t in threading.enumerate() if t.is_alive() and not t.daemon and t is not current and t is not main]


def describe_threads(threads: list[threading.Thread] | None = None) -> list[dict[str, str]]:
    """Each thread's name and the innermost frame it runs (where it is stuck)."""
    frames = sys._current_frames()
    described = []
    for thread in threading.enumerate() if threads is None else threads:
        frame = frames.get(thread.ident) if thread.ident is not None else None
        where = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}" if frame else "?"
        described.append({"name": thread.name, "at": where})
    return described


def _flush_logs() -> None:
    # os._exit skips logging's own flush at exit.
    for handler in logging.getLogger().handlers:
        handler.flush()


class Lifeline:
    def __init__(
        self,
        service: str,
        grace_s: float,
        parent_pid: int | None = None,
        *,
        margin_s: float = SHUTDOWN_MARGIN_S,
        poll_s: float = PARENT_POLL_S,
    ) -> None:
        self.service = service
        self.deadline_s = shutdown_deadline_s(grace_s, margin_s)
        self.parent_pid = parent_pid
        self._poll_s = poll_s
        self._armed = threading.Event()
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, service: str, grace_s: float) -> Lifeline:
        """The lifeline of a service started by the runner (PARENT_PID_ENV set), else one
        that watches no parent. The variable is taken out of the environment: a process
        this one starts is not the runner's child and must not watch the runner."""
        raw = os.environ.pop(PARENT_PID_ENV, "")
        if raw and not raw.isdigit():
            log.warning("ignoring a malformed parent pid", extra={"variable": PARENT_PID_ENV, "value": raw})
        return cls(service, grace_s, int(raw) if raw.isdigit() else None)

    @property
    def armed(self) -> bool:
        return self._armed.is_set()

    def watch_parent(self) -> None:
        """Stop this service (SIGTERM to itself: the ordinary graceful path) once its
        parent is gone, and start the deadline at once in case that path is blocked."""
        if self.parent_pid is None:
            return
        threading.Thread(target=self._watch, name="lifeline-parent", daemon=True).start()

    def _watch(self) -> None:
        # Checked before the first wait too: the runner may have died before we started.
        while os.getppid() == self.parent_pid:
            if self._armed.wait(self._poll_s):
                return  # shutting down already: the deadline holds
        log.error(
            "the runner that started this service is gone: shutting down",
            extra={"runner_pid": self.parent_pid, "parent_pid": os.getppid()},
        )
        self.arm("the runner is gone")
        os.kill(os.getpid(), signal.SIGTERM)

    def arm(self, reason: str = "shutdown requested") -> None:
        """Start the deadline (once; later calls change nothing)."""
        with self._lock:
            if self._armed.is_set():
                return
            self._armed.set()
        deadline = time.monotonic() + self.deadline_s
        log.info("shutdown deadline set", extra={"reason": reason, "within_s": self.deadline_s})
        faulthandler.dump_traceback_later(self.deadline_s + BACKSTOP_S, exit=True)
        threading.Thread(target=self._expire, args=(deadline,), name="lifeline-deadline", daemon=True).start()

    def _expire(self, deadline: float) -> None:
        time.sleep(max(0.0, deadline - time.monotonic()))
        log.critical(
            "shutdown overran its deadline: exiting now",
            extra={"within_s": self.deadline_s, "threads": describe_threads()},
        )
        _flush_logs()
        os._exit(DEADLINE_EXIT_CODE)

    def finish(self, flush: Callable[[], None], settle_s: float = SETTLE_S) -> None:
        """The end of a graceful stop, once the service has closed what it opened (it blocks:
        nothing is served any more). Returns when no thread is left for the interpreter to
        wait on; else, after settle_s, flushes (telemetry) and exits with status 0, leaving
        the stuck threads behind."""
        give_up = time.monotonic() + settle_s
        for thread in busy_threads():
            thread.join(max(0.0, give_up - time.monotonic()))
        stuck = busy_threads()
        if not stuck:
            return
        log.warning("abandoning computations that did not stop", extra={"threads": describe_threads(stuck)})
        try:
            flush()
        except Exception:
            log.exception("flushing before exit failed")
        _flush_logs()
        os._exit(0)
