"""Anthropic's Messages API <-> the one internal request (a Chat Completions body).

Both directions live here, with the mapping tables (stop reasons, tool_choice, error
types and statuses, usage), once:

- inbound (the adapter's /v1/messages): messages_to_chat() decodes a Messages request,
  chat_to_message() encodes a Chat answer as a Message, MessagesStreamEncoder turns Chat
  chunks into Anthropic's event grammar, anthropic_error() shapes errors,
  count_tokens_estimate() answers /v1/messages/count_tokens;
- outbound (the router's Anthropic connector): chat_to_anthropic() encodes a Chat request
  for Anthropic, message_to_chat() decodes its Message, AnthropicChunkDecoder turns its
  events into Chat chunks, SseParser reads its SSE bytes, error_from_anthropic() maps its
  error bodies.

What cannot be represented on the other side is refused with a 400 naming the field,
never dropped silently (the exceptions, each with its reason, are commented).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from clawdbot.common.errors import GatewayError

log = logging.getLogger(__name__)

DIALECT: Final = "anthropic"
# Anthropic requires max_tokens; a Chat caller may leave it out.
DEFAULT_MAX_TOKENS: Final = 4096
# Request headers that belong to Anthropic's API and are passed on to an Anthropic upstream.
NATIVE_HEADERS: Final = ("anthropic-version", "anthropic-beta")
DEFAULT_ANTHROPIC_VERSION: Final = "2023-06-01"

# --- mapping tables -------------------------------------------------------------------

# Anthropic stop_reason -> Chat finish_reason.
FINISH_BY_STOP_REASON: Final[Mapping[str, str]] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
    "model_context_window_exceeded": "length",
}
# Chat finish_reason -> Anthropic stop_reason; anything else is end_turn.
STOP_REASON_BY_FINISH: Final[Mapping[str, str]] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# Anthropic tool_choice type <-> Chat tool_choice string.
CHAT_TOOL_CHOICE_BY_TYPE: Final[Mapping[str, str]] = {"auto": "auto", "any": "required", "none": "none"}
TOOL_CHOICE_TYPE_BY_CHAT: Final[Mapping[str, str]] = {v: k for k, v in CHAT_TOOL_CHOICE_BY_TYPE.items()}
# HTTP status -> Anthropic error type (Anthropic's own table).
ERROR_TYPE_BY_STATUS: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
STATUS_BY_ERROR_TYPE: Final[Mapping[str, int]] = {v: k for k, v in ERROR_TYPE_BY_STATUS.items()}
OVERLOADED_STATUS: Final = 529

_TOOL_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
_REASONING_BUDGETS: Final = (("low", 1024), ("medium", 4096), ("high", 16384))


def finish_reason(stop_reason: str | None) -> str | None:
    """Chat's finish_reason for an Anthropic stop_reason (None stays None)."""
    if stop_reason is None:
        return None
    return FINISH_BY_STOP_REASON.get(stop_reason, "stop")


def stop_reason(finish: str | None) -> str:
    return STOP_REASON_BY_FINISH.get(finish or "stop", "end_turn")


def _bad(message: str, param: str | None) -> GatewayError:
    return GatewayError.bad_request(message, param, "invalid_request")


def _kind(value: Any) -> str:
    return type(value).__name__ if value is not None else "null"


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def tool_use_id(chat_id: str | None) -> str:
    """A Chat tool-call id as Anthropic accepts it (^[a-zA-Z0-9_-]+$): kept when it fits,
    else rewritten stably (the same id always maps to the same one)."""
    if chat_id and _TOOL_ID.match(chat_id):
        return chat_id
    if not chat_id:
        return "toolu_" + uuid.uuid4().hex[:24]
    return "toolu_" + hashlib.sha256(chat_id.encode()).hexdigest()[:24]


def message_id(chat_id: str | None) -> str:
    if chat_id and chat_id.startswith("msg_") and _TOOL_ID.match(chat_id):
        return chat_id
    if chat_id:
        return "msg_" + hashlib.sha256(chat_id.encode()).hexdigest()[:24]
    return "msg_" + uuid.uuid4().hex[:24]


# --- usage ----------------------------------------------------------------------------


def chat_usage(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """Anthropic usage -> Chat usage: prompt_tokens is the whole input (uncached, cache
    reads and cache writes), cache reads also in prompt_tokens_details.cached_tokens;
    cache writes (no Chat field) as cache_creation_input_tokens beside them."""
    usage = usage or {}
    fresh = _int(usage.get("input_tokens"))
    read = _int(usage.get("cache_read_input_tokens"))
    written = _int(usage.get("cache_creation_input_tokens"))
    output = _int(usage.get("output_tokens"))
    prompt = fresh + read + written
    result: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": read},
    }
    if read or written:
        result["cache_read_input_tokens"] = read
        result["cache_creation_input_tokens"] = written
    return result


def anthropic_usage(usage: Mapping[str, Any] | None) -> dict[str, int]:
    """Chat usage -> Anthropic usage, without counting cached tokens twice:
    input_tokens = prompt - cache reads - cache writes."""
    usage = usage or {}
    details = usage.get("prompt_tokens_details")
    read = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    read = read or _int(usage.get("cache_read_input_tokens"))
    written = _int(usage.get("cache_creation_input_tokens"))
    prompt = _int(usage.get("prompt_tokens"))
    return {
        "input_tokens": max(0, prompt - read - written),
        "output_tokens": _int(usage.get("completion_tokens")),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": read,
    }


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


# --- errors ---------------------------------------------------------------------------


