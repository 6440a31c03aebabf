"""Child processes of the local runner: start, wait until ready, restart with backoff
when one dies, stop gracefully."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clawdbot.common.lifeline import PARENT_PID_ENV
from clawdbot.common.retry import RetryPolicy

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[bool]]

_PR_SET_PDEATHSIG = 1


def _die_with_parent(runner_pid: int) -> Callable[[], None]:
    """What a child runs before exec: it gets SIGTERM when the runner dies (even by
    SIGKILL), so no process of the mesh outlives it holding its ports; the Python services
    then leave within their deadline (common/lifeline.py), the others on SIGTERM. The
    setting survives exec (the envoy wrapper's, kafka.sh's) and is inherited by nothing.

    The kernel sends it when the *thread* that forked exits, so children are forked from
    the runner's main thread (Child.start checks). A runner that died before the prctl
    would never signal: the child checks that the runner is still its parent, after."""
    # Looked up here, in the runner: no dlopen in a child forked from a threaded process.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != runner_pid:
            os._exit(1)

    return in_child


def grpc_serving(target: str) -> ReadyCheck:
    # grpc.health.v1 is exempt from the internal credential: a plain channel will do.
    async def check() -> bool:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
            except grpc.aio.AioRpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    return check


def http_ok(url: str, verify_tls: bool = True) -> ReadyCheck:
    """Ready when GET url answers 200. verify_tls=False: for a child of ours serving HTTPS
    with a certificate made for its public name (or a private CA), which the address we
    probe it on would not match; whether it serves is all this asks."""

    async def check() -> bool:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(url, ssl=verify_tls, timeout=aiohttp.ClientTimeout(total=2.0)) as resp,
            ):
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    return check


def _resp(*parts: str) -> bytes:
    """One command in Redis's protocol: arguments may hold any byte (a password's spaces)."""
    encoded = [part.encode() for part in parts]
    return f"*{len(encoded)}\r\n".encode() + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in encoded)


def redis_pong(host: str, port: int, password: str | None = None, username: str | None = None) -> ReadyCheck:
    """Ready when the server answers PING (no client library needed); with a password,
    after AUTH succeeds, so a Redis refusing our credentials is never taken for ready."""
    auth = b""
    if password:
        auth = _resp("AUTH", username, password) if username else _resp("AUTH", password)

    async def check() -> bool:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
        except (OSError, TimeoutError):
            return False
        try:
            writer.write(auth + _resp("PING"))
            await writer.drain()
            if auth and not (await asyncio.wait_for(reader.readline(), 2.0)).startswith(b"+OK"):
                return False
            return (await asyncio.wait_for(reader.readline(), 2.0)).startswith(b"+PONG")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()

    return check


@dataclass
class Child:
    name: str
    argv: Sequence[str]
    ready: ReadyCheck
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 120.0
    stop_timeout_s: float = 30.0
    # Runs before a graceful stop (Envoy: drain listeners first).
    before_stop: Callable[[], Awaitable[None]] | None = None
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    stopping: bool = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, withhold: Collection[str] = ()) -> None:
        """Start with the runner's environment, less the variables in withhold (secrets
        this child is not meant to have), plus its own env."""
        if threading.current_thread() is not threading.main_thread():
            # PR_SET_PDEATHSIG would fire when this thread ends, not when the runner does.
            raise RuntimeError(f"{self.name}: children are started from the runner's main thread")
        env = {name: value for name, value in os.environ.items() if name not in withhold}
        env.update(self.env)
        # The Python services watch this pid too (common/lifeline.py): their second line.
        env[PARENT_PID_ENV] = str(os.getpid())
        # Children inherit stdout/stderr: their JSON logs go where the runner's go.
        # A session of its own: Ctrl-C reaches only the runner, which stops children in order.
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, env=env, start_new_session=True, preexec_fn=_die_with_parent(os.getpid())
        )
        self.started_at = time.monotonic()
        log.info("started", extra={"child": self.name, "pid": self.process.pid})

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        delay = 0.05
        while time.monotonic() < deadline:
            if self.process is None or self.process.returncode is not None:
                code = self.process.returncode if self.process else None
                raise RuntimeError(f"{self.name} exited with code {code} before it was ready")
            if await self.ready():
                log.info(
                    "ready",
                    extra={
                        "child": self.name,
                        "pid": self.pid,
                        "after_s": round(time.monotonic() - self.started_at, 2),
                    },
                )
                return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        raise RuntimeError(f"{self.name} was not ready within {self.ready_timeout_s:g} s")

    async def stop(self) -> None:
        self.stopping = True
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        if self.before_stop is not None:
            try:
                await self.before_stop()
            except (TimeoutError, OSError, aiohttp.ClientError) as exc:
                log.warning("pre-stop step failed", extra={"child": self.name, "error": str(exc)})
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
            log.info("stopped", extra={"child": self.name, "code": proc.returncode})
        except TimeoutError:
            log.warning("did not stop in time; killing", extra={"child": self.name})
            proc.kill()
            await proc.wait()


class Supervisor:
    """Keeps children alive: a child that exits unexpectedly is reported and restarted,
    with exponential backoff that resets once it has stayed up for a minute."""

    # Restarts of a child that keeps dying back off (full jitter, common/retry.py): 0.5 s
    # doubling up to 30 s; the count resets once it stays up for STABLE_AFTER_S.
    RESTART = RetryPolicy(max_attempts=0, base_s=0.5, max_backoff_s=30.0)
    STABLE_AFTER_S = 60.0

    def __init__(self, on_change: Callable[[], None], withhold: Collection[str] = ()) -> None:
        self.children: list[Child] = []
        # Secret variables no child inherits from the runner: each gets the ones it needs
        # in its own env.
        self._withhold = frozenset(withhold)
        self._on_change = on_change
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False

    async def launch(self, child: Child) -> None:
        self.children.append(child)
        await child.start(self._withhold)
        await child.wait_ready()
        self._on_change()
        self._watchers.append(asyncio.create_task(self._watch(child)))

    async def _watch(self, child: Child) -> None:
        failures = 0
        while not self._stopping:
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping or child.stopping:
                return
            uptime = time.monotonic() - child.started_at
            failures = 1 if uptime > self.STABLE_AFTER_S else failures + 1
            backoff = self.RESTART.backoff(failures)
            log.error(
                "child exited unexpectedly; restarting",
                extra={"child": child.name, "code": code, "uptime_s": round(uptime, 1), "backoff_s": round(backoff, 2)},
            )
            await asyncio.sleep(backoff)
            if self._stopping:
                return
            child.restarts += 1
            await child.start(self._withhold)
            try:
                await child.wait_ready()
            except RuntimeError as exc:
                log.error("restart did not become ready", extra={"child": child.name, "error": str(exc)})
                continue
            self._on_change()

    async def stop_all(self) -> None:
        """Stop in reverse start order: the edge first, so no new work reaches the rest."""
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        for child in reversed(self.children):
            await child.stop()
