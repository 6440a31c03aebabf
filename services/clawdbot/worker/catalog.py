"""How each runtime is built, versioned, validated and warmed up into a servable model.

A builder runs off the event loop (it reads files and may take seconds) and returns a
LoadedModel: the task object that answers requests, the version it serves, a warm-up that
also validates the answer, what to release when the model is replaced, and how to stop
its computations at shutdown.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clawdbot.common.config import WorkerConfig, WorkerModel, repo_path
from clawdbot.worker.slots import LoadFailed

# Each runtime's modules are imported when a model of it is built: a worker configured
# for embeddings alone never imports llama.cpp, pocketsphinx or scikit-learn.

OnBatch = Callable[[str, int], None]

# Sentences whose meaning a working sentence-embedding model must order correctly.
_PARAPHRASES = ("A man is playing a guitar.", "Someone is strumming a guitar.")
_UNRELATED = "The stock market fell sharply today."


async def _always_idle(_timeout_s: float) -> bool:
    return True


@dataclass
class LoadedModel:
    task: Any  # EmbeddingsTask | ChatTask | TranscriptionTask | SpeechTask | IntentTask
    version: str
    check: Callable[[], None]
    release: Callable[[], None] = field(default=lambda: None)
    # Only the chat model has threads of its own and long computations to stop. The other
    # runtimes compute on the default executor, in calls bounded by their inputs, and hold
    # nothing to free: a call still running at exit is left behind (common/lifeline.py).
    halt: Callable[[], None] = field(default=lambda: None)
    wait_idle: Callable[[float], Awaitable[bool]] = _always_idle

    def warm_up(self) -> None:
        self.check()

    def interrupt(self) -> None:
        self.halt()

    def settle(self, timeout_s: float) -> Awaitable[bool]:
        return self.wait_idle(timeout_s)

    def close(self) -> None:
        self.release()


def _dataset_sentences(spec: WorkerModel) -> list[str]:
    from clawdbot.worker.runtimes.intent_classifier import load_dataset

    dataset = load_dataset(repo_path(spec.dataset))
    return [example for intent in dataset.intents for example in intent.examples]


def _minilm(spec: WorkerModel, config: WorkerConfig, source: str, on_batch: OnBatch) -> LoadedModel:
    from clawdbot.worker.batching import Batcher
    from clawdbot.worker.embeddings import EmbeddingsTask
    from clawdbot.worker.runtimes.minilm import MiniLM

    model_dir = Path(config.model_dir)
    model = MiniLM.from_directory(Path(source)) if source else MiniLM.load(model_dir / spec.name)
    digest = hashlib.sha256()
    with (model.model_dir / "model.safetensors").open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    batcher = Batcher(
        model.embed, config.batch_window_ms / 1000, config.max_batch, lambda size: on_batch(spec.name, size)
    )
    task = EmbeddingsTask(spec.name, model, batcher)

    def check() -> None:
        a, b, c = model.embed([*_PARAPHRASES, _UNRELATED])
        if not all(np.isfinite(v).all() and abs(float(np.linalg.norm(v)) - 1) < 1e-3 for v in (a, b, c)):
            raise LoadFailed("the model's vectors are not finite unit vectors")
        if not float(a @ b) > float(a @ c):
            raise LoadFailed("the model scores a paraphrase below an unrelated sentence")

    return LoadedModel(task, f"sha256-{digest.hexdigest()[:12]}", check)


def _llama(spec: WorkerModel, config: WorkerConfig, source: str) -> LoadedModel:
    from clawdbot.worker.chat import ChatTask
    from clawdbot.worker.runtimes.llama import LlamaModel, file_version, packaged_gguf

    if source:
        path, version = Path(source), file_version(Path(source))
    else:
        path, package_version = packaged_gguf(spec.package, Path(config.model_dir))
        version = f"{spec.package}-{package_version}"
    task = ChatTask(spec.name, LlamaModel.load(path, version, spec.n_ctx, spec.threads))
    return LoadedModel(task, version, task.warm_up, task.close, halt=task.interrupt, wait_idle=task.settle)


def _sphinx(spec: WorkerModel) -> LoadedModel:
    from clawdbot.worker.runtimes.sphinx import Sphinx
    from clawdbot.worker.transcription import TranscriptionTask

    vocabulary = _dataset_sentences(spec)
    runtime = Sphinx.load(vocabulary)
    digest = hashlib.sha256("\n".join(vocabulary).encode()).hexdigest()[:8]
    version = f"pocketsphinx-{importlib.metadata.version('pocketsphinx')}-{digest}"
    return LoadedModel(TranscriptionTask(spec.name, runtime), version, runtime.warm_up)


def _espeak(spec: WorkerModel) -> LoadedModel:
    from clawdbot.worker.runtimes.espeak import Espeak
    from clawdbot.worker.speech import SpeechTask

    runtime = Espeak.load()
    return LoadedModel(SpeechTask(spec.name, runtime), f"espeak-ng-{runtime.version}", runtime.warm_up)


def _intent(spec: WorkerModel, config: WorkerConfig, source: str) -> LoadedModel:
    from clawdbot.worker.intent import IntentTask
    from clawdbot.worker.runtimes.intent_classifier import IntentClassifier

    runtime = IntentClassifier.load(Path(config.model_dir) / spec.name, repo_path(spec.dataset), version=source or None)
    return LoadedModel(IntentTask(spec.name, runtime), runtime.version, runtime.warm_up)


def builder(spec: WorkerModel, config: WorkerConfig, on_batch: OnBatch) -> Callable[[str], LoadedModel]:
    """The blocking build of one configured model, from its package or from `source`."""

    def build(source: str) -> LoadedModel:
        match spec.runtime:
            case "minilm":
                return _minilm(spec, config, source, on_batch)
            case "llama_cpp":
                return _llama(spec, config, source)
            case "pocketsphinx":
                return _sphinx(spec)
            case "espeak":
                return _espeak(spec)
            case "intent":
                return _intent(spec, config, source)
        raise AssertionError(f"unknown runtime {spec.runtime}")  # config validation prevents it

    return build
