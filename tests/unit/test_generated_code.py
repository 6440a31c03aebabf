"""The checked-in stubs and Envoy descriptor set must match protos/ (run `make proto`)."""

import subprocess
import sys

from tests.support import REPO_ROOT, python_env


def test_generated_code_is_current() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clawdbot.devtools.protogen", "--check"],
        cwd=REPO_ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
