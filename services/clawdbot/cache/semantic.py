"""The semantic index: conversation vectors by namespace, searched by cosine similarity.

Vectors are unit length (the embeddings model normalises them), so similarity is one
matrix-vector product per namespace. Brute force is the right tool at this size: 50,000
vectors of 384 floats are 77 MB and a search over all of them takes a few milliseconds,
well under the model call it saves. The index lives in the cache process; the answers it
points at live in the cache levels, so an index entry whose answer expired simply misses.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


@dataclass
class _Namespace:
    keys: list[str] = field(default_factory=list)
    vectors: F32 = field(default_factory=lambda: np.empty((0, 0), dtype=np.float32))


class SemanticIndex:
    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._spaces: OrderedDict[str, _Namespace] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, namespace: str, key: str, vector: F32) -> None:
        vector = _unit(vector)
        space = self._spaces.setdefault(namespace, _Namespace())
        self._spaces.move_to_end(namespace)
        if key in space.keys:
            return
        if space.vectors.size and space.vectors.shape[1] != vector.shape[0]:
            # The embeddings model changed: its old vectors are not comparable.
            self._count -= len(space.keys)
            space.keys, space.vectors = [], np.empty((0, 0), dtype=np.float32)
        space.keys.append(key)
        space.vectors = vector[None, :] if not space.vectors.size else np.vstack([space.vectors, vector])
        self._count += 1
        while self._count > self._max:
            self._drop_oldest()

    def search(self, namespace: str, vector: F32, threshold: float) -> tuple[str, float] | None:
        space = self._spaces.get(namespace)
        if space is None or not space.keys or space.vectors.shape[1] != vector.shape[0]:
            return None
        scores = space.vectors @ _unit(vector)
        best = int(np.argmax(scores))
        similarity = float(scores[best])
        return (space.keys[best], similarity) if similarity >= threshold else None

    def _drop_oldest(self) -> None:
        # The least recently written namespace gives up its oldest vector.
        namespace, space = next(iter(self._spaces.items()))
        space.keys.pop(0)
        space.vectors = space.vectors[1:]
        self._count -= 1
        if not space.keys:
            del self._spaces[namespace]


def _unit(vector: F32) -> F32:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 else vector.astype(np.float32)
