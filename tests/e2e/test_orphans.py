"""No process of the mesh outlives its runner.

The runner is killed with SIGKILL (it gets no chance to stop anything) while the worker is
deep in one long llama.cpp computation (evaluating a prompt of thousands of tokens: a
single C call that Python cannot interrupt) and requests are in flight through every
service. Every process the runner had started, and any of theirs, must be gone within the
services' shutdown deadline (common/lifeline.py) plus room for a busy 2-core machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from clawdbot.common.lifeline import shutdown_deadline_s
from tests.conftest import WORKER_MODELS, Mesh, mesh_config, running_mesh
from tests.support import GiveUp, unused_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.local_model]

CHAT_MODEL = "gemma-3-270m"
EMBEDDINGS_MODEL = "all-minilm-l6-v2"
# Every service's shutdown_grace_s in this mesh: short, so the test is quick; what is
# checked is that nothing outlives the deadline that follows from it.
GRACE_S = 3.0
# Past the deadline: SIGTERM reaching every process, the JVM's and Prometheus's own clean
# shutdowns, all on a loaded 2-core machine.
MACHINE_SLACK_S = 15.0
# Room for a prompt that keeps the worker computing for half a minute and more.
N_CTX = 8192
# About 5,500 tokens: the prompt's evaluation alone takes 30 s or more on 2 cores.
LONG_PROMPT = " ".join(f"word{i}" for i in range(1400))
SERVICE_SECTIONS = ("adapter", "router", "cache", "worker", "health", "jobs", "orchestrator")


def orphan_mesh_config(mock_url: str, tmp: Path) -> dict[str, Any]:
    """The end-to-end mesh (Kafka, Redis, every service), each service with GRACE_S, a
    worker with the chat model on a long context and the embeddings model only."""
    config = mesh_config(mock_url, tmp / "traces", unused_port())
    for section in SERVICE_SECTIONS:
        config[section] = {**config.get(section, {}), "shutdown_grace_s": GRACE_S}
    config["worker"]["models"] = [
        {"name": EMBEDDINGS_MODEL, "runtime": "minilm"},
        {"name": CHAT_MODEL, "runtime": "llama_cpp", "n_ctx": N_CTX},
    ]
    served = {EMBEDDINGS_MODEL, CHAT_MODEL}
    config["models"] = [m for m in config["models"] if m["name"] not in set(WORKER_MODELS) - served]
    return config


@dataclass(frozen=True)
class Process:
    """A process, told apart from a later one given the same pid by its start time."""

    pid: int
    started: int  # clock ticks after boot (/proc/<pid>/stat, field 22)
    command: str

    def alive(self) -> bool:
        """Running (a zombie is not: it holds nothing but its pid, until reaped)."""
        stat = _stat(self.pid)
        return stat is not None and stat[2] == self.started and stat[1] not in ("Z", "X")


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of a process, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()  # after the command name, which may hold anything
    return int(fields[1]), fields[0], int(fields[19])


def descendants(root: int) -> list[Process]:
    """Every process under root: its children, theirs, and so on."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    found: list[Process] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        stat = _stat(pid)
        if stat is None:
            continue
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append(Process(pid, stat[2], command.strip()[:160]))
        todo += children.get(pid, [])
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Load:
    """Requests of one kind sent over and over from a thread until stopped; how many
    succeeded. Failures are expected once the mesh is killed, and ignored."""

    def __init__(self, name: str, send: Callable[[httpx.Client, int], bool], mesh: Mesh) -> None:
        self.name = name
        self.succeeded = 0
        self.failures: list[str] = []
        self._send = send
        self._mesh = mesh
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"load-{name}", daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def _run(self) -> None:
        with httpx.Client(base_url=self._mesh.v1, headers=self._mesh.auth_headers, timeout=60) as http:
            i = 0
            while not self._stop.is_set():
                i += 1
                try:
                    if self._send(http, i):
                        self.succeeded += 1
                    else:
                        self.failures.append(f"attempt {i}: refused")
                except httpx.HTTPError as exc:
                    self.failures.append(f"attempt {i}: {type(exc).__name__}: {exc}")
                    # Only after the kill, or the mesh is broken: either way, not a hot loop.
                    self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(90)


def stream_chat(http: httpx.Client, i: int) -> bool:
    """Adapter, cache (a miss) and router, streaming for a couple of seconds."""
    body = {
        "model": "mock-1",
        "stream": True,
        "messages": [{"role": "user", "content": f"one two three four five six seven {uuid.uuid4().hex}"}],
        "mock": {"chunk_delay_ms": 200},
    }
    with http.stream("POST", "/chat/completions", json=body) as r:
        return r.status_code == 200 and b"[DONE]" in r.read()


def cached_chat(http: httpx.Client, i: int) -> bool:
    """The same question each time: the cache answers."""
    body = {"model": "mock-1", "messages": [{"role": "user", "content": "the same question again"}]}
    return http.post("/chat/completions", json=body).status_code == 200


