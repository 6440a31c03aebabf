"""Secrets that come from an environment variable or, failing that, from a file the local
runner generates once into its state directory (mode 0600) and reuses on every run.

Used by the runner for the API key (`api_key`), the internal credential
(`internal_token`) and the job-callback signing secret (`callback_secret`): a user of
`make run` never has to make one up, and a deployment sets the variable from its secret
store instead.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from clawdbot.common.config import ConfigError

log = logging.getLogger(__name__)

PRIVATE_MODE = 0o600


@dataclass(frozen=True)
class StateSecret:
    value: str = ""
    # env: from the variable; file: read from `path`; generated: written to `path` just now.
    source: Literal["env", "file", "generated"] = "env"
    env_var: str = ""
    path: Path | None = None

    def where(self) -> str:
        """Where the secret is, for the operator: never the secret itself."""
        return f"from {self.env_var}" if self.source == "env" else f"in {self.path}"

    def __repr__(self) -> str:
        # A dataclass repr would print the value into any log line or traceback.
        return f"StateSecret(source={self.source!r}, env_var={self.env_var!r}, path={self.path!r})"


def write_private(path: Path, text: str) -> None:
    """Write text to path, readable by its owner only, atomically (aside, then renamed): a
    reader never sees half a file, and the file is never briefly world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        # An existing partial file keeps its old mode through O_CREAT: set it again.
        os.chmod(partial, PRIVATE_MODE)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _read(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        # Someone loosened it (or an older version wrote it): tighten rather than refuse,
        # and say so, since others may have read it meanwhile.
        log.warning(
            "secret file was readable by others; set to 0600",
            extra={"path": str(path), "mode": oct(mode)},
        )
        os.chmod(path, PRIVATE_MODE)
    value = path.read_text().strip()
    if not value:
        raise ConfigError(f"{path} is empty: delete it to have a new secret generated")
    return value


def env_or_state_secret(
    env_var: str, path: Path, *, env: Mapping[str, str] | None = None, prefix: str = ""
) -> StateSecret:
    """The variable's value when set (non-blank); else the secret stored in path; else a new
    one (prefix + 43 URL-safe characters, 256 bits) stored there with mode 0600.

    Two runners starting at once on one state directory end up with the same secret: the
    new one is linked into place, which fails if the other got there first, and then the
    other's is read."""
    value = (os.environ if env is None else env).get(env_var, "").strip()
    if value:
        return StateSecret(value, "env", env_var, None)
    if path.exists():
        return StateSecret(_read(path), "file", env_var, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generated = prefix + secrets.token_urlsafe(32)
    partial = path.with_name(f".{path.name}.{os.getpid()}.new")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(generated + "\n")
        os.link(partial, path)
    except FileExistsError:
        return StateSecret(_read(path), "file", env_var, path)
    finally:
        partial.unlink(missing_ok=True)
    return StateSecret(generated, "generated", env_var, path)
