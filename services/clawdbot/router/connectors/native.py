"""Pass-through helpers: a caller's own request body sent on untouched but for its model.

A body passed through must reach the upstream as the caller wrote it (prompt-cache
breakpoints, field order, number formats and fields we do not know all survive), so the
model is replaced in the bytes, never by decoding and re-encoding the whole body."""

from __future__ import annotations

import re

import orjson

# The bytes that matter when skipping over a JSON value: strings and brackets.
_STRUCTURE = re.compile(rb'["{}\[\]]')
_WHITESPACE = b" \t\r\n"


class NotAnObject(ValueError):
    """The body is not a JSON object."""


def _skip_ws(body: bytes, pos: int) -> int:
    while pos < len(body) and body[pos] in _WHITESPACE:
        pos += 1
    return pos


def _string_end(body: bytes, pos: int) -> int:
    """Index just past the string opening at `pos` (a quote)."""
    at = pos + 1
    while True:
        quote = body.find(b'"', at)
        if quote < 0:
            raise NotAnObject("unterminated string")
        backslashes = 0
        while body[quote - 1 - backslashes] == 0x5C:  # an escaped quote has an odd run of \
            backslashes += 1
        if backslashes % 2 == 0:
            return quote + 1
        at = quote + 1


def _value_end(body: bytes, pos: int) -> int:
    """Index just past the JSON value starting at `pos`."""
    first = body[pos : pos + 1]
    if first == b'"':
        return _string_end(body, pos)
    if first in (b"{", b"["):
        depth, at = 0, pos
        while True:
            found = _STRUCTURE.search(body, at)
            if found is None:
                raise NotAnObject("unbalanced brackets")
            char = found.group()
            if char == b'"':
                at = _string_end(body, found.start())
                continue
            depth += 1 if char in (b"{", b"[") else -1
            at = found.end()
            if depth == 0:
                return at
    end = pos
    while end < len(body) and body[end] not in b",}] \t\r\n":
        end += 1
    return end


def replace_model(body: bytes, model: str) -> bytes:
    """`body` (a JSON object) with its top-level "model" set to `model`; every other byte
    as it was. A body without one gets it first. NotAnObject when it is not an object."""
    return patch_fields(body, _object(body), {"model": model})


def passed_body(body: bytes, model: str, stream: bool, drop: tuple[str, ...] = ()) -> bytes:
    """The body an upstream is sent: the model replaced; when the body's `stream` says
    otherwise than the call (a caller's plain request served as a stream, or the
    reverse), `stream` set to match; the top-level fields in `drop` (the gateway's own
    options) removed; nothing else touched."""
    parsed = _object(body)
    fields: dict[str, object] = {"model": model}
    if (parsed.get("stream") is True) != stream:
        fields["stream"] = stream
    for name in drop:
        if name in parsed:
            fields[name] = REMOVE
    return patch_fields(body, parsed, fields)


# A value for patch_fields: remove the field.
REMOVE = object()


def _object(body: bytes) -> dict[str, object]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise NotAnObject(str(exc)) from exc
    if not isinstance(parsed, dict):
        raise NotAnObject("not a JSON object")
    return parsed


def patch_fields(body: bytes, parsed: dict[str, object], fields: dict[str, object]) -> bytes:
    """`body` with each top-level field of `fields` set (its value replaced where it is,
    else added first) or, for REMOVE, removed with its comma; `parsed` is the body
    decoded, already checked to be an object."""
    pos = _skip_ws(body, 0) + 1  # past the object's "{"
    opening = pos
    # (key start, value start, value end, key) of each member, in order.
    members: list[tuple[int, int, int, str]] = []
    while True:
        pos = _skip_ws(body, pos)
        if body[pos : pos + 1] == b"}":
            break
        key_end = _string_end(body, pos)
        key = orjson.loads(body[pos:key_end])
        start = _skip_ws(body, _skip_ws(body, key_end) + 1)  # past the ":"
        end = _value_end(body, start)
        members.append((pos, start, end, key))
        pos = _skip_ws(body, end)
        if body[pos : pos + 1] == b",":
            pos += 1
    # Edits as (from, to, replacement), applied from the end so offsets hold.
    edits: list[tuple[int, int, bytes]] = []
    kept = [i for i, m in enumerate(members) if fields.get(m[3]) is not REMOVE]
    for i, (key_start, start, end, key) in enumerate(members):
        if key not in fields:
            continue  # every occurrence of a key is patched: a parser keeps the last one
        if fields[key] is not REMOVE:
            edits.append((start, end, orjson.dumps(fields[key])))
        elif i + 1 < len(members):
            edits.append((key_start, members[i + 1][0], b""))  # up to the next member
        else:
            # The last member: from the end of the last value kept before it, comma and all.
            before = [j for j in kept if j < i]
            edits.append((members[before[-1]][2] if before else key_start, end, b""))
    # Removals of neighbours overlap: merged into one. Replacements never overlap them
    # (a removal stops short of the values it keeps).
    merged: list[tuple[int, int, bytes]] = []
    for edit in sorted(edits):
        if merged and not edit[2] and not merged[-1][2] and edit[0] <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], edit[1]), b"")
        else:
            merged.append(edit)
    out = body
    for start, end, value in reversed(merged):
        out = out[:start] + value + out[end:]
    missing = [k for k, v in fields.items() if k not in parsed and v is not REMOVE]
    if missing:
        added = b",".join(orjson.dumps(k) + b":" + orjson.dumps(fields[k]) for k in missing)
        out = out[:opening] + added + (b"," if kept else b"") + out[opening:]
    return out
