"""The semantic index: nearest stored conversation above a threshold, per namespace, bounded."""

from __future__ import annotations

import numpy as np

from clawdbot.cache.semantic import SemanticIndex


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def test_the_nearest_match_above_the_threshold_within_its_namespace() -> None:
    index = SemanticIndex(max_entries=100)
    index.add("ns", "k-east", unit(1, 0, 0))
    index.add("ns", "k-north", unit(0, 1, 0))
    index.add("other", "k-other", unit(1, 0.01, 0))
    found = index.search("ns", unit(1, 0.1, 0), threshold=0.9)
    assert found is not None and found[0] == "k-east" and 0.99 < found[1] <= 1.0
    assert index.search("ns", unit(1, 1, 0), threshold=0.9) is None  # 0.707 to both
    assert index.search("nowhere", unit(1, 0, 0), threshold=0.1) is None


def test_the_index_stays_within_its_bound_dropping_the_oldest() -> None:
    index = SemanticIndex(max_entries=3)
    for i in range(5):
        index.add("ns", f"k{i}", unit(1, i, 0))
    assert len(index) == 3
    assert index.search("ns", unit(1, 0, 0), threshold=0.999) is None  # k0 is gone
    assert index.search("ns", unit(1, 4, 0), threshold=0.999) == ("k4", index.search("ns", unit(1, 4, 0), 0.999)[1])


def test_a_new_embeddings_model_replaces_incomparable_vectors() -> None:
    index = SemanticIndex(max_entries=10)
    index.add("ns", "old", unit(1, 0, 0))
    index.add("ns", "new", unit(1, 0, 0, 0))
    assert len(index) == 1 and index.search("ns", unit(1, 0, 0, 0), 0.9) is not None
    assert index.search("ns", unit(1, 0, 0), 0.1) is None
