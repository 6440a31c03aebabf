"""Workflow expressions: JMESPath (a maintained, documented, side-effect-free query
language; https://jmespath.org), inside `${...}`.

The context is `{"input": <the run's input>, "steps": {<id>: {"output", "status",
"error"}}}`. A string that is exactly one `${expr}` takes the expression's value, whatever
its type; `${...}` inside a longer string is replaced by the value's text. Mappings and
lists are evaluated member by member. Nothing is ever passed to `eval`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import jmespath
import orjson
from jmespath.exceptions import JMESPathError

_PLACEHOLDER = re.compile(r"\$\{(.*?)\}")
# `steps.<id>` at the start of an expression or after a non-identifier character.
_STEP_REFERENCE = re.compile(r"(?<![\w.])steps\.([A-Za-z_][\w-]*)")


class ExpressionError(ValueError):
    """An expression that does not parse; the message names it."""


def compile_expression(text: str) -> Any:
    try:
        return jmespath.compile(text)
    except JMESPathError as exc:
        raise ExpressionError(f"invalid expression `{text}`: {exc}") from None


def expressions_in(template: Any) -> Iterator[str]:
    """Every `${...}` expression in a template, however deep."""
    if isinstance(template, str):
        yield from (m.group(1).strip() for m in _PLACEHOLDER.finditer(template))
    elif isinstance(template, dict):
        for value in template.values():
            yield from expressions_in(value)
    elif isinstance(template, list):
        for value in template:
            yield from expressions_in(value)


def referenced_steps(expression: str) -> set[str]:
    return set(_STEP_REFERENCE.findall(expression))


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return orjson.dumps(value).decode()


def evaluate(expression: str, context: dict[str, Any]) -> Any:
    return compile_expression(expression).search(context)


def render(template: Any, context: dict[str, Any]) -> Any:
    """The template with its expressions replaced by their values in `context`."""
    if isinstance(template, str):
        whole = _PLACEHOLDER.fullmatch(template.strip())
        if whole is not None:
            return evaluate(whole.group(1).strip(), context)
        return _PLACEHOLDER.sub(lambda m: _text(evaluate(m.group(1).strip(), context)), template)
    if isinstance(template, dict):
        return {key: render(value, context) for key, value in template.items()}
    if isinstance(template, list):
        return [render(value, context) for value in template]
    return template


def truthy(expression: str, context: dict[str, Any]) -> bool:
    """JMESPath truth: false, null, empty strings, lists and objects are false."""
    value = evaluate(expression, context)
    return value not in (None, False, "", [], {})
