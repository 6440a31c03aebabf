"""Parse and check OpenAI request bodies, once, whatever protocol they came on.

Only the fields the gateway relies on are checked (a wrong type there would fail later
in a confusing way); every other field, known or not, passes through untouched.
Messages copy OpenAI's own wording, so SDK users see familiar errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from clawdbot.adapter.multipart import parse_form
from clawdbot.common.audio_bounds import DEFAULT_MAX_SECONDS as DEFAULT_MAX_AUDIO_SECONDS
from clawdbot.common.audio_bounds import check_upload
from clawdbot.common.errors import GatewayError
from clawdbot.gen.v1 import router_pb2

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_TYPE_WORDS = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a decimal",
    type(None): "null",
}


@dataclass(frozen=True)
class ParsedRequest:
    task: str
    model: str
    stream: bool
    include_usage: bool
    body: dict[str, Any]
    # Binary input beside the body: the audio file of a transcription.
    binary: bytes = b""


def _kind(value: Any) -> str:
    return _TYPE_WORDS.get(type(value), type(value).__name__)


def _wrong_type(param: str, expected: str, value: Any) -> GatewayError:
    return GatewayError.bad_request(
        f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead.",
        param,
        "invalid_type",
    )


def _missing(param: str) -> GatewayError:
    return GatewayError.bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def load_json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise GatewayError.bad_request("The request body is empty; expected a JSON object.", None, "invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise GatewayError.bad_request(
            f"We could not parse the JSON body of your request ({exc}).", None, "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise GatewayError.bad_request(
            f"The request body must be a JSON object, not {_kind(body)}.", None, "invalid_json"
        )
    return body


def _model(body: dict[str, Any]) -> str:
    if "model" not in body:
        raise _missing("model")
    model = body["model"]
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    if not model.strip():
        raise GatewayError.bad_request("'model' must not be empty.", "model", "invalid_value")
    return model


def _optional(body: dict[str, Any], param: str, types: tuple[type, ...], expected: str) -> Any:
    value = body.get(param)
    # bool is an int in Python, but never a valid number in these fields.
    if value is not None and ((isinstance(value, bool) and bool not in types) or not isinstance(value, types)):
        raise _wrong_type(param, expected, value)
    return value


def _check_messages(body: dict[str, Any]) -> None:
    if "messages" not in body:
        raise _missing("messages")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array", messages)
    if not messages:
        raise GatewayError.bad_request(
            "Invalid 'messages': empty array. Expected an array with minimum length 1.", "messages", "empty_array"
        )
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _wrong_type(where, "an object", message)
        role = message.get("role")
        if role is None:
            raise _missing(f"{where}.role")
        if not isinstance(role, str):
            raise _wrong_type(f"{where}.role", "a string", role)
        if role not in _ROLES:
            raise GatewayError.bad_request(
                f"Invalid value for '{where}.role': '{role}'. Supported values are: "
                + ", ".join(f"'{r}'" for r in sorted(_ROLES))
                + ".",
                f"{where}.role",
                "invalid_value",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise _wrong_type(f"{where}.content", "a string or an array of content parts", content)


def parse_chat(body: dict[str, Any]) -> ParsedRequest:
    model = _model(body)
    _check_messages(body)
    stream = _optional(body, "stream", (bool,), "a boolean") or False
    options = _optional(body, "stream_options", (dict,), "an object") or {}
    include_usage = _optional(options, "include_usage", (bool,), "a boolean") if options else False
    for param in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        _optional(body, param, (int, float), "a decimal")
    for param in ("max_tokens", "max_completion_tokens", "n", "seed"):
        value = _optional(body, param, (int,), "an integer")
        if value is not None and param != "seed" and value < 1:
            raise GatewayError.bad_request(
                f"Invalid '{param}': integer below minimum value. Expected a value >= 1, but got {value} instead.",
                param,
                "integer_below_min_value",
            )
    stop = body.get("stop")
    if (
        stop is not None
        and not isinstance(stop, str)
        and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise _wrong_type("stop", "a string or an array of strings", stop)
    _optional(body, "user", (str,), "a string")
    return ParsedRequest("chat", model, bool(stream), bool(include_usage), body)


def parse_embeddings(body: dict[str, Any]) -> ParsedRequest:
    model = _model(body)
    if "input" not in body:
        raise _missing("input")
    value = body["input"]
    valid = isinstance(value, str) or (
        isinstance(value, list)
        and value
        and (
            all(isinstance(v, str) for v in value)
            or all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value)
        )
    )
    if not valid:
        if isinstance(value, list) and not value:
            raise GatewayError.bad_request("'input' must not be empty.", "input", "empty_array")
        raise _wrong_type("input", "a string, an array of strings or an array of token arrays", value)
    fmt = _optional(body, "encoding_format", (str,), "a string")
    if fmt is not None and fmt not in ("float", "base64"):
        raise GatewayError.bad_request(
            f"Invalid value for 'encoding_format': '{fmt}'. Supported values are: 'float' and 'base64'.",
            "encoding_format",
            "invalid_value",
        )
    dims = _optional(body, "dimensions", (int,), "an integer")
    if dims is not None and dims < 1:
        raise GatewayError.bad_request("'dimensions' must be at least 1.", "dimensions", "integer_below_min_value")
    _optional(body, "user", (str,), "a string")
    return ParsedRequest("embeddings", model, False, False, body)


def parse_feedback(body: dict[str, Any], meta: router_pb2.RequestMeta) -> router_pb2.FeedbackRequest:
    request_id = body.get("request_id")
    if request_id is None:
        raise _missing("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise _wrong_type("request_id", "a non-empty string", request_id)
    if "score" not in body:
        raise _missing("score")
    score = _optional(body, "score", (int, float), "a decimal")
    if not 0 <= score <= 1:
        raise GatewayError.bad_request(
            f"Invalid 'score': expected a value between 0 and 1, but got {score}.", "score", "invalid_value"
        )
    return router_pb2.FeedbackRequest(meta=meta, request_id=request_id, score=float(score))


TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
# Form fields whose values are numbers, not text.
_NUMERIC_FORM_FIELDS = ("temperature",)


def parse_transcription(
    content_type: str, raw: bytes, max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
) -> tuple[ParsedRequest, str]:
    """An OpenAI /v1/audio/transcriptions upload, and the response format asked for.

    CPU work proportional to the body (the MIME parser): run it off the event loop when
    the body is large (common.bounded.off_loop_if_large)."""
    form = parse_form(content_type, raw)
    if "file" not in form:
        raise _missing("file")
    audio = form.pop("file").data
    body: dict[str, Any] = {name: part.text(name) for name, part in form.items()}
    for name in _NUMERIC_FORM_FIELDS:
        if name in body:
            try:
                body[name] = float(body[name])
            except ValueError:
                raise _wrong_type(name, "a decimal", body[name]) from None
    response_format = body.pop("response_format", "json")
    if response_format not in TRANSCRIPTION_FORMATS:
        raise GatewayError.bad_request(
            f"Invalid value for 'response_format': '{response_format}'. Supported values are: "
            + ", ".join(f"'{f}'" for f in TRANSCRIPTION_FORMATS)
            + ".",
            "response_format",
            "invalid_value",
        )
    return transcription_request(body, audio, max_audio_seconds), response_format


def transcription_request(
    body: dict[str, Any], audio: bytes, max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
) -> ParsedRequest:
    """A transcription, whatever protocol brought it: form fields and the audio file.

    A WAV file's header is checked here, before the request goes anywhere: a rate, channel
    count or length out of bounds is a 400 now rather than a worker busy for minutes."""
    model = _model(body)
    if not audio:
        raise GatewayError.bad_request("The uploaded 'file' is empty.", "file", "empty_file")
    check_upload(audio, "file", max_audio_seconds)
    return ParsedRequest("transcription", model, False, False, body, audio)


def parse_speech(body: dict[str, Any]) -> ParsedRequest:
    """An OpenAI /v1/audio/speech request; the voice and format are the model's to judge."""
    model = _model(body)
    for param in ("input", "voice"):
        if param not in body:
            raise _missing(param)
        if not isinstance(body[param], str):
            raise _wrong_type(param, "a string", body[param])
    if not body["input"].strip():
        raise GatewayError.bad_request("'input' must not be empty.", "input", "empty_input")
    _optional(body, "speed", (int, float), "a decimal")
    _optional(body, "response_format", (str,), "a string")
    return ParsedRequest("speech", model, False, False, body)


def parse_intent(body: dict[str, Any]) -> ParsedRequest:
    """Clawdbot's /v1/intents: {model, input: string | [strings], top_n?}."""
    model = _model(body)
    if "input" not in body:
        raise _missing("input")
    value = body["input"]
    if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
        raise _wrong_type("input", "a string or an array of strings", value)
    _optional(body, "top_n", (int,), "an integer")
    return ParsedRequest("intent", model, False, False, body)
