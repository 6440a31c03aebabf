"""OpenAI's Responses API on the one internal request (a Chat Completions body).

- to_chat(): a Responses request (and the stored conversation of its
  previous_response_id) -> a Chat request. What Chat cannot carry is refused with a 400
  naming the field, never dropped: hosted tools (web_search, file_search, ...), custom
  tools, background runs, conversations, prompt templates, item references.
- Turn.response(): a Chat answer -> a Response object, shaped as the openai SDK's
  types/responses/response.py reads it.
- ResponsesStream: Chat chunks -> Responses events, each with a sequence_number counted
  from 0 (as OpenAI does), items opened and closed in OpenAI's order, and a final
  response.completed / response.incomplete (or response.failed on an error). No [DONE].

Field shapes follow the openai SDK 3.54 types; the README's Responses table lists what
translates and what is refused.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from clawdbot.common.errors import GatewayError

# Stored responses live this long (per API key): OpenAI keeps them 30 days.
RESPONSE_TTL_S = 30 * 24 * 3600
# A conversation continued through previous_response_id is refused past these: its
# messages are re-sent whole on every turn, and are stored whole with each response.
MAX_HISTORY_MESSAGES = 1000
MAX_HISTORY_BYTES = 8 * 1024 * 1024

# Request fields translated into the Chat body, or owned by this module (echoed, stored).
_HANDLED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "text",
        "reasoning",
        "max_output_tokens",
        "temperature",
        "top_p",
        "metadata",
        "user",
        "stream",
        "store",
        "previous_response_id",
        "parallel_tool_calls",
        "include",
        "truncation",
        "stream_options",
        "background",
        "conversation",
        "prompt",
        "max_tool_calls",
        "top_logprobs",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
    }
)
# Passed to Chat as they are (Chat has the same field).
_SAME_IN_CHAT = (
    "temperature",
    "top_p",
    "user",
    "parallel_tool_calls",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
)
_HOSTED_TOOLS = "web_search, file_search, computer_use, code_interpreter, image_generation, mcp, shell and custom tools"


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def bad(message: str, param: str | None, code: str = "invalid_value") -> GatewayError:
    return GatewayError.bad_request(message, param, code)


def unsupported(param: str, what: str) -> GatewayError:
    return bad(f"{what} is not supported by this gateway's Responses API.", param, "unsupported_parameter")


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def wrong_type(param: str, expected: str, value: Any) -> GatewayError:
    return bad(
        f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)} instead.", param, "invalid_type"
    )


def not_found(response_id: str, param: str | None = None) -> GatewayError:
    if param == "previous_response_id":
        return GatewayError(
            404,
            f"Previous response with id '{response_id}' not found.",
            "invalid_request_error",
            "previous_response_not_found",
            "previous_response_id",
        )
    return GatewayError(
        404, f"No response found with id '{response_id}'.", "invalid_request_error", "response_not_found", param
    )


# --- request: Responses -> Chat -------------------------------------------------------------


@dataclass
class Turn:
    """One Responses request, translated: the Chat body to send, the input items it
    added (listed by input_items, stored), the conversation so far (stored so that a
    later previous_response_id continues it) and what the Response object echoes."""

    chat: dict[str, Any]
    input_items: list[dict[str, Any]]
    # The conversation without the instructions (OpenAI does not carry instructions over
    # to a continued response): the stored history plus this turn's input.
    conversation: list[dict[str, Any]]
    echo: dict[str, Any]
    response_id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def store(self) -> bool:
        return bool(self.echo["store"])

    def skeleton(self, status: str) -> dict[str, Any]:
        """The Response object before any output: what response.created carries."""
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "output": [],
            "usage": None,
            **self.echo,
        }

    def response(self, answer: dict[str, Any]) -> dict[str, Any]:
        """The Response object of a whole Chat answer."""
        choices = answer.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message") or {}
        output: list[dict[str, Any]] = []
        finish = choice.get("finish_reason")
        reason = incomplete_reason(finish)
        item_status = "incomplete" if reason else "completed"
        thinking = chat_reasoning(message)
        if thinking:
            output.append(reasoning_item(new_id("rs"), thinking, item_status))
        text = message.get("content")
        if isinstance(text, list):  # some upstreams answer parts
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        if text or message.get("refusal"):
            content: list[dict[str, Any]] = []
            if text:
                content.append(output_text(text))
            if message.get("refusal"):
                content.append({"type": "refusal", "refusal": message["refusal"]})
            output.append(message_item(new_id("msg"), content, item_status))
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            output.append(
                function_call_item(
                    new_id("fc"),
                    call.get("id") or new_id("call"),
                    function.get("name", ""),
                    function.get("arguments") or "",
                    "completed",
                )
            )
        return self.finished(output, reason, answer.get("usage"), answer.get("model"))

    def finished(
        self, output: list[dict[str, Any]], reason: str | None, usage: Any, model: Any = None
    ) -> dict[str, Any]:
        response = self.skeleton("incomplete" if reason else "completed")
        response["output"] = output
        response["incomplete_details"] = {"reason": reason} if reason else None
        response["usage"] = responses_usage(usage)
        response["completed_at"] = None if reason else int(time.time())
        if isinstance(model, str) and model:
            response["model"] = model
        return response

    def assistant_messages(self, response: dict[str, Any]) -> list[dict[str, Any]]:
        """A Response's output as the Chat messages that continue the conversation."""
        return output_to_chat(response.get("output") or [])


