"""The chat task on a local base model: an OpenAI chat request in, an answer or a stream out.

Gemma 3 270M as packaged is a base model: it continues text, it does not follow turns.
So this task owns the prompt. It writes the conversation as a transcript with one worked
exchange before it, which is what a base model has seen most of and continues most
faithfully, and ends on the assistant's cue; stop sequences cut the answer where the
model would start writing the user's next line. System messages become the opening
description of the assistant.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import orjson

from clawdbot.common.errors import GatewayError
from clawdbot.worker.runtimes.llama import LlamaModel, Piece
from clawdbot.worker.slots import LoadFailed

PREAMBLE: Final = (
    "Below is a conversation between a curious user and Clawdbot, a helpful and knowledgeable AI assistant. "
    "The assistant answers clearly and briefly, in plain sentences."
)
EXAMPLE: Final = (
    ("User", "What is the capital of France?"),
    ("Assistant", "The capital of France is Paris."),
    ("User", "Name two kinds of fruit."),
    ("Assistant", "Apples and bananas."),
)
ROLE_NAMES: Final = {"user": "User", "assistant": "Assistant", "tool": "Tool", "function": "Tool"}
# Where the model starts to write the next turn itself, or leaves the transcript.
STOP_SEQUENCES: Final = ("\nUser:", "\nAssistant:", "\nTool:", "<end_of_turn>", "\n\n\n")
DEFAULT_MAX_TOKENS: Final = 256
# OpenAI's default temperature (1.0) makes a 270M model ramble; 0.7 keeps it on topic.
DEFAULT_TEMPERATURE: Final = 0.7
MAX_STOP: Final = 4


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    presence_penalty: float
    frequency_penalty: float


def _text_of(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise GatewayError.bad_request(
                    f"messages[{index}]: this model reads text only; only parts of type 'text' are accepted.",
                    f"messages[{index}].content",
                    "invalid_value",
                )
            parts.append(part["text"])
        return "\n".join(parts)
    if content is None:
        return ""
    raise GatewayError.bad_request(
        f"messages[{index}].content must be a string or an array of text parts.",
        f"messages[{index}].content",
        "invalid_type",
    )


def build_prompt(messages: list[dict[str, Any]]) -> str:
    """The transcript the base model continues, ending on the assistant's cue."""
    system: list[str] = []
    turns: list[str] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        text = " ".join(_text_of(message.get("content"), i).split())  # one line per turn
        if role in ("system", "developer"):
            system.append(text)
        elif role in ROLE_NAMES:
            turns.append(f"{ROLE_NAMES[role]}: {text}")
    preamble = PREAMBLE + ("\n" + "\n".join(system) if system else "")
    example = "\n".join(f"{who}: {said}" for who, said in EXAMPLE)
    return f"{preamble}\n\n{example}\n\n" + "\n".join(turns) + "\nAssistant:"


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GatewayError.bad_request(f"'{name}' must be a number.", name, "invalid_type")
    if not low <= value <= high:
        raise GatewayError.bad_request(f"'{name}' must be between {low} and {high}.", name, "invalid_value")
    return float(value)


def parse_sampling(body: dict[str, Any]) -> Sampling:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise GatewayError.bad_request("'max_tokens' must be a positive integer.", "max_tokens", "invalid_value")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise GatewayError.bad_request(
            f"'stop' must be a string or an array of at most {MAX_STOP} non-empty strings.", "stop", "invalid_value"
        )
    n = body.get("n", 1)
    if n != 1:
        raise GatewayError.bad_request("This model returns one choice: 'n' must be 1.", "n", "invalid_value")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise GatewayError.bad_request("'seed' must be an integer.", "seed", "invalid_type")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        stop=STOP_SEQUENCES + tuple(stops),
        seed=seed,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
    )


