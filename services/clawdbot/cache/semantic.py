"""The semantic index: conversation vectors by namespace, searched by cosine similarity.

Vectors are unit length (the embeddings model normalises them), so similarity is one
matrix-vector product per namespace. Brute force is the right tool at this size: 50,000
vectors of 384 floats are 77 MB and a search over all of them takes a few milliseconds,
well under the model call it saves. The index lives in the cache process; the answers it
points at live in the cache levels, so an index entry whose answer expired simply misses.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


# Rows a namespace starts with; it doubles when full, so adding is amortised O(1).
_INITIAL_ROWS = 64


class _Namespace:
    """Rows [head, tail) of `rows` are the live vectors, oldest first; keys[i] is row i's.

    Adding writes one row; only when the array is full are the live rows moved, to the
    front of the same array (when at most half are live) or into one twice its size. Either
    way a move follows as many adds as it copies rows, so no add copies the whole matrix
    (which, at 50,000 x 384 floats, takes tens of milliseconds on the event loop)."""

    __slots__ = ("head", "keys", "members", "rows", "tail")

    def __init__(self, dims: int) -> None:
        self.rows: F32 = np.empty((_INITIAL_ROWS, dims), dtype=np.float32)
        self.keys: list[str] = []
        self.members: set[str] = set()
        self.head = 0
        self.tail = 0

    @property
    def dims(self) -> int:
        return int(self.rows.shape[1])

    def __len__(self) -> int:
        return self.tail - self.head

    def live(self) -> F32:
        return self.rows[self.head : self.tail]

    def append(self, key: str, vector: F32) -> None:
        if self.tail == len(self.rows):
            self._make_room()
        self.rows[self.tail] = vector
        self.keys.append(key)
        self.members.add(key)
        self.tail += 1

    def drop_oldest(self) -> None:
        self.members.discard(self.keys[self.head])
        self.head += 1

    def _make_room(self) -> None:
        live = len(self)
        capacity = len(self.rows)
        target = self.rows if live <= capacity // 2 else np.empty((capacity * 2, self.dims), dtype=np.float32)
        target[:live] = self.rows[self.head : self.tail]
        self.rows = target
        self.keys = self.keys[self.head : self.tail]
        self.head, self.tail = 0, live


class SemanticIndex:
    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._spaces: OrderedDict[str, _Namespace] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, namespace: str, key: str, vector: F32) -> None:
        vector = _unit(vector)
        space = self._spaces.get(namespace)
        if space is not None and space.dims != vector.shape[0]:
            # The embeddings model changed: its old vectors are not comparable.
            self._count -= len(space)
            space = None
        if space is None:
            space = self._spaces[namespace] = _Namespace(vector.shape[0])
        self._spaces.move_to_end(namespace)
        if key in space.members:
            return
        space.append(key, vector)
        self._count += 1
        while self._count > self._max:
            self._drop_oldest()

    def search(self, namespace: str, vector: F32, threshold: float) -> tuple[str, float] | None:
        space = self._spaces.get(namespace)
        if space is None or not len(space) or space.dims != vector.shape[0]:
            return None
        scores = space.live() @ _unit(vector)
        best = int(np.argmax(scores))
        similarity = float(scores[best])
        return (space.keys[space.head + best], similarity) if similarity >= threshold else None

    def _drop_oldest(self) -> None:
        # The least recently written namespace gives up its oldest vector.
        namespace, space = next(iter(self._spaces.items()))
        space.drop_oldest()
        self._count -= 1
        if not len(space):
            del self._spaces[namespace]


def _unit(vector: F32) -> F32:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 else vector.astype(np.float32)
