"""The local Kafka broker: a one-node KRaft broker run from its Maven Central jars by
deploy/kafka/kafka.sh (which documents its own environment). Whether a broker answers,
and topic creation: common/kafka.py."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

KAFKA_SCRIPT = Path(__file__).resolve().parents[3] / "deploy" / "kafka" / "kafka.sh"

# Formatting starts a JVM (about a second and a half on an idle machine); a busy 2-core
# machine can take many times that.
FORMAT_TIMEOUT_S = 120.0


class KafkaSetupError(RuntimeError):
    """The broker's storage could not be prepared; the message carries kafka.sh's output."""


def kafka_installed() -> bool:
    """Whether `kafka.sh install` has put the jars of the current pom in place."""
    try:
        return subprocess.run(["bash", str(KAFKA_SCRIPT), "installed"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def format_storage(data_dir: Path, port: int, controller_port: int) -> None:
    """Write data_dir/server.properties for these ports and format the storage if it is not
    formatted yet (so a restart keeps the data). Blocks for up to FORMAT_TIMEOUT_S."""
    argv = ["bash", str(KAFKA_SCRIPT), "format", str(data_dir), str(port), str(controller_port)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=FORMAT_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise KafkaSetupError(f"`{' '.join(argv)}` did not finish within {FORMAT_TIMEOUT_S:g} s") from exc
    except OSError as exc:
        raise KafkaSetupError(f"could not run `{' '.join(argv)}`: {exc}") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise KafkaSetupError(f"`{' '.join(argv)}` failed with exit code {done.returncode}:\n{output}")


def broker_argv(data_dir: Path) -> list[str]:
    """The broker in the foreground (the JVM replaces the shell): stop it with SIGTERM."""
    return ["bash", str(KAFKA_SCRIPT), "start", str(data_dir)]
