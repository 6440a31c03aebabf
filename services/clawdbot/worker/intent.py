"""The intent task on a local classifier: a Clawdbot intent request in, its ranking out.

Request: {"model": ..., "input": str | [str, ...], "top_n": int (optional, default 3)}.
Answer: one entry per input, in order, each with the best intent, its confidence and the
top_n intents ranked; shaped like an OpenAI list so clients can reuse their parsing.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final

from clawdbot.common.errors import GatewayError

if TYPE_CHECKING:
    from clawdbot.worker.runtimes.intent_classifier import IntentClassifier

MAX_INPUTS: Final = 256
MAX_INPUT_CHARS: Final = 2000  # utterances are a sentence or two; anything longer is not a command
DEFAULT_TOP_N: Final = 3
_DECIMALS: Final = 6


def _texts(body: dict[str, Any]) -> list[str]:
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise GatewayError.bad_request(
            "This model classifies text: 'input' must be a string or a non-empty array of strings.",
            "input",
            "invalid_type",
        )
    if len(texts) > MAX_INPUTS:
        raise GatewayError.bad_request(
            f"'input' has {len(texts)} items; at most {MAX_INPUTS} are classified per request.",
            "input",
            "too_many_inputs",
        )
    for i, text in enumerate(texts):
        name = "'input'" if isinstance(value, str) else f"'input[{i}]'"
        if not text.strip():
            raise GatewayError.bad_request(f"{name} is empty.", "input", "empty_input")
        if len(text) > MAX_INPUT_CHARS:
            raise GatewayError.bad_request(
                f"{name} has {len(text)} characters; at most {MAX_INPUT_CHARS} are allowed.",
                "input",
                "string_above_max_length",
            )
    return texts


def _top_n(body: dict[str, Any], intents: int) -> int:
    value = body.get("top_n")
    if value is None:
        return min(DEFAULT_TOP_N, intents)
    # bool is an int in Python, but `true` is not a count.
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= intents:
        raise GatewayError.bad_request(
            f"'top_n' must be an integer from 1 to {intents}, the number of intents this model knows.",
            "top_n",
            "invalid_value",
        )
    return value


class IntentTask:
    def __init__(self, name: str, runtime: IntentClassifier) -> None:
        self.name = name
        self._runtime = runtime

    async def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        texts = _texts(body)
        top_n = _top_n(body, len(self._runtime.intents))
        # predict_proba is CPU work of a millisecond or more per batch; off the event loop.
        rankings = await asyncio.to_thread(self._runtime.classify, texts)
        data = []
        for i, ranking in enumerate(rankings):
            best, confidence = ranking[0]
            data.append(
                {
                    "object": "intent",
                    "index": i,
                    "intent": best,
                    "confidence": round(confidence, _DECIMALS),
                    "ranking": [{"intent": name, "confidence": round(p, _DECIMALS)} for name, p in ranking[:top_n]],
                }
            )
        return {
            "object": "list",
            "model": self.name,
            "model_version": self._runtime.version,
            "data": data,
        }