def embeddings(http: httpx.Client, i: int) -> bool:
    """The worker's embeddings model, beside the long chat computation."""
    body = {"model": EMBEDDINGS_MODEL, "input": [f"sentence {i} about the weather", "and another one"]}
    return http.post("/embeddings", json=body).status_code == 200


def job(http: httpx.Client, i: int) -> bool:
    """Kafka, the job consumers and Redis."""
    body = {
        "kind": "chat",
        "request": {
            "model": "mock-1",
            "messages": [{"role": "user", "content": f"job {i}"}],
            "mock": {"delay_ms": 300},
        },
    }
    return http.post("/jobs", json=body).status_code == 202


def workflow(http: httpx.Client, i: int) -> bool:
    """The orchestrator, two model steps in parallel."""
    return http.post("/workflows/parallel_demo:run", json={"input": {"topic": f"t{i}"}}).status_code == 200


def test_no_process_outlives_a_killed_runner(tmp_path: Path, mock_upstream: str) -> None:
    mesh_processes: list[Process] = []
    loads: list[Load] = []
    long_chat: list[BaseException | httpx.Response] = []
    config = orphan_mesh_config(mock_upstream, tmp_path)
    with running_mesh(tmp_path, config, mock_upstream, ["--prometheus"], expect_clean_stop=False) as mesh:
        try:
            mesh.wait_for_local_models()
            loads = [Load(f.__name__, f, mesh).start() for f in (stream_chat, cached_chat, embeddings, job, workflow)]
            try:
                wait_for(lambda: all(load.succeeded for load in loads), 120, "every kind of request", interval=0.5)
            except TimeoutError as exc:
                raise AssertionError({load.name: load.failures[-3:] for load in loads if not load.succeeded}) from exc
            worker = mesh.service_pids()["worker"]
            cpu_before = cpu_seconds(worker)

            def ask_long() -> None:
                try:
                    long_chat.append(
                        httpx.post(
                            f"{mesh.v1}/chat/completions",
                            headers=mesh.auth_headers,
                            timeout=300,
                            json={
                                "model": CHAT_MODEL,
                                "messages": [{"role": "user", "content": LONG_PROMPT}],
                                "max_tokens": 512,
                            },
                        )
                    )
                except httpx.HTTPError as exc:
                    long_chat.append(exc)

            threading.Thread(target=ask_long, name="long-chat", daemon=True).start()

            def computing() -> bool:
                if long_chat:
                    raise GiveUp(f"the long chat ended before the kill: {long_chat[0]!r}")
                in_flight = mesh.worker_models()[CHAT_MODEL]["in_flight"]
                return in_flight == 1 and cpu_seconds(worker) - cpu_before >= 2.0

            wait_for(computing, 120, "the worker to be deep in the long computation", interval=0.2)

            mesh_processes = descendants(mesh.runner.popen.pid)
            pids = {p.pid for p in mesh_processes}
            expected = {name: pid for name, pid in mesh.service_pids().items() if pid}
            assert set(expected.values()) <= pids, (expected, mesh_processes)
            wanted = ["envoy", "kafka", "redis", "worker", "adapter", "router", "cache", "health", "orchestrator"]
            # The runner starts Prometheus only when it is installed (`make setup` installs it).
            for name in [*wanted, "jobs-1", "jobs-2", *(["prometheus"] if shutil.which("prometheus") else [])]:
                assert name in expected, f"{name} is not part of this mesh: {sorted(expected)}"

            mesh.runner.popen.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            mesh.runner.popen.wait(10)

            gone_after: dict[int, float] = {}

            def all_gone() -> bool:
                for process in mesh_processes:
                    if process.pid not in gone_after and not process.alive():
                        gone_after[process.pid] = time.monotonic() - killed
                return len(gone_after) == len(mesh_processes)

            budget = shutdown_deadline_s(GRACE_S) + MACHINE_SLACK_S
            with contextlib.suppress(TimeoutError):
                wait_for(all_gone, budget, "every process of the mesh to exit", interval=0.1)
            survivors = [p for p in mesh_processes if p.alive()]
            names = {pid: name for name, pid in expected.items()}
            report = "\n".join(
                f"  {names.get(p.pid, p.command)}: "
                + (f"gone after {gone_after[p.pid]:.1f} s" if p.pid in gone_after else "STILL RUNNING")
                for p in sorted(mesh_processes, key=lambda p: gone_after.get(p.pid, 1e9))
            )
            last = max(gone_after.values(), default=0.0)
            print(f"\nSIGKILL to the runner; the last of {len(mesh_processes)} processes gone after {last:.1f} s:")
            print(report)
            assert not survivors, (
                f"alive {budget:g} s after the runner was killed:\n{report}\n{mesh.runner.output()[-6000:]}"
            )
        finally:
            for load in loads:
                load.stop()
            # Never leave an orphan behind on the machine, whatever failed above. (Before
            # the kill, running_mesh stops the runner, and the runner its mesh.)
            for process in mesh_processes:
                if process.alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGKILL)
