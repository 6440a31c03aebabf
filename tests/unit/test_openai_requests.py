from typing import Any

import pytest

from clawdbot.adapter.openai_requests import load_json_object, parse_chat, parse_embeddings
from clawdbot.common.errors import GatewayError

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def error_of(fn: Any, *args: Any) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        fn(*args)
    assert info.value.status == 400
    return info.value


def test_valid_chat_keeps_unknown_fields() -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "brand_new_field": {"x": 1}}
    parsed = parse_chat(body)
    assert (parsed.model, parsed.stream, parsed.include_usage) == ("m", True, True)
    assert parsed.body["brand_new_field"] == {"x": 1}


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [(b"{not json", "could not parse the JSON"), (b"", "body is empty"), (b"[1, 2]", "must be a JSON object")],
)
def test_malformed_json(raw: bytes, fragment: str) -> None:
    assert fragment in error_of(load_json_object, raw).message


@pytest.mark.parametrize(
    ("patch", "param", "fragment"),
    [
        ({"model": None}, "model", "expected a string"),
        ({"model": ""}, "model", "must not be empty"),
        ({"messages": "hi"}, "messages", "expected an array"),
        ({"messages": []}, "messages", "empty array"),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "Missing required parameter"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "Invalid value"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "expected a string or an array"),
        ({"temperature": "hot"}, "temperature", "expected a decimal, but got a string"),
        ({"temperature": True}, "temperature", "got a boolean"),
        ({"max_tokens": 1.5}, "max_tokens", "expected an integer"),
        ({"max_tokens": 0}, "max_tokens", "below minimum"),
        ({"stream": "yes"}, "stream", "expected a boolean"),
        ({"stop": [1]}, "stop", "a string or an array of strings"),
    ],
)
def test_chat_field_errors_name_the_field(patch: dict[str, Any], param: str, fragment: str) -> None:
    err = error_of(parse_chat, {**CHAT, **patch})
    assert err.param == param
    assert fragment in err.message


def test_missing_fields() -> None:
    assert error_of(parse_chat, {"messages": CHAT["messages"]}).param == "model"
    assert error_of(parse_chat, {"model": "m"}).param == "messages"
    assert error_of(parse_embeddings, {"model": "m"}).param == "input"


@pytest.mark.parametrize("value", ["one", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_embeddings_inputs(value: Any) -> None:
    assert parse_embeddings({"model": "e", "input": value}).task == "embeddings"


@pytest.mark.parametrize("value", [5, [], [1, "a"], {"a": 1}])
def test_bad_embeddings_inputs(value: Any) -> None:
    assert error_of(parse_embeddings, {"model": "e", "input": value}).param == "input"
