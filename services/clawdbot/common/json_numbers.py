"""JSON numbers that are whole: 5.0 means 5.

A google.protobuf.Struct holds every number as a double, so 5 arrives as 5.0, which an
OpenAI API refuses for max_tokens, n or seed; and a cache key must not tell temperature
0 from 0.0. Both turn whole doubles back into ints, however deep they sit.
"""

from __future__ import annotations

from typing import Any


def whole_numbers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole_numbers(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
