"""The embeddings task on a local model: an OpenAI embeddings request in, its answer out."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from clawdbot.common.errors import GatewayError
from clawdbot.worker.batching import Batcher
from clawdbot.worker.runtimes.minilm import MiniLM


def _texts(body: dict[str, Any]) -> list[str]:
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise GatewayError.bad_request(
            "This model embeds text: 'input' must be a string or an array of strings.", "input", "invalid_type"
        )
    for i, text in enumerate(texts):
        if not text.strip():
            raise GatewayError.bad_request(f"'input[{i}]' is empty.", "input", "empty_input")
    return texts


class EmbeddingsTask:
    def __init__(self, name: str, model: MiniLM, batcher: Batcher) -> None:
        self.name = name
        self._model = model
        self._batcher = batcher

    async def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        texts = _texts(body)
        dims = body.get("dimensions")
        if dims is not None and dims != self._model.dimensions:
            raise GatewayError.bad_request(
                f"{self.name} makes {self._model.dimensions}-dimensional vectors; 'dimensions' cannot change that.",
                "dimensions",
                "invalid_value",
            )
        counts = self._model.count_tokens(texts)
        for i, count in enumerate(counts):
            if count > self._model.max_tokens:
                raise GatewayError.bad_request(
                    f"'input[{i}]' has {count} tokens; {self.name} takes at most {self._model.max_tokens}.",
                    "input",
                    "context_length_exceeded",
                )
        vectors = await self._batcher.embed(texts)
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                if as_base64
                else v.astype(np.float64).round(8).tolist(),
            }
            for i, v in enumerate(vectors)
        ]
        tokens = sum(counts)
        return {
            "object": "list",
            "data": data,
            "model": self.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