def incomplete_reason(finish_reason: Any) -> str | None:
    if finish_reason == "length":
        return "max_output_tokens"
    if finish_reason == "content_filter":
        return "content_filter"
    return None


def chat_reasoning(message: dict[str, Any]) -> str:
    """The reasoning text an upstream put beside a Chat message or delta: vLLM, DeepSeek
    and llama.cpp call it reasoning_content, Ollama and OpenRouter reasoning."""
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if text else []
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, content: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "arguments": arguments,
        "call_id": call_id,
        "name": name,
    }


def responses_usage(usage: Any) -> dict[str, Any] | None:
    if not isinstance(usage, dict):
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    reasoning = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": int(usage.get("total_tokens") or prompt + completion),
    }


def output_to_chat(output: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output items (message, function_call) as Chat assistant messages: a message's text
    and the function calls after it in one assistant message, as Chat expects them."""
    messages: list[dict[str, Any]] = []
    for item in output:
        if item.get("type") == "message":
            text = "".join(p.get("text", "") for p in item.get("content") or () if p.get("type") == "output_text")
            refusal = "".join(p.get("refusal", "") for p in item.get("content") or () if p.get("type") == "refusal")
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if refusal:
                message["refusal"] = refusal
            messages.append(message)
        elif item.get("type") == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item.get("arguments") or ""},
            }
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    return messages


def _text_parts(parts: list[Any], where: str, assistant: bool) -> list[dict[str, Any]] | str:
    """A message item's content parts as Chat content parts (an assistant's as text)."""
    chat_parts: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        param = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise wrong_type(param, "an object", part)
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise wrong_type(f"{param}.text", "a string", text)
            chat_parts.append({"type": "text", "text": text})
        elif kind == "refusal" and assistant:
            chat_parts.append({"type": "text", "text": str(part.get("refusal", ""))})
        elif kind == "input_image" and not assistant:
            url = part.get("image_url")
            if part.get("file_id") or not isinstance(url, str) or not url:
                raise unsupported(f"{param}.file_id", "An input_image by file_id (the Files API)")
            image: dict[str, Any] = {"url": url}
            if part.get("detail"):
                image["detail"] = part["detail"]
            chat_parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_file" and not assistant:
            if not isinstance(part.get("file_data"), str):
                raise unsupported(param, "An input_file without file_data (file_id, file_url)")
            file: dict[str, Any] = {"file_data": part["file_data"]}
            if part.get("filename"):
                file["filename"] = part["filename"]
            chat_parts.append({"type": "file", "file": file})
        else:
            raise bad(f"Invalid content part type '{kind}' in '{param}'.", f"{param}.type")
    if assistant:
        return "".join(p["text"] for p in chat_parts)
    return chat_parts


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise bad(
            f"Invalid value for '{where}.role': {role!r}. Supported values are: 'user', 'assistant', "
            "'system' and 'developer'.",
            f"{where}.role",
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise wrong_type(f"{where}.content", "a string or an array of content parts", content)
    parts = _text_parts(content, where, role == "assistant")
    if isinstance(parts, list) and len(parts) == 1 and parts[0]["type"] == "text":
        return {"role": role, "content": parts[0]["text"]}  # what every upstream takes
    return {"role": role, "content": parts}


def _tool_output(item: dict[str, Any], where: str) -> str | list[dict[str, Any]]:
    output = item.get("output")
    if isinstance(output, str):
        return output
    if not isinstance(output, list):
        raise wrong_type(where, "a string or an array of content parts", output)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(output):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            raise unsupported(f"{where}[{j}]", "A function_call_output part other than text")
        parts.append({"type": "text", "text": str(part.get("text", ""))})
    return parts


def normalize_item(item: Any, i: int) -> dict[str, Any]:
    """An input item as stored and listed: typed, with an id and a status."""
    where = f"input[{i}]"
    if not isinstance(item, dict):
        raise wrong_type(where, "an object", item)
    kind = item.get("type") or ("message" if "role" in item else None)
    if kind == "message":
        content = item.get("content")
        if isinstance(content, str):
            part_type = "output_text" if item.get("role") == "assistant" else "input_text"
            content = [{"type": part_type, "text": content}]
        return {
            "id": item.get("id") or new_id("msg"),
            "type": "message",
            "role": item.get("role"),
            "content": content,
            "status": item.get("status") or "completed",
        }
    if kind == "function_call":
        for name in ("call_id", "name", "arguments"):
            if not isinstance(item.get(name), str):
                raise wrong_type(f"{where}.{name}", "a string", item.get(name))
        return {
            "id": item.get("id") or new_id("fc"),
            "type": "function_call",
            "status": item.get("status") or "completed",
            "call_id": item["call_id"],
            "name": item["name"],
            "arguments": item["arguments"],
        }
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise wrong_type(f"{where}.call_id", "a string", item.get("call_id"))
        return {
            "id": item.get("id") or new_id("fco"),
            "type": "function_call_output",
            "status": item.get("status") or "completed",
            "call_id": item["call_id"],
            "output": item.get("output"),
        }
    if kind == "reasoning":
        # What we answered before, replayed by a client that keeps its own history.
        return {
            "id": item.get("id") or new_id("rs"),
            "type": "reasoning",
            "summary": item.get("summary") or [],
            "content": item.get("content") or [],
            "status": item.get("status") or "completed",
        }
    if kind in ("item_reference", "custom_tool_call", "custom_tool_call_output"):
        raise unsupported(f"{where}.type", f"An input item of type '{kind}'")
    if isinstance(kind, str):
        raise bad(
            f"Invalid value for '{where}.type': '{kind}' is not an input item this gateway takes.", f"{where}.type"
        )
    raise bad(f"Missing required parameter: '{where}.type'.", f"{where}.type", "missing_required_parameter")


def input_to_chat(items: list[dict[str, Any]], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normalized input items as Chat messages, after `history` (whose tool calls a
    function_call_output may answer: the stored conversation carries them)."""
    known_calls = {
        call["id"] for message in history for call in message.get("tool_calls") or () if isinstance(call, dict)
    }
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item["type"]
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "reasoning":
            continue  # Chat has no place for it in a request (README: what translates)
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            known_calls.add(item["call_id"])
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and isinstance(last.get("content"), (str, type(None))):
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:  # function_call_output
            if item["call_id"] not in known_calls:
                raise bad(
                    f"No tool call found for function call output with call_id {item['call_id']}.",
                    f"{where}.call_id",
                )
            messages.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": _tool_output(item, f"{where}.output")}
            )
    return messages