def anthropic_error(err: GatewayError) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of a gateway error in Anthropic's shape and statuses: our 503
    `overloaded` (and an upstream's overloaded_error) is 529, which Anthropic's clients
    retry; budget and rate refusals are 429 rate_limit_error."""
    status = err.status
    if err.type == "overloaded_error" or (status == 503 and err.code == "overloaded"):
        status, kind = OVERLOADED_STATUS, "overloaded_error"
    elif status in (400, 422):
        status, kind = 400, "invalid_request_error"
    elif status in ERROR_TYPE_BY_STATUS:
        kind = ERROR_TYPE_BY_STATUS[status]
    elif status == 408:
        kind = "timeout_error"
    elif status < 500:
        kind = "invalid_request_error"
    else:
        kind = "api_error"
    return status, error_body(kind, err.message)


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_from_anthropic(status: int, body: bytes | Mapping[str, Any] | None) -> GatewayError:
    """An Anthropic error (an HTTP error body, or an `error` event's data) as the gateway's
    error: 529/overloaded_error becomes our 503 `overloaded` (another instance may serve),
    its other types keep their status. A connector decides retries and credential failures
    (401/403 of the gateway's own key) itself."""
    data: Any = body
    if isinstance(body, (bytes, bytearray)):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
    error = data.get("error") if isinstance(data, Mapping) else None
    kind = str(error.get("type") or "") if isinstance(error, Mapping) else ""
    message = str(error.get("message") or "") if isinstance(error, Mapping) else ""
    if not status:
        status = STATUS_BY_ERROR_TYPE.get(kind, 500)
    message = message or f"The Anthropic upstream failed with HTTP {status}."
    if status == OVERLOADED_STATUS or kind == "overloaded_error":
        return GatewayError(503, message, "service_unavailable", "overloaded")
    if status == 429:
        return GatewayError(429, message, "rate_limit_error", "rate_limit_exceeded")
    if status >= 500:
        return GatewayError(502, message, "upstream_error", kind or "upstream_error")
    return GatewayError(status, message, "invalid_request_error", kind or None)


# --- SSE ------------------------------------------------------------------------------


class SseParser:
    """Server-sent events from bytes as they arrive, split anywhere: (event, data) pairs.
    Accepts `data:` with or without its space, CRLF/CR/LF line ends, comments, and
    several data lines per event (joined by newlines, as the SSE spec says)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        self._buffer += chunk
        events: list[tuple[str, bytes]] = []
        while True:
            line, ending = self._next_line()
            if ending is None:
                return events
            if not line:
                if self._data:
                    events.append((self._event or "message", b"\n".join(self._data)))
                self._event, self._data = "", []
                continue
            if line.startswith(b":"):
                continue
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"event":
                self._event = value.decode("utf-8", "replace")
            elif name == b"data":
                self._data.append(value)

    def _next_line(self) -> tuple[bytes, bytes | None]:
        buffer = self._buffer
        for i, byte in enumerate(buffer):
            if byte == 0x0A:  # \n
                self._buffer = buffer[i + 1 :]
                return buffer[:i], b"\n"
            if byte == 0x0D:  # \r, perhaps the first half of \r\n
                if i + 1 == len(buffer):
                    return b"", None  # wait: \r\n may be split across chunks
                self._buffer = buffer[i + 2 :] if buffer[i + 1] == 0x0A else buffer[i + 1 :]
                return buffer[:i], b"\r"
        return b"", None

    def close(self) -> list[tuple[str, bytes]]:
        """The stream ended: an event not followed by its blank line still counts."""
        events = self.feed(b"\n\n") if self._buffer or self._data else []
        return events


def sse_frame(event: Mapping[str, Any]) -> bytes:
    """One Anthropic event as its SSE frame: `event: <type>`, then its data on one line."""
    return b"event: " + str(event["type"]).encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


# --- outbound: Chat request -> Anthropic request (the connector) -----------------------

# Chat fields with no Anthropic equivalent that change the answer: refused when set.
_CHAT_REFUSED: Final[Mapping[str, str]] = {
    "logprobs": "log probabilities",
    "top_logprobs": "log probabilities",
    "logit_bias": "logit bias",
    "audio": "audio output",
    "modalities": "output modalities",
    "prediction": "predicted outputs",
    "web_search_options": "web search options",
    "functions": "legacy functions (use tools)",
    "function_call": "legacy function_call (use tool_choice)",
}
# Chat fields that do not change the answer here (or are best effort in OpenAI's own API).
_CHAT_IGNORED: Final = frozenset(
    {
        "model",
        "messages",
        "stream_options",
        "seed",
        "store",
        "service_tier",
        "metadata",
        "prompt_cache_key",
        "safety_identifier",
        "parallel_tool_calls",
        "clawdbot",
        "mock",
        "user",
        "n",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "tools",
        "tool_choice",
        "reasoning_effort",
        "response_format",
        "temperature",
        "top_p",
        "top_k",
        "stream",
        "presence_penalty",
        "frequency_penalty",
    }
)


def chat_to_anthropic(body: Mapping[str, Any], default_max_tokens: int = DEFAULT_MAX_TOKENS) -> dict[str, Any]:
    """A Chat Completions request as an Anthropic Messages request (the model name as the
    caller gave it: the connector puts the upstream's). GatewayError 400 naming the field
    for what Anthropic cannot do (n > 1, logprobs, audio, non-function tools, ...)."""
    for name, what in _CHAT_REFUSED.items():
        value = body.get(name)
        if value not in (None, False, {}, []):
            raise _bad(f"'{name}' ({what}) cannot be served by an Anthropic model.", name)
    n = body.get("n")
    if n not in (None, 1):
        raise _bad("'n' must be 1: an Anthropic model gives one answer a request.", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise _bad(f"'{name}' cannot be served by an Anthropic model.", name)
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        raise _bad(
            f"'response_format' of type '{response_format.get('type')}' cannot be served by an Anthropic model.",
            "response_format.type",
        )
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _bad("'messages' must be an array.", "messages")
    system, turns = _chat_messages_to_anthropic(messages)
    out: dict[str, Any] = {"model": body.get("model", ""), "messages": turns}
    if system:
        out["system"] = system
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    given = isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0
    out["max_tokens"] = max_tokens if given else default_max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = list(stop)
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("stream") is True:
        out["stream"] = True
    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    tools = body.get("tools")
    if tools:
        out["tools"] = _chat_tools_to_anthropic(tools)
    choice = _chat_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None:
        out["tool_choice"] = choice
    effort = body.get("reasoning_effort")
    if effort not in (None, "none", "minimal"):
        budget = dict(_REASONING_BUDGETS).get(str(effort))
        if budget is None:
            raise _bad(f"Unknown 'reasoning_effort': {effort!r}.", "reasoning_effort")
        # Anthropic wants the thinking budget below max_tokens: room is made when the
        # caller set no cap, refused when its cap leaves none.
        if not given:
            out["max_tokens"] = budget + default_max_tokens
        elif out["max_tokens"] <= 1024:
            raise _bad("'max_tokens' must exceed 1024 for reasoning on an Anthropic model.", "max_tokens")
        out["thinking"] = {"type": "enabled", "budget_tokens": min(budget, out["max_tokens"] - 1)}
    return out


def _chat_tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    result: dict[str, Any] | None
    if choice is None:
        result = None
    elif isinstance(choice, str):
        if choice not in TOOL_CHOICE_TYPE_BY_CHAT:
            raise _bad(f"Unknown 'tool_choice': {choice!r}.", "tool_choice")
        result = {"type": TOOL_CHOICE_TYPE_BY_CHAT[choice]}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str) or not name:
            raise _bad("'tool_choice.function.name' is required.", "tool_choice.function.name")
        result = {"type": "tool", "name": name}
    else:
        raise _bad("'tool_choice' must be 'auto', 'none', 'required' or a function.", "tool_choice")
    if parallel is False:
        result = result or {"type": "auto"}
        if result["type"] != "none":
            result["disable_parallel_tool_use"] = True
    return result


def _chat_tools_to_anthropic(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("'tools' must be an array.", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else _kind(tool)
            raise _bad(f"Tool type {kind!r} cannot be served by an Anthropic model.", f"tools[{i}].type")
        function = tool.get("function") or {}
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise _bad("A tool needs a name.", f"tools[{i}].function.name")
        converted: dict[str, Any] = {
            "name": name,
            "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
        }
        if function.get("description"):
            converted["description"] = function["description"]
        if isinstance(tool.get("cache_control"), dict):
            converted["cache_control"] = tool["cache_control"]
        out.append(converted)
    return out


def _chat_messages_to_anthropic(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, turns). System and developer messages, wherever they are (coding
    agents put some mid-conversation), join the system prompt in order; consecutive
    messages of one role merge, tool results first, as Anthropic requires."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            previous = turns[-1]["content"]
            if role == "user" and blocks[0]["type"] == "tool_result":
                # Tool results open a user turn: ahead of text merged in earlier.
                results = [b for b in previous if b["type"] == "tool_result"]
                others = [b for b in previous if b["type"] != "tool_result"]
                turns[-1]["content"] = results + blocks + others
            else:
                previous.extend(blocks)
            return
        turns.append({"role": role, "content": blocks})

    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"'{where}' must be an object.", where)
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system.extend(_chat_parts_to_blocks(content, f"{where}.content", text_only=True))
        elif role == "user":
            add("user", _chat_parts_to_blocks(content, f"{where}.content"))
        elif role == "assistant":
            blocks = _chat_parts_to_blocks(content, f"{where}.content", text_only=True)
            for j, call in enumerate(message.get("tool_calls") or ()):
                blocks.append(_chat_tool_call_to_block(call, f"{where}.tool_calls[{j}]"))
            if not blocks and turns:
                continue  # an empty assistant turn (Anthropic refuses empty content)
            add("assistant", blocks or [{"type": "text", "text": ""}])
        elif role == "tool":
            result: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": tool_use_id(message.get("tool_call_id")),
                "content": _chat_parts_to_blocks(content, f"{where}.content", text_only=True)
                if isinstance(content, list)
                else (content or ""),
            }
            add("user", [result])
        else:
            raise _bad(f"Role {role!r} cannot be served by an Anthropic model.", f"{where}.role")
    return system, turns


def _chat_tool_call_to_block(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise _bad("Only function tool calls can be sent to an Anthropic model.", f"{where}.type")
    function = call.get("function") or {}
    arguments = function.get("arguments") or "{}"
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) else arguments
    except orjson.JSONDecodeError:
        raise _bad("The tool call's arguments are not valid JSON.", f"{where}.function.arguments") from None
    if not isinstance(parsed, dict):
        raise _bad("The tool call's arguments must be a JSON object.", f"{where}.function.arguments")
    return {"type": "tool_use", "id": tool_use_id(call.get("id")), "name": function.get("name", ""), "input": parsed}


def _chat_parts_to_blocks(content: Any, where: str, text_only: bool = False) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise _bad(f"'{where}' must be a string or an array of parts.", where)
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        block: dict[str, Any]
        if kind in ("text", "refusal"):
            block = {"type": "text", "text": part.get(kind) or ""}
        elif kind == "image_url" and not text_only:
            block = {"type": "image", "source": _image_source(part.get("image_url"), at)}
        elif kind == "file" and not text_only:
            block = _file_block(part.get("file"), at)
        else:
            raise _bad(f"Content part type {kind!r} cannot be sent to an Anthropic model here.", f"{at}.type")
        if isinstance(part.get("cache_control"), dict):
            block["cache_control"] = part["cache_control"]
        blocks.append(block)
    return blocks


def _data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a base64 data: URL."""
    if not url.startswith("data:"):
        return None
    head, sep, data = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        return None
    return head[: -len(";base64")], data


def _image_source(image: Any, where: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise _bad("An image part needs a url.", f"{where}.image_url.url")
    inline = _data_url(url)
    if inline is not None:
        return {"type": "base64", "media_type": inline[0], "data": inline[1]}
    if url.startswith(("http://", "https://")):
        return {"type": "url", "url": url}
    raise _bad("An image url must be http(s) or a base64 data: URL.", f"{where}.image_url.url")


def _file_block(file: Any, where: str) -> dict[str, Any]:
    data = file.get("file_data") if isinstance(file, dict) else None
    inline = _data_url(data) if isinstance(data, str) else None
    if inline is None or inline[0] != "application/pdf":
        raise _bad("Only inline PDF files (file_data as a data: URL) can be sent to an Anthropic model.", where)
    block: dict[str, Any] = {
        "type": "document",
        "source": {"type": "base64", "media_type": inline[0], "data": inline[1]},
    }
    if isinstance(file, dict) and isinstance(file.get("filename"), str):
        block["title"] = file["filename"]
    return block


# --- outbound: Anthropic Message -> Chat response (the connector) ----------------------


def message_to_chat(message: Mapping[str, Any], model: str | None = None) -> dict[str, Any]:
    """An Anthropic Message as a chat.completion: text blocks joined into content,
    tool_use blocks as tool_calls, thinking as reasoning_content, the stop reason and
    usage mapped (cache reads in prompt_tokens_details.cached_tokens)."""
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text") or ""))
        elif kind == "tool_use":
            calls.append(
                {
                    "id": str(block.get("id") or ""),
                    "type": "function",
                    "function": {"name": str(block.get("name") or ""), "arguments": _dumps(block.get("input") or {})},
                }
            )
        elif kind == "thinking":
            thinking.append(str(block.get("thinking") or ""))
        # redacted_thinking carries nothing a Chat caller can read; server tool blocks only
        # come back for server tools, which chat_to_anthropic never sends.
    chat_message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        chat_message["tool_calls"] = calls
    if thinking:
        chat_message["reasoning_content"] = "".join(thinking)
    reason = finish_reason(message.get("stop_reason")) or "stop"
    return {
        "id": str(message.get("id") or message_id(None)),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model or str(message.get("model") or ""),
        "choices": [{"index": 0, "message": chat_message, "logprobs": None, "finish_reason": reason}],
        "usage": chat_usage(message.get("usage")),
    }


# --- outbound: Anthropic events -> Chat chunks (the connector) -------------------------


@dataclass
class AnthropicChunkDecoder:
    """Anthropic stream events (each event's data, parsed) -> chat.completion.chunk dicts.

    Text deltas become content, input_json_delta tool arguments (the tool's id and name
    on its first delta, keyed by a tool index counted from 0), thinking deltas
    reasoning_content; message_delta's stop_reason the finish_reason; the usage chunk
    (choices: []) follows at message_stop when include_usage. An `error` event raises
    the GatewayError it describes (error_from_anthropic)."""

    model: str = ""
    include_usage: bool = True
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    done: bool = False
    _usage: dict[str, Any] = field(default_factory=dict)
    _tools: dict[int, int] = field(default_factory=dict)  # block index -> tool index
    _finish: str | None = None

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": []
            if delta is None
            else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        chunk.update(extra)
        return chunk

    def feed(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if self.done:
            return []
        if kind == "message_start":
            message = event.get("message") or {}
            self.id = self.id or str(message.get("id") or message_id(None))
            self.model = self.model or str(message.get("model") or "")
            self._usage.update(message.get("usage") or {})
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                tool = len(self._tools)
                self._tools[int(event.get("index", 0))] = tool
                call = {
                    "index": tool,
                    "id": str(block.get("id") or ""),
                    "type": "function",
                    "function": {"name": str(block.get("name") or ""), "arguments": ""},
                }
                return [self._chunk({"tool_calls": [call]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            delta_type = delta.get("type")
            if delta_type == "text_delta" and delta.get("text"):
                return [self._chunk({"content": delta["text"]})]
            if delta_type == "input_json_delta" and delta.get("partial_json"):
                found = self._tools.get(int(event.get("index", 0)))
                if found is None:
                    raise GatewayError(502, "The Anthropic stream sent tool input for no tool block.", "upstream_error")
                call = {"index": found, "function": {"arguments": delta["partial_json"]}}
                return [self._chunk({"tool_calls": [call]})]
            if delta_type == "thinking_delta" and delta.get("thinking"):
                return [self._chunk({"reasoning_content": delta["thinking"]})]
            return []  # signature_delta, citations_delta: nothing a Chat caller reads
        if kind == "message_delta":
            # Usage in message_delta is cumulative: set, never add.
            self._usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            reason = (event.get("delta") or {}).get("stop_reason")
            if reason:
                self._finish = finish_reason(reason)
                return [self._chunk({}, self._finish)]
            return []
        if kind == "message_stop":
            self.done = True
            chunks = []
            if self._finish is None:
                chunks.append(self._chunk({}, "stop"))
            if self.include_usage:
                chunks.append(self._chunk(None, usage=chat_usage(self._usage)))
            return chunks
        if kind == "error":
            self.done = True
            raise error_from_anthropic(0, event)
        return []  # ping, and event types added later

    @property
    def usage(self) -> dict[str, Any]:
        """The usage so far, in Chat's terms."""
        return chat_usage(self._usage)


# --- inbound: Messages request -> Chat request (the adapter) ---------------------------

# Fields that change how Anthropic serves a request, not what the answer says (top-level
# and per-block cache_control, speed, service_tier, inference_geo, diagnostics,
# workspace_id, user_profile_id) travel in native_json and have nothing to become in Chat.
# Fields only an Anthropic upstream can serve: refused unless the request is served natively.
_NATIVE_ONLY_FIELDS: Final[Mapping[str, str]] = {
    "container": "containers",
    "mcp_servers": "MCP servers",
    "context_management": "context management",
}
# output_config.effort -> reasoning_effort (Chat's scale stops at high).
_EFFORT: Final[Mapping[str, str]] = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
_REASONING_EFFORT_BY_BUDGET: Final = ((2048, "low"), (8192, "medium"))


def _require_type(value: Any, types: tuple[type, ...], param: str, expected: str) -> Any:
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise _bad(f"{param}: Input should be {expected}", param)
    return value


def messages_to_chat(body: Mapping[str, Any], native_only_ok: bool = False) -> dict[str, Any]:
    """A Messages request as a Chat Completions request. GatewayError 400 naming the field
    (in Anthropic's wording) for a missing model, max_tokens or messages, wrong types, and
    for what Chat cannot carry (document blocks, server tools, ...). With native_only_ok
    (every instance of the model speaks Anthropic natively, so native_json is what will be
    sent) those are left out of the translation instead of refused."""
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            raise _bad(f"{name}: Field required", name)
    model = _require_type(body["model"], (str,), "model", "a valid string")
    max_tokens = _require_type(body["max_tokens"], (int,), "max_tokens", "a valid integer")
    if max_tokens < 1:
        raise _bad("max_tokens: Input should be greater than or equal to 1", "max_tokens")
    messages = _require_type(body["messages"], (list,), "messages", "a valid list")
    if not native_only_ok:
        for name, what in _NATIVE_ONLY_FIELDS.items():
            if body.get(name) is not None:
                raise _bad(f"{name}: {what} are only served by an Anthropic model.", name)
    chat: dict[str, Any] = {"model": model, "max_tokens": max_tokens}
    chat_messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        text = _system_text(system, native_only_ok)
        if text:
            chat_messages.append({"role": "system", "content": text})
    for i, message in enumerate(messages):
        chat_messages.extend(_message_to_chat(message, f"messages.{i}", native_only_ok))
    chat["messages"] = chat_messages
    stream = body.get("stream")
    if stream is not None:
        _require_type(stream, (bool,), "stream", "a valid boolean")
        chat["stream"] = stream
        if stream:
            # Usage (and the stop event held for it) needs the final usage chunk.
            chat["stream_options"] = {"include_usage": True}
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop_sequences: Input should be a valid list of strings", "stop_sequences")
        if stops:
            chat["stop"] = stops
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            chat[name] = _require_type(body[name], (int, float), name, "a valid number")
    if body.get("top_k") is not None:
        # No OpenAI field; vLLM, llama.cpp and the local worker take top_k as is.
        chat["top_k"] = _require_type(body["top_k"], (int,), "top_k", "a valid integer")
    metadata = body.get("metadata")
    if metadata is not None:
        _require_type(metadata, (dict,), "metadata", "a valid dictionary")
        user = metadata.get("user_id")
        if user is not None:
            chat["user"] = _require_type(user, (str,), "metadata.user_id", "a valid string")
    tools = body.get("tools")
    if tools is not None:
        converted = _tools_to_chat(_require_type(tools, (list,), "tools", "a valid list"), native_only_ok)
        if converted:
            chat["tools"] = converted
    choice = body.get("tool_choice")
    if choice is not None:
        chat.update(_tool_choice_to_chat(choice))
    thinking = body.get("thinking")
    if thinking is not None:
        effort = _thinking_to_effort(thinking)
        if effort:
            chat["reasoning_effort"] = effort
    output_config = body.get("output_config")
    if output_config is not None:
        chat.update(
            _output_config_to_chat(_require_type(output_config, (dict,), "output_config", "a valid dictionary"))
        )
    if body.get("output_format") is not None:  # the structured-outputs beta's spelling
        chat.update(_output_config_to_chat({"format": body["output_format"]}, "output_format"))
    if isinstance(body.get("clawdbot"), dict):
        chat["clawdbot"] = body["clawdbot"]  # gateway options (strategy), as on Chat
    return chat


def _system_text(system: Any, native_only_ok: bool) -> str:
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise _bad("system: Input should be a valid string or a list of text blocks", "system")
    texts = []
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise _bad(f"system.{i}: Input should be a text block", f"system.{i}")
        # cache_control is a hint for Anthropic's prompt cache; it travels in native_json.
        texts.append(block["text"])
    return "\n".join(texts)


def _message_to_chat(message: Any, where: str, native_only_ok: bool) -> list[dict[str, Any]]:
    if not isinstance(message, dict):
        raise _bad(f"{where}: Input should be a valid dictionary", where)
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise _bad(f"{where}.role: Input should be 'user' or 'assistant'", f"{where}.role")
    if "content" not in message:
        raise _bad(f"{where}.content: Field required", f"{where}.content")
    content = message["content"]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _bad(f"{where}.content: Input should be a valid string or list", f"{where}.content")
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if not isinstance(block, dict):
            raise _bad(f"{at}: Input should be a valid dictionary", at)
        if kind == "text":
            parts.append({"type": "text", "text": _require_type(block.get("text"), (str,), f"{at}.text", "a string")})
        elif kind == "image" and role == "user":
            parts.append(
                {"type": "image_url", "image_url": {"url": _image_url(block.get("source"), at, native_only_ok)}}
            )
        elif kind == "tool_use" and role == "assistant":
            name = _require_type(block.get("name"), (str,), f"{at}.name", "a valid string")
            call_id = _require_type(block.get("id"), (str,), f"{at}.id", "a valid string")
            arguments = block.get("input", {})
            calls.append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": _dumps(arguments)}}
            )
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result_to_chat(block, at, native_only_ok))
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            # Earlier turns' thinking: Anthropic itself leaves it out of the context, and
            # its signature means nothing to another model.
            continue
        elif native_only_ok:
            continue  # documents, server tool blocks, ...: native_json carries them
        elif kind == "document":
            raise _bad(f"{at}.type: document blocks are only served by an Anthropic model.", f"{at}.type")
        else:
            raise _bad(
                f"{at}.type: {kind!r} blocks in a {role} message cannot be translated for this model.", f"{at}.type"
            )
    out: list[dict[str, Any]] = list(results)
    if role == "assistant":
        text = "".join(part["text"] for part in parts)
        assistant: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            assistant["tool_calls"] = calls
        out.append(assistant)
    elif parts:
        only_text = all(part["type"] == "text" for part in parts)
        out.append({"role": "user", "content": "".join(p["text"] for p in parts) if only_text else parts})
    elif not results:
        out.append({"role": role, "content": ""})
    return out


def _tool_result_to_chat(block: dict[str, Any], at: str, native_only_ok: bool) -> dict[str, Any]:
    tool_id = _require_type(block.get("tool_use_id"), (str,), f"{at}.tool_use_id", "a valid string")
    content = block.get("content", "")
    if isinstance(content, list):
        texts = []
        for k, inner in enumerate(content):
            if isinstance(inner, dict) and inner.get("type") == "text":
                texts.append(str(inner.get("text") or ""))
            elif not native_only_ok:
                kind = inner.get("type") if isinstance(inner, dict) else _kind(inner)
                raise _bad(
                    f"{at}.content.{k}: {kind!r} blocks in a tool result cannot be translated.", f"{at}.content.{k}"
                )
        content = "\n".join(texts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise _bad(f"{at}.content: Input should be a valid string or list", f"{at}.content")
    if block.get("is_error") is True:
        # Chat has no error flag on a tool result: the model reads it in the text.
        content = f"Error: {content}"
    return {"role": "tool", "tool_call_id": tool_id, "content": content}


def _image_url(source: Any, at: str, native_only_ok: bool) -> str:
    if not isinstance(source, dict):
        raise _bad(f"{at}.source: Field required", f"{at}.source")
    kind = source.get("type")
    if kind == "base64":
        media = _require_type(source.get("media_type"), (str,), f"{at}.source.media_type", "a valid string")
        data = _require_type(source.get("data"), (str,), f"{at}.source.data", "a valid string")
        return f"data:{media};base64,{data}"
    if kind == "url":
        return str(_require_type(source.get("url"), (str,), f"{at}.source.url", "a valid string"))
    if native_only_ok:
        return ""
    raise _bad(
        f"{at}.source.type: image sources of type {kind!r} are only served by an Anthropic model.", f"{at}.source.type"
    )


def _tools_to_chat(tools: list[Any], native_only_ok: bool) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        at = f"tools.{i}"
        if not isinstance(tool, dict):
            raise _bad(f"{at}: Input should be a valid dictionary", at)
        kind = tool.get("type")
        # Coding agents send custom tools without `type`.
        if kind not in (None, "custom"):
            if native_only_ok:
                continue
            raise _bad(f"{at}.type: server tool {kind!r} is only served by an Anthropic model.", f"{at}.type")
        name = _require_type(tool.get("name"), (str,), f"{at}.name", "a valid string")
        schema = tool.get("input_schema")
        if schema is None:
            raise _bad(f"{at}.input_schema: Field required", f"{at}.input_schema")
        function: dict[str, Any] = {"name": name, "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice_to_chat(choice: Any) -> dict[str, Any]:
    if not isinstance(choice, dict):
        raise _bad("tool_choice: Input should be a valid dictionary", "tool_choice")
    kind = choice.get("type")
    out: dict[str, Any]
    if kind == "tool":
        name = _require_type(choice.get("name"), (str,), "tool_choice.name", "a valid string")
        out = {"tool_choice": {"type": "function", "function": {"name": name}}}
    elif isinstance(kind, str) and kind in CHAT_TOOL_CHOICE_BY_TYPE:
        out = {"tool_choice": CHAT_TOOL_CHOICE_BY_TYPE[kind]}
    else:
        raise _bad("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'", "tool_choice.type")
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        out["parallel_tool_calls"] = False
    return out


def _output_config_to_chat(config: dict[str, Any], where: str = "output_config") -> dict[str, Any]:
    out: dict[str, Any] = {}
    effort = config.get("effort")
    if effort is not None:
        if effort not in _EFFORT:
            raise _bad(f"{where}.effort: Input should be 'low', 'medium', 'high', 'xhigh' or 'max'", f"{where}.effort")
        out["reasoning_effort"] = _EFFORT[effort]
    fmt = config.get("format") if where == "output_config" else config["format"]
    if fmt is not None:
        at = f"{where}.format" if where == "output_config" else where
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise _bad(f"{at}: Input should be a json_schema format with a schema", at)
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True},
        }
    return out


def _thinking_to_effort(thinking: Any) -> str | None:
    if not isinstance(thinking, dict):
        raise _bad("thinking: Input should be a valid dictionary", "thinking")
    kind = thinking.get("type")
    if kind == "disabled":
        return None
    if kind in ("adaptive", "between_tools"):
        return "medium"
    if kind != "enabled":
        raise _bad(
            "thinking.type: Input should be 'enabled', 'adaptive', 'between_tools' or 'disabled'", "thinking.type"
        )
    budget = _require_type(thinking.get("budget_tokens"), (int,), "thinking.budget_tokens", "a valid integer")
    for ceiling, effort in _REASONING_EFFORT_BY_BUDGET:
        if budget < ceiling:
            return effort
    return "high"


# --- inbound: Chat response -> Anthropic Message (the adapter) --------------------------


def _tool_input(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        # The model wrote arguments that are not a JSON object: the caller's tool gets an
        # empty input (and the model its error) rather than the whole turn failing.
        log.warning("tool call arguments are not a JSON object", extra={"arguments": str(arguments)[:200]})
        return {}
    return parsed


def chat_to_message(completion: Mapping[str, Any], model: str | None = None) -> dict[str, Any]:
    """A chat.completion as an Anthropic Message: reasoning as a thinking block, content as
    a text block, tool calls as tool_use blocks; stop_reason tool_use whenever a tool was
    called; usage without cached tokens counted twice."""
    choices = completion.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    if isinstance(text, list):
        text = "".join(str(p.get("text") or "") for p in text if isinstance(p, dict))
    if text:
        content.append({"type": "text", "text": text})
    elif message.get("refusal"):
        content.append({"type": "text", "text": str(message["refusal"])})
    calls = message.get("tool_calls") or ()
    for call in calls:
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": tool_use_id(call.get("id")),
                "name": str(function.get("name") or ""),
                "input": _tool_input(function.get("arguments")),
            }
        )
    finish = choice.get("finish_reason")
    reason = "tool_use" if calls and finish != "length" else stop_reason(finish)
    return {
        "id": message_id(completion.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model or str(completion.get("model") or ""),
        "content": content,
        "stop_reason": reason,
        "stop_sequence": None,
        "usage": anthropic_usage(completion.get("usage")),
    }


def message_events(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A whole Anthropic Message as the events that stream it (a cached native answer
    replayed to a streaming caller)."""
    usage = dict(message.get("usage") or {})
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 0},
    }
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}, {"type": "ping"}]
    for index, block in enumerate(message.get("content") or ()):
        kind = block.get("type")
        if kind == "text":
            opened, deltas = {**block, "text": ""}, [{"type": "text_delta", "text": block.get("text", "")}]
        elif kind == "tool_use":
            opened = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": _dumps(block.get("input") or {})}]
        elif kind == "thinking":
            opened = {**block, "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": block.get("thinking", "")}]
            if block.get("signature"):
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
        else:
            opened, deltas = dict(block), []
        events.append({"type": "content_block_start", "index": index, "content_block": opened})
        events.extend({"type": "content_block_delta", "index": index, "delta": d} for d in deltas)
        events.append({"type": "content_block_stop", "index": index})
    events.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": message.get("stop_reason"), "stop_sequence": message.get("stop_sequence")},
            "usage": usage,
        }
    )
    events.append({"type": "message_stop"})
    return events


# --- inbound: Chat chunks -> Anthropic events (the adapter) -----------------------------


@dataclass
class _Block:
    index: int
    kind: str  # text | thinking | tool_use
    tool: int = -1  # the Chat tool index, for tool_use
    call_id: str = ""


class MessagesStreamEncoder:
    """Chat chunks -> Anthropic's stream events, with the grammar kept as a state machine:

    message_start exactly once and first (also when the first chunk is a tool call), a
    ping after it; blocks opened, filled and stopped one at a time with distinct, ordered
    indices (a delta always matches its block's type); message_delta (stop_reason, and
    usage: cumulative, set from the final usage chunk, so the stop is held until the
    stream ends) and message_stop last; an `error` event ends it too; nothing after."""

    def __init__(self, model: str, message_id_: str | None = None, input_tokens: int = 0) -> None:
        self._model = model
        self._id = message_id_ or message_id(None)
        self._input_tokens = input_tokens
        self._started = False
        self._closed = False
        self._open: _Block | None = None
        self._next_index = 0
        self._tools: dict[int, _Block] = {}
        self._used_tools = False
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> list[dict[str, Any]]:
        """message_start and a ping (a no-op once started)."""
        if self._started or self._closed:
            return []
        self._started = True
        message: dict[str, Any] = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self._input_tokens,
                "output_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def _stop_open(self) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        index = self._open.index
        self._open = None
        return [{"type": "content_block_stop", "index": index}]

    def _open_block(
        self, kind: str, content_block: dict[str, Any], tool: int = -1
    ) -> tuple[_Block, list[dict[str, Any]]]:
        events = self._stop_open()
        block = _Block(self._next_index, kind, tool, str(content_block.get("id", "")))
        self._next_index += 1
        self._open = block
        events.append({"type": "content_block_start", "index": block.index, "content_block": content_block})
        return block, events

    def _delta(self, kind: str, content_block: dict[str, Any], delta: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        block = self._open
        if block is None or block.kind != kind:
            block, events = self._open_block(kind, content_block)
        events.append({"type": "content_block_delta", "index": block.index, "delta": delta})
        return events

    def chunk(self, chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The events one Chat chunk adds (content first, then its finish_reason, which is
        held; usage is kept for message_delta)."""
        if self._closed:
            return []
        events = self.start()
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                events += self._delta(
                    "thinking",
                    {"type": "thinking", "thinking": "", "signature": ""},
                    {"type": "thinking_delta", "thinking": reasoning},
                )
            for key in ("content", "refusal"):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    events += self._delta("text", {"type": "text", "text": ""}, {"type": "text_delta", "text": text})
            for call in delta.get("tool_calls") or ():
                events += self._tool_delta(call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return events

    def _tool_delta(self, call: Mapping[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        tool = call.get("index", 0)
        function = call.get("function") or {}
        call_id = call.get("id")
        block = self._tools.get(tool)
        # A new call: its first delta (with an id), or the same index reused with another id.
        if block is None or (call_id and call_id != block.call_id and block.call_id):
            content_block = {
                "type": "tool_use",
                "id": tool_use_id(call_id),
                "name": str(function.get("name") or ""),
                "input": {},
            }
            block, events = self._open_block("tool_use", content_block, tool)
            block.call_id = str(call_id or "")
            self._tools[tool] = block
            self._used_tools = True
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            if self._open is not block:
                # Arguments for a tool whose block was stopped already (an upstream that
                # interleaves parallel calls): no grammar can carry them now.
                raise GatewayError(
                    502, "The upstream interleaved the arguments of parallel tool calls.", "upstream_error"
                )
            events.append(
                {
                    "type": "content_block_delta",
                    "index": block.index,
                    "delta": {"type": "input_json_delta", "partial_json": arguments},
                }
            )
        return events

    def finish(self) -> list[dict[str, Any]]:
        """The end of the Chat stream: the open block stopped, message_delta (stop_reason,
        usage) and message_stop. A stream that never said why it finished ends with an
        error event instead."""
        if self._closed:
            return []
        events = self.start()
        if self._finish is None:
            return events + self.error(
                GatewayError(502, "The upstream stream ended before the answer was complete.", "upstream_error")
            )
        events += self._stop_open()
        reason = "tool_use" if self._used_tools and self._finish != "length" else stop_reason(self._finish)
        usage = anthropic_usage(self._usage) if self._usage else {"output_tokens": 0}
        if not self._usage:
            usage["input_tokens"] = self._input_tokens
        events.append(
            {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": None}, "usage": usage}
        )
        events.append({"type": "message_stop"})
        self._closed = True
        return events

    def error(self, err: GatewayError) -> list[dict[str, Any]]:
        """A failure after the stream began: the `error` event, and nothing after it."""
        if self._closed:
            return []
        self._closed = True
        return [anthropic_error(err)[1]]


# --- count_tokens ----------------------------------------------------------------------

# Per image (Anthropic's cap for an image at the largest size it keeps) and per document
# page-ish; the rest is about 4 characters a token.
_IMAGE_TOKENS: Final = 1600
_CHARS_PER_TOKEN: Final = 4
_MESSAGE_OVERHEAD: Final = 4


def count_tokens_estimate(body: Mapping[str, Any]) -> int:
    """An estimate of a Messages request's input tokens, counting the system prompt, the
    tools (their JSON) and every message's blocks (images at a flat rate). GatewayError 400
    when model or messages is missing, as Anthropic answers."""
    for name in ("model", "messages"):
        if name not in body:
            raise _bad(f"{name}: Field required", name)
    _require_type(body["messages"], (list,), "messages", "a valid list")
    chars = 0
    tokens = 0
    system = body.get("system")
    if isinstance(system, str):
        chars += len(system)
    elif isinstance(system, list):
        chars += sum(len(str(b.get("text") or "")) for b in system if isinstance(b, dict))
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        chars += len(_dumps(tools))
        tokens += 300  # the tool-use preamble Anthropic adds when tools are given
    for message in body["messages"]:
        tokens += _MESSAGE_OVERHEAD
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
            continue
        for block in _walk_blocks(content):
            kind = block.get("type")
            if kind in ("image", "document"):
                source = block.get("source") or {}
                data = source.get("data") if isinstance(source, dict) else None
                # A document's text is about its base64 size over 8; an image is flat.
                if kind == "document" and isinstance(data, str):
                    tokens += max(_IMAGE_TOKENS, len(data) // 8)
                else:
                    tokens += _IMAGE_TOKENS
            elif kind == "tool_use":
                chars += len(str(block.get("name") or "")) + len(_dumps(block.get("input") or {}))
            else:
                chars += len(str(block.get("text") or block.get("thinking") or ""))
    return max(1, tokens + -(-chars // _CHARS_PER_TOKEN))


def _walk_blocks(content: Any) -> Iterable[dict[str, Any]]:
    if not isinstance(content, list):
        return
    for block in content:
        if not isinstance(block, dict):
            continue
        yield block
        if block.get("type") == "tool_result":
            inner = block.get("content")
            if isinstance(inner, str):
                yield {"type": "text", "text": inner}
            else:
                yield from _walk_blocks(inner)
