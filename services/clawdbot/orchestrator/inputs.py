"""A run's input checked against what its workflow takes, before any step starts.

Without the check a wrong-typed input ({"input": 5} for a workflow that reads
`input.audio`) was run: every field read as null and the run failed somewhere in the
middle, after spending model calls, instead of being a 400 naming `input`.
"""

from __future__ import annotations

from typing import Any

from clawdbot.common.audio_bounds import check_upload
from clawdbot.common.bounded import b64decode, off_loop_if_large
from clawdbot.common.config import GatewayConfig
from clawdbot.common.errors import GatewayError
from clawdbot.orchestrator.definitions import InputType, Workflow

_TYPE_WORDS: dict[str, str] = {
    "object": "an object",
    "string": "a string",
    "array": "an array",
    "number": "a number",
    "integer": "an integer",
    "boolean": "a boolean",
}


def _is(value: Any, expected: InputType) -> bool:
    if expected == "any":
        return True
    if expected in ("number", "integer"):
        # bool is an int in Python, never a number in JSON.
        kinds: tuple[type, ...] = (int,) if expected == "integer" else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool)
    return isinstance(value, {"object": dict, "string": str, "array": list, "boolean": bool}[expected])


# Most specific first: an integer is a number too.
_KINDS: tuple[InputType, ...] = ("boolean", "integer", "number", "string", "array", "object")


def _kind(value: Any) -> str:
    for name in _KINDS:
        if _is(value, name):
            return _TYPE_WORDS[name]
    return "null" if value is None else type(value).__name__


def _wrong_type(param: str, expected: InputType, value: Any, workflow: str) -> GatewayError:
    return GatewayError.bad_request(
        f"Invalid type for '{param}': the workflow `{workflow}` takes {_TYPE_WORDS[expected]}, "
        f"but got {_kind(value)} instead.",
        param,
        "invalid_type",
    )


def _check_audio(encoded: str, param: str, limits: GatewayConfig) -> None:
    audio = b64decode(encoded, limits.max_request_bytes, what=f"'{param}'", param=param, code="invalid_audio")
    if not audio:
        raise GatewayError.bad_request(f"'{param}' must hold the audio, base64-encoded.", param, "invalid_audio")
    check_upload(audio, param, limits.max_audio_seconds)


async def check_input(workflow: Workflow, value: Any, limits: GatewayConfig) -> None:
    """GatewayError 400 (or 413 for audio decoding past the body limit) when `value` is not
    what `workflow` takes."""
    spec = workflow.input_spec()
    if spec.type == "any":
        return
    if value is None:
        if workflow.input is None:
            # Inferred, not declared: no input reads as null fields, as it always has.
            return
        raise GatewayError.bad_request(
            f"Missing required parameter: 'input'. The workflow `{workflow.name}` takes {_TYPE_WORDS[spec.type]}.",
            "input",
            "missing_required_parameter",
        )
    if not _is(value, spec.type):
        raise _wrong_type("input", spec.type, value, workflow.name)
    if not isinstance(value, dict):
        return
    for name in spec.required:
        if value.get(name) is None:
            raise GatewayError.bad_request(
                f"Missing required parameter: 'input.{name}'.", f"input.{name}", "missing_required_parameter"
            )
    for name, field in spec.properties.items():
        given = value.get(name)
        if given is None:
            continue
        param = f"input.{name}"
        if field.format == "audio" and not isinstance(given, str):
            raise _wrong_type(param, "string", given, workflow.name)
        if not _is(given, field.type):
            raise _wrong_type(param, field.type, given, workflow.name)
        if field.format == "audio":
            # Decoding a large file is CPU work: in a thread, so other runs go on meanwhile.
            await off_loop_if_large(len(given), _check_audio, given, param, limits)