def _tools(tools: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(Chat tools, the tools as the Response echoes them)."""
    if not isinstance(tools, list):
        raise wrong_type("tools", "an array", tools)
    chat: list[dict[str, Any]] = []
    echoed: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise wrong_type(f"tools[{i}]", "an object", tool)
        kind = tool.get("type")
        if kind != "function":
            raise unsupported(f"tools[{i}].type", f"The tool type '{kind}' ({_HOSTED_TOOLS} cannot be translated)")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise bad(
                f"Missing required parameter: 'tools[{i}].name'.", f"tools[{i}].name", "missing_required_parameter"
            )
        function: dict[str, Any] = {"name": name}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        chat.append({"type": "function", "function": function})
        echoed.append(
            {
                "type": "function",
                "name": name,
                "description": tool.get("description"),
                "parameters": tool.get("parameters"),
                "strict": tool.get("strict", True),
            }
        )
    return chat, echoed


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "function" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}
        if kind == "allowed_tools" and isinstance(choice.get("tools"), list):
            allowed = []
            for tool in choice["tools"]:
                if not isinstance(tool, dict) or tool.get("type") != "function":
                    raise unsupported("tool_choice.tools", "Allowing a tool that is not a function")
                allowed.append({"type": "function", "function": {"name": tool.get("name")}})
            return {"type": "allowed_tools", "allowed_tools": {"mode": choice.get("mode", "auto"), "tools": allowed}}
        raise unsupported("tool_choice", f"A tool_choice of type '{kind}'")
    raise bad("Invalid value for 'tool_choice': expected 'auto', 'none', 'required' or an object.", "tool_choice")


def _text_format(text: Any) -> dict[str, Any] | None:
    """text.format as Chat's response_format (None for plain text)."""
    if not isinstance(text, dict):
        raise wrong_type("text", "an object", text)
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise wrong_type("text.format", "an object", fmt)
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise bad("'text.format' of type json_schema needs a 'name' and a 'schema'.", "text.format")
        schema: dict[str, Any] = {"name": fmt["name"], "schema": fmt["schema"]}
        for key in ("description", "strict"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        return {"type": "json_schema", "json_schema": schema}
    raise bad(f"Invalid value for 'text.format.type': '{kind}'.", "text.format.type")


def _refuse_untranslatable(body: dict[str, Any]) -> None:
    if body.get("background"):
        raise unsupported("background", "Background responses")
    if body.get("conversation") is not None:
        raise unsupported("conversation", "The Conversations API")
    if body.get("prompt") is not None:
        raise unsupported("prompt", "Prompt templates")
    if body.get("max_tool_calls") is not None:
        raise unsupported("max_tool_calls", "max_tool_calls")
    if body.get("top_logprobs"):
        raise unsupported("top_logprobs", "Log probabilities")
    if body.get("previous_response_id") is not None and body.get("conversation") is not None:
        raise bad("Use previous_response_id or conversation, not both.", "previous_response_id")


def to_chat(body: dict[str, Any], history: list[dict[str, Any]] | None = None) -> Turn:
    """A Responses request -> the Chat request (after `history`, the stored conversation
    of its previous_response_id). Raises GatewayError(400) naming the field at fault."""
    _refuse_untranslatable(body)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        if model is None:
            raise bad("Missing required parameter: 'model'.", "model", "missing_required_parameter")
        raise wrong_type("model", "a string", model)
    raw_input = body.get("input")
    if raw_input is None:
        raw_input = []
    if isinstance(raw_input, str):
        raw_input = [{"type": "message", "role": "user", "content": raw_input}]
    if not isinstance(raw_input, list):
        raise wrong_type("input", "a string or an array of input items", raw_input)
    items = [normalize_item(item, i) for i, item in enumerate(raw_input)]
    history = list(history or [])
    conversation = history + input_to_chat(items, history)
    if not conversation:
        raise bad("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    messages = list(conversation)
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise wrong_type("instructions", "a string", instructions)
        messages.insert(0, {"role": "system", "content": instructions})

    chat: dict[str, Any] = {"model": model, "messages": messages}
    # Unknown fields pass through as they do on Chat Completions (an upstream's own
    # extensions keep working); Responses fields are each translated or refused below.
    for key, value in body.items():
        if key not in _HANDLED:
            chat[key] = value
    for key in _SAME_IN_CHAT:
        if body.get(key) is not None:
            chat[key] = body[key]
    max_output = body.get("max_output_tokens")
    if max_output is not None:
        if isinstance(max_output, bool) or not isinstance(max_output, int):
            raise wrong_type("max_output_tokens", "an integer", max_output)
        if max_output < 1:
            raise bad(
                f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 1, but got "
                f"{max_output} instead.",
                "max_output_tokens",
                "integer_below_min_value",
            )
        chat["max_tokens"] = max_output
    echoed_tools: list[dict[str, Any]] = []
    if body.get("tools") is not None:
        chat_tools, echoed_tools = _tools(body["tools"])
        if chat_tools:
            chat["tools"] = chat_tools
    tool_choice = body.get("tool_choice")
    if tool_choice is not None:
        chat["tool_choice"] = _tool_choice(tool_choice)
    text = body.get("text")
    if text is not None:
        response_format = _text_format(text)
        if response_format is not None:
            chat["response_format"] = response_format
        if text.get("verbosity") is not None:
            chat["verbosity"] = text["verbosity"]
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise wrong_type("reasoning", "an object", reasoning)
        if reasoning.get("effort") is not None:
            chat["reasoning_effort"] = reasoning["effort"]
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict) and len(metadata) <= 16 and all(isinstance(v, str) for v in metadata.values())
    ):
        raise bad("'metadata' must be an object of at most 16 string values.", "metadata")
    store = body.get("store", True)
    if not isinstance(store, bool):
        raise wrong_type("store", "a boolean", store)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise wrong_type("stream", "a boolean", stream)
    if stream:
        chat["stream"] = True
        # The usage chunk: response.completed carries the usage.
        chat["stream_options"] = {"include_usage": True}
    echo = {
        "instructions": instructions,
        "max_output_tokens": max_output,
        "max_tool_calls": None,
        "metadata": metadata or {},
        "model": model,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": (reasoning or {}).get("effort"), "summary": (reasoning or {}).get("summary")},
        "service_tier": body.get("service_tier") or "default",
        "store": store,
        "temperature": body.get("temperature", 1.0),
        "text": {
            "format": (text or {}).get("format") or {"type": "text"},
            "verbosity": (text or {}).get("verbosity") or "medium",
        },
        "tool_choice": tool_choice if tool_choice is not None else "auto",
        "tools": echoed_tools,
        "top_logprobs": 0,
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation") or "disabled",
        "user": body.get("user"),
    }
    return Turn(chat=chat, input_items=items, conversation=conversation, echo=echo)


def check_history_bounds(size_bytes: int, messages: int) -> None:
    if messages > MAX_HISTORY_MESSAGES or size_bytes > MAX_HISTORY_BYTES:
        raise bad(
            f"The conversation is too long to continue ({messages} messages, {size_bytes} bytes; at most "
            f"{MAX_HISTORY_MESSAGES} messages and {MAX_HISTORY_BYTES} bytes): start a new one.",
            "previous_response_id",
            "conversation_too_long",
        )


def estimate_input_tokens(chat: dict[str, Any], dumps: Any) -> int:
    """An estimate (about 4 bytes of JSON per token) of the input: messages and tools."""
    sized = {key: chat[key] for key in ("messages", "tools", "response_format") if key in chat}
    return max(1, (len(dumps(sized)) + 3) // 4)


# --- streaming: Chat chunks -> Responses events -----------------------------------------------


class ResponsesStream:
    """Chat chunks in, Responses events out (dicts, each with its sequence_number).

    start() first, feed() per chunk, then finish() or fail(). Items: at most one text
    message open at a time (a tool call closes it; text after it opens a new one); each
    tool call (keyed by its Chat index, a new id on the same index opening a new one)
    keeps its output_index until finish() closes them in order."""

    def __init__(self, turn: Turn) -> None:
        self._turn = turn
        self._sequence = 0
        self._items: list[dict[str, Any]] = []  # by output_index
        self._text: int | None = None  # output_index of the open message
        self._reasoning: int | None = None  # output_index of the open reasoning item
        self._calls: dict[int, int] = {}  # Chat tool-call index -> output_index
        self._open_calls: list[int] = []
        self._finish: str | None = None
        self._usage: Any = None
        self._model: Any = None
        self.response: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self._turn.skeleton("in_progress")),
            self._event("response.in_progress", response=self._turn.skeleton("in_progress")),
        ]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        if chunk.get("model"):
            self._model = chunk["model"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            # Reasoning first: in a chunk that switches from thinking to text, both come.
            thinking = chat_reasoning(delta)
            if thinking:
                events += self._reasoning_delta(thinking)
            text = delta.get("content")
            if isinstance(text, str) and text:
                events += self._text_delta(text)
            for call in delta.get("tool_calls") or ():
                events += self._call_delta(call)
            # Content and finish_reason may share a chunk: the content went first.
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return events

    def _reasoning_delta(self, text: str) -> list[dict[str, Any]]:
        events = self._close_text("completed")
        if self._reasoning is None:
            index = len(self._items)
            item = reasoning_item(new_id("rs"), "", "in_progress")
            self._items.append(item)
            self._reasoning = index
            events.append(self._event("response.output_item.added", output_index=index, item=_copy(item)))
            item["content"].append({"type": "reasoning_text", "text": ""})
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part={"type": "reasoning_text", "text": ""},
                )
            )
        item = self._items[self._reasoning]
        item["content"][0]["text"] += text
        events.append(
            self._event(
                "response.reasoning_text.delta",
                item_id=item["id"],
                output_index=self._reasoning,
                content_index=0,
                delta=text,
            )
        )
        return events

    def _close_reasoning(self, status: str) -> list[dict[str, Any]]:
        if self._reasoning is None:
            return []
        index, self._reasoning = self._reasoning, None
        item = self._items[index]
        part = item["content"][0]
        item["status"] = status
        return [
            self._event(
                "response.reasoning_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=part["text"],
            ),
            self._event(
                "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=_copy(part)
            ),
            self._event("response.output_item.done", output_index=index, item=_copy(item)),
        ]

    def _text_delta(self, text: str) -> list[dict[str, Any]]:
        events = self._close_reasoning("completed")
        if self._text is None:
            index = len(self._items)
            item = message_item(new_id("msg"), [], "in_progress")
            self._items.append(item)
            self._text = index
            events.append(self._event("response.output_item.added", output_index=index, item=_copy(item)))
            item["content"].append(output_text(""))
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=output_text(""),
                )
            )
        item = self._items[self._text]
        item["content"][0]["text"] += text
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=item["id"],
                output_index=self._text,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return events

    def _close_text(self, status: str) -> list[dict[str, Any]]:
        if self._text is None:
            return []
        index, self._text = self._text, None
        item = self._items[index]
        part = item["content"][0]
        item["status"] = status
        return [
            self._event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=part["text"],
                logprobs=[],
            ),
            self._event(
                "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=_copy(part)
            ),
            self._event("response.output_item.done", output_index=index, item=_copy(item)),
        ]

    def _call_delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        chat_index = call.get("index", 0)
        function = call.get("function") or {}
        known = self._calls.get(chat_index)
        if known is not None and call.get("id") and call["id"] != self._items[known]["call_id"]:
            known = None  # the same Chat index reused by another call: a new item
        if known is None:
            events += self._close_reasoning("completed") + self._close_text("completed")
            index = len(self._items)
            item = function_call_item(
                new_id("fc"), call.get("id") or new_id("call"), function.get("name") or "", "", "in_progress"
            )
            self._items.append(item)
            self._calls[chat_index] = index
            self._open_calls.append(index)
            events.append(self._event("response.output_item.added", output_index=index, item=_copy(item)))
            known = index
        item = self._items[known]
        if function.get("name") and not item["name"]:
            item["name"] = function["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item["arguments"] += arguments
            events.append(
                self._event(
                    "response.function_call_arguments.delta", item_id=item["id"], output_index=known, delta=arguments
                )
            )
        return events

    def _close_calls(self, status: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for index in self._open_calls:
            item = self._items[index]
            item["status"] = status
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=item["arguments"],
                )
            )
            events.append(self._event("response.output_item.done", output_index=index, item=_copy(item)))
        self._open_calls = []
        return events

    def finish(self) -> list[dict[str, Any]]:
        """The stream ended whole: every open item closed, then the final event."""
        reason = incomplete_reason(self._finish)
        status = "incomplete" if reason else "completed"
        events = self._close_reasoning(status) + self._close_text(status) + self._close_calls("completed")
        self.response = self._turn.finished(_copy(self._items), reason, self._usage, self._model)
        kind = "response.incomplete" if reason else "response.completed"
        events.append(self._event(kind, response=self.response))
        return events

    def fail(self, err: GatewayError) -> list[dict[str, Any]]:
        """The stream broke after it started: response.failed, with what was produced."""
        response = self._turn.skeleton("failed")
        for item in self._items:
            if item["status"] == "in_progress":
                item["status"] = "incomplete"
        response["output"] = _copy(self._items)
        response["error"] = {
            "code": "rate_limit_exceeded" if err.status == 429 else "server_error",
            "message": err.message,
        }
        self.response = response
        return [self._event("response.failed", response=response)]


