"""Helpers for tests that start real processes: wait on conditions, never on sleeps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICES_DIR = REPO_ROOT / "services"

T = TypeVar("T")


class GiveUp(Exception):
    """Raised by a wait_for condition when waiting longer cannot help."""


def wait_for(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll until condition() returns something truthy; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except GiveUp:
            raise
        except Exception as exc:  # the condition is allowed to fail while things start
            last_error = exc
            value = None
        if value:
            return value
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)
    raise TimeoutError(
        f"timed out after {timeout:g} s waiting for {what}" + (f" (last error: {last_error})" if last_error else "")
    )


def python_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SERVICES_DIR), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class Proc:
    """A child process with its output in a log file, stopped with SIGTERM then SIGKILL."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env or python_env(),
            cwd=cwd or REPO_ROOT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()
        return self.popen.returncode


def read_json_file(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def start_mock_upstream(tmp: Path, *extra: str) -> tuple[Proc, int]:
    ready = tmp / "mock.ready.json"
    proc = Proc(
        [sys.executable, "-m", "clawdbot.devtools.mock_upstream", "--port", "0", "--ready-file", str(ready), *extra],
        tmp / "mock.log",
    )

    def ready_port() -> int | None:
        if not proc.alive():
            raise GiveUp(f"mock upstream exited:\n{proc.output()}")
        info = read_json_file(ready)
        return int(info["port"]) if info else None

    return proc, wait_for(ready_port, 60, "the mock upstream")


def grpcurl(
    target: str, *args: str, data: Any = None, headers: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run grpcurl (plaintext) against target; `make setup` installs it with go install."""
    found = shutil.which("grpcurl") or str(REPO_ROOT / ".tools" / "bin" / "grpcurl")
    assert Path(found).exists(), "grpcurl missing: `make setup` installs it with go install"
    argv = [found, "-plaintext", "-max-time", "60"]
    for header in headers:
        argv += ["-H", header]
    if data is not None:
        argv += ["-d", json.dumps(data)]
    return subprocess.run([*argv, target, *args], capture_output=True, text=True, timeout=90)
