"""A stopping service leaves on time whatever its threads do, and a child of the runner
leaves when the runner is gone (common/lifeline.py, runner/supervisor.py).

Each case that may end a process runs in a process of its own (os._exit would end pytest).
A thread in time.sleep stands for one inside a C call that releases the GIL (llama.cpp's
through ctypes); libc's sleep called through ctypes.PyDLL, which keeps the GIL, for one
that does not.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from clawdbot.common.lifeline import BACKSTOP_S, PARENT_PID_ENV, Lifeline
from clawdbot.runner.supervisor import Child, _die_with_parent
from tests.support import python_env, wait_for

# Past each expected moment: a loaded 2-core machine, an interpreter starting.
SLACK_S = 10.0


def run_script(source: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=python_env(),
    )
    return done, time.monotonic() - started


PRELUDE = """
    import threading, time
    from clawdbot.common.lifeline import Lifeline
    from clawdbot.common.logging import setup_logging
    setup_logging("t", "info")
"""


def test_the_deadline_ends_a_shutdown_held_by_a_stuck_thread() -> None:
    done, took = run_script(
        PRELUDE
        + """
    stuck = threading.Thread(target=time.sleep, args=(120,), name="in-c-code")
    stuck.start()
    Lifeline("t", grace_s=0.5, margin_s=0.5).arm()
    stuck.join()  # as the interpreter's exit would
    print("not reached")
    """
    )
    assert done.returncode == 1, done
    assert "not reached" not in done.stdout
    assert "shutdown overran its deadline" in done.stderr and "in-c-code" in done.stderr, done.stderr
    assert 1.0 <= took < 1.0 + SLACK_S


def test_the_backstop_ends_a_process_whose_gil_is_held() -> None:
    done, took = run_script(
        PRELUDE
        + """
    import ctypes
    Lifeline("t", grace_s=0.5, margin_s=0.5).arm()
    threading.Thread(target=ctypes.PyDLL(None).sleep, args=(120,), name="holds-the-gil").start()
    time.sleep(120)
    """
    )
    # faulthandler's watchdog: the stacks on stderr, then exit status 1.
    assert done.returncode == 1, done
    assert "Timeout" in done.stderr and "Thread" in done.stderr, done.stderr
    assert "shutdown overran its deadline" not in done.stderr  # that thread never got the GIL
    assert 1.0 + BACKSTOP_S <= took < 1.0 + BACKSTOP_S + SLACK_S


def test_finish_leaves_a_stuck_thread_behind_after_flushing() -> None:
    done, took = run_script(
        PRELUDE
        + """
    threading.Thread(target=time.sleep, args=(120,), name="in-c-code").start()
    Lifeline("t", grace_s=30).finish(flush=lambda: print("flushed", flush=True), settle_s=0.5)
    print("not reached")
    """
    )
    assert done.returncode == 0, done
    assert done.stdout.split() == ["flushed"]
    assert "abandoning computations that did not stop" in done.stderr and "in-c-code" in done.stderr
    assert took < 0.5 + SLACK_S


def test_finish_returns_once_threads_end_by_themselves() -> None:
    done, _took = run_script(
        PRELUDE
        + """
    threading.Thread(target=time.sleep, args=(0.3,), name="nearly-done").start()
    Lifeline("t", grace_s=30).finish(flush=lambda: print("flushed"), settle_s=30)
    print("returned")
    """
    )
    assert done.returncode == 0, done
    assert done.stdout.split() == ["returned"]  # nothing abandoned, nothing flushed here


def test_a_service_stops_when_the_runner_that_started_it_is_gone(tmp_path: Path) -> None:
    """Without PR_SET_PDEATHSIG (the runner's first line): the parent watch alone."""
    marker = tmp_path / "child.txt"
    service = f"""
        import os, signal, sys, time
        from clawdbot.common.lifeline import PARENT_PID_ENV, Lifeline
        lifeline = Lifeline.from_environment("t", grace_s=30)
        inherited = PARENT_PID_ENV in os.environ
        def stop(*_):
            open({str(marker)!r}, "w").write(f"SIGTERM armed={{lifeline.armed}} inherited={{inherited}}")
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        lifeline.watch_parent()
        print("watching", flush=True)
        time.sleep(120)
    """
    runner = f"""
        import os, subprocess, sys, time
        env = dict(os.environ, {PARENT_PID_ENV}=str(os.getpid()))
        child = subprocess.Popen([sys.executable, "-c", {textwrap.dedent(service)!r}], env=env,
                                 stdout=subprocess.PIPE, text=True, start_new_session=True)
        child.stdout.readline()
        print(child.pid, flush=True)
        time.sleep(120)
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(runner)], stdout=subprocess.PIPE, text=True, env=python_env()
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    try:
        proc.kill()
        proc.wait(10)
        wait_for(lambda: marker.exists() and marker.read_text(), SLACK_S, "the orphaned service to stop")
        assert marker.read_text() == "SIGTERM armed=True inherited=False"
        wait_for(lambda: not Path(f"/proc/{child}").exists() or _zombie(child), SLACK_S, "the service to exit")
    finally:
        if Path(f"/proc/{child}").exists():
            os.kill(child, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_process_not_started_by_the_runner_watches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    assert Lifeline.from_environment("t", 1).parent_pid is None
    monkeypatch.setenv(PARENT_PID_ENV, "not-a-pid")
    assert Lifeline.from_environment("t", 1).parent_pid is None
    monkeypatch.setenv(PARENT_PID_ENV, "4242")
    assert Lifeline.from_environment("t", 1).parent_pid == 4242
    assert PARENT_PID_ENV not in os.environ  # its own children do not inherit it


def test_a_runner_killed_under_uvloop_takes_its_children_along(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG, set as the supervisor starts a child from the uvloop-run runner,
    fires on the runner's SIGKILL; the child was also told the runner's pid."""
    marker = tmp_path / "child.txt"
    child = f"""
        import os, signal, sys, time
        def stop(*_):
            open({str(marker)!r}, "w").write("SIGTERM " + os.environ.get({PARENT_PID_ENV!r}, ""))
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        time.sleep(120)
    """
    runner = f"""
        import asyncio, sys
        from clawdbot.common.service import run_service
        from clawdbot.runner.supervisor import Child

        async def ready() -> bool:
            return True

        async def main() -> None:
            child = Child("sleeper", [sys.executable, "-c", {textwrap.dedent(child)!r}], ready)
            await child.start()
            print(child.pid, flush=True)
            await asyncio.sleep(120)

        run_service(main)
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(runner)], stdout=subprocess.PIPE, text=True, env=python_env()
    )
    assert proc.stdout is not None
    # The runner's line (the child's pid) and the child's, on the stdout it inherited.
    lines = sorted(proc.stdout.readline().strip() for _ in range(2))
    assert lines[1] == "ready", lines
    pid = int(lines[0])
    try:
        proc.kill()
        proc.wait(10)
        wait_for(lambda: marker.exists() and marker.read_text(), SLACK_S, "the child to get SIGTERM")
        assert marker.read_text() == f"SIGTERM {proc.pid}"
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), SLACK_S, "the child to exit")
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


def test_a_child_whose_runner_died_before_it_could_be_told_does_not_start() -> None:
    """The runner died between fork and prctl: the kernel will never signal, so the child
    leaves before exec (its parent is not the runner it was forked for)."""
    done = subprocess.run(
        [sys.executable, "-c", "print('started')"],
        preexec_fn=_die_with_parent(os.getpid() + 1_000_000),  # a pid that is nobody's
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (1, "")


def test_children_are_started_from_the_main_thread_only() -> None:
    async def ready() -> bool:
        return True

    failure: list[BaseException] = []

    def start_in_a_thread() -> None:
        try:
            asyncio.run(Child("x", [sys.executable, "-c", "pass"], ready).start())
        except RuntimeError as exc:
            failure.append(exc)

    thread = threading.Thread(target=start_in_a_thread)
    thread.start()
    thread.join(30)
    assert failure and "main thread" in str(failure[0])