def _copy(value: Any) -> Any:
    """A deep copy of plain JSON data (events must not change as the items grow)."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


# --- pass-through: an upstream that speaks Responses itself ------------------------------------


class NativeRelay:
    """Events of an upstream's own Responses stream, relayed: each keeps its fields, but
    the response carries our id (it is stored here, under this turn's id) and the
    sequence numbers are ours (monotonic from 0 whatever the upstream sent)."""

    def __init__(self, turn: Turn) -> None:
        self._turn = turn
        self._sequence = 0
        self.response: dict[str, Any] | None = None

    def relay(self, event: dict[str, Any]) -> dict[str, Any]:
        event = dict(event)
        event["sequence_number"] = self._sequence
        self._sequence += 1
        response = event.get("response")
        if isinstance(response, dict):
            event["response"] = restamp(self._turn, response)
            if event.get("type") in ("response.completed", "response.incomplete", "response.failed"):
                self.response = event["response"]
        return event

    def fail(self, err: GatewayError) -> list[dict[str, Any]]:
        response = self._turn.skeleton("failed")
        response["error"] = {
            "code": "rate_limit_exceeded" if err.status == 429 else "server_error",
            "message": err.message,
        }
        self.response = response
        return [self.relay({"type": "response.failed", "response": response})]


def restamp(turn: Turn, response: dict[str, Any]) -> dict[str, Any]:
    """An upstream's Response under this turn's id and with its previous_response_id (the
    upstream never saw ours: a continued conversation is not passed through)."""
    return {**response, "id": turn.response_id, "previous_response_id": turn.echo["previous_response_id"]}