class ChatTask:
    """One local chat model; generations run one at a time on its own thread.

    A generation stops at the next token once its flag is set: when its caller goes away,
    or at shutdown (interrupt). Evaluating the prompt is one call into llama.cpp and cannot
    be stopped; a worker shutting down leaves such a thread behind (common/lifeline.py)."""

    def __init__(self, name: str, model: LlamaModel) -> None:
        self.name = name
        self.model = model
        self.version = model.version
        self._turn = asyncio.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{name}")
        # Generations handed to the thread and not finished, each with its stop flag.
        self._running: dict[asyncio.Future[None], threading.Event] = {}
        self._closing = False

    def warm_up(self) -> None:
        pieces = list(self._pieces_blocking("Hello", 4))
        if not pieces:
            raise LoadFailed("the model produced nothing for a warm-up prompt")

    def _pieces_blocking(self, prompt: str, max_tokens: int) -> Iterator[Piece]:
        return self.model.generate(
            prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            top_p=1.0,
            stop=(),
            seed=0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            cancelled=threading.Event(),
        )

    def interrupt(self) -> None:
        """At shutdown: each generation stops at its next token, none queued starts, no
        new one is accepted."""
        self._closing = True
        for cancelled in self._running.values():
            cancelled.set()
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def settle(self, timeout_s: float) -> bool:
        """Whether no generation is left on the model thread, waiting up to timeout_s."""
        running = list(self._running)
        if not running:
            return True
        _done, pending = await asyncio.wait(running, timeout=timeout_s)
        return not pending

    def close(self) -> None:
        """Free the model, once no generation uses it (a replaced model, or after settle)."""
        self._thread.shutdown(wait=True)
        self.model.close()

    def _prepare(self, body: dict[str, Any]) -> tuple[str, Sampling, int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise GatewayError.bad_request("'messages' must be a non-empty array.", "messages", "invalid_value")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise GatewayError.bad_request(f"messages[{i}] must be an object.", f"messages[{i}]", "invalid_type")
        sampling = parse_sampling(body)
        prompt = build_prompt(messages)
        prompt_tokens = len(self.model.tokenize(prompt))
        room = self.model.n_ctx - prompt_tokens
        if room < 1 or (sampling.max_tokens is not None and sampling.max_tokens > room):
            asked = sampling.max_tokens or 1
            raise GatewayError.bad_request(
                f"This model's maximum context length is {self.model.n_ctx} tokens. However, you requested "
                f"{prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in the completion).",
                "messages",
                "context_length_exceeded",
            )
        max_tokens = sampling.max_tokens or min(DEFAULT_MAX_TOKENS, room)
        return prompt, Sampling(**{**sampling.__dict__, "max_tokens": max_tokens}), prompt_tokens

    async def _pieces(self, prompt: str, sampling: Sampling) -> AsyncIterator[Piece]:
        """Pieces from the model thread; stops generating when the consumer goes away."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()

        def produce() -> None:
            try:
                for piece in self.model.generate(
                    prompt,
                    max_tokens=sampling.max_tokens or DEFAULT_MAX_TOKENS,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    stop=sampling.stop,
                    seed=sampling.seed,
                    presence_penalty=sampling.presence_penalty,
                    frequency_penalty=sampling.frequency_penalty,
                    cancelled=cancelled,
                ):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        async with self._turn:
            if self._closing:
                raise GatewayError.unavailable(f"The local model `{self.name}` is shutting down.")
            done = loop.run_in_executor(self._thread, produce)
            self._running[done] = cancelled
            done.add_done_callback(self._running.pop)
            try:
                while (item := await queue.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                cancelled.set()
                # The next generation may only start once this one has left the model.
                await asyncio.shield(done)

    async def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt, sampling, prompt_tokens = self._prepare(body)
        text, finish = "", "stop"
        async for piece in self._pieces(prompt, sampling):
            text += piece.text
            finish = piece.finish_reason or finish
        text = text.strip()
        completion_tokens = len(self.model.tokenize(text)) - 1 if text else 0
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "system_fingerprint": self.version,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
            "usage": _usage(prompt_tokens, completion_tokens),
        }

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """OpenAI chat.completion.chunk payloads; the last carries usage when asked."""
        prompt, sampling, prompt_tokens = self._prepare(body)
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            return orjson.dumps(
                {
                    "id": chunk_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.name,
                    "system_fingerprint": self.version,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                }
            )

        yield chunk({"role": "assistant", "content": ""}, None)
        text, finish, started = "", "stop", False
        async for piece in self._pieces(prompt, sampling):
            finish = piece.finish_reason or finish
            content = piece.text if started else piece.text.lstrip()  # the cue ends with "Assistant:"
            if content:
                started = True
                text += content
                yield chunk({"content": content}, None)
        yield chunk({}, finish)
        if include_usage:
            completion_tokens = len(self.model.tokenize(text)) - 1 if text else 0
            usage = _usage(prompt_tokens, completion_tokens)
            yield orjson.dumps(
                {
                    "id": chunk_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.name,
                    "choices": [],
                    "usage": usage,
                }
            )


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
