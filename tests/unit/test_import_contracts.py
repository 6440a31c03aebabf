"""The import contracts in pyproject.toml (run by `make lint`) bite: a copy of the code
with one deliberate crossing import fails lint-imports, naming the import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(services: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(services)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=services,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def code_copy(tmp_path: Path) -> Path:
    services = tmp_path / "services"
    shutil.copytree(ROOT / "services" / "clawdbot", services / "clawdbot", ignore=shutil.ignore_patterns("__pycache__"))
    return services


def test_the_code_keeps_every_contract() -> None:
    result = lint_imports(ROOT / "services")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "crossing", "expected"),
    [
        # a service reaching into another service's package
        (
            "adapter/gateway.py",
            "from clawdbot.router import scoring",
            "clawdbot.adapter.gateway -> clawdbot.router.scoring",
        ),
        # a service importing the runner
        ("worker/chat.py", "import clawdbot.runner.supervisor", "clawdbot.worker.chat -> clawdbot.runner.supervisor"),
        # common depending on a service
        ("common/errors.py", "import clawdbot.cache.store", "clawdbot.common.errors -> clawdbot.cache.store"),
        # generated code depending on ours
        ("gen/v1/__init__.py", "import clawdbot.common.errors", "clawdbot.gen.v1 -> clawdbot.common.errors"),
        # a developer tool importing a service instead of starting it
        ("devtools/bench.py", "import clawdbot.worker.audio", "clawdbot.devtools.bench -> clawdbot.worker.audio"),
    ],
)
def test_a_crossing_import_fails_lint_naming_it(code_copy: Path, module: str, crossing: str, expected: str) -> None:
    target = code_copy / "clawdbot" / module
    source = target.read_text()
    target.write_text(source + f"\n{crossing}  # deliberate crossing\n")
    line = source.count("\n") + 2
    result = lint_imports(code_copy)
    assert result.returncode != 0, result.stdout
    assert f"{expected} (l.{line})" in result.stdout, result.stdout
