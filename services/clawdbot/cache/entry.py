"""A cached answer and its byte format, shared by every level.

Framing: b"CBC1" + u32 (big-endian) header length + header JSON + body. The header carries
the body's length and SHA-256, so a truncated, padded or bit-flipped value is refused
(`CorruptEntry`) instead of being served as an answer.
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

MAGIC: Final = b"CBC1"
_LENGTH = struct.Struct(">I")
_PREFIX = len(MAGIC) + _LENGTH.size


class CorruptEntry(ValueError):
    """Bytes that are not a whole, intact encoded entry."""


_HEX_DIGITS: Final = frozenset("0123456789abcdef")


def is_sha256_hex(value: object) -> bool:
    """64 lower-case hex digits, as hexdigest() writes them."""
    return isinstance(value, str) and len(value) == 64 and _HEX_DIGITS.issuperset(value)


@dataclass(frozen=True, slots=True)
class Entry:
    body: bytes
    content_type: str
    created_at: float  # unix seconds
    expires_at: float = 0.0  # unix seconds; 0 = never
    attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A private copy: the caller mutating its dict must not change a cached entry.
        object.__setattr__(self, "attributes", dict(self.attributes))

    def expired(self, now: float | None = None) -> bool:
        if not self.expires_at:
            return False
        return (time.time() if now is None else now) >= self.expires_at

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.created_at)

    def remaining(self, now: float | None = None) -> float:
        """Seconds left until expiry; math.inf when the entry never expires."""
        if not self.expires_at:
            return math.inf
        return self.expires_at - (time.time() if now is None else now)


@dataclass(frozen=True, slots=True)
class Header:
    """Everything about an entry but its body; L3 keeps it apart from the body."""

    content_type: str
    created_at: float
    expires_at: float
    attributes: dict[str, str]
    length: int
    sha256: str

    @classmethod
    def of(cls, entry: Entry) -> Header:
        return cls(
            entry.content_type,
            entry.created_at,
            entry.expires_at,
            dict(entry.attributes),
            len(entry.body),
            hashlib.sha256(entry.body).hexdigest(),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "content_type": self.content_type,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "attributes": self.attributes,
            "length": self.length,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, value: object) -> Header:
        """Validate a decoded header; anything malformed is CorruptEntry, never KeyError/TypeError."""
        if not isinstance(value, dict):
            raise CorruptEntry("header is not a JSON object")
        try:
            content_type = value["content_type"]
            created_at = value["created_at"]
            expires_at = value["expires_at"]
            attributes = value["attributes"]
            length = value["length"]
            sha256 = value["sha256"]
        except KeyError as exc:
            raise CorruptEntry(f"header lacks {exc.args[0]!r}") from None
        if not isinstance(content_type, str):
            raise CorruptEntry("content_type is not a string")
        for name, number in (("created_at", created_at), ("expires_at", expires_at)):
            if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
                raise CorruptEntry(f"{name} is not a number")
        if not isinstance(attributes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
        ):
            raise CorruptEntry("attributes is not an object of strings")
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise CorruptEntry("length is not a non-negative integer")
        # It becomes a file name (the L3 blob): anything but 64 lower-case hex digits,
        # say "../../x", would name a path outside the store.
        if not is_sha256_hex(sha256):
            raise CorruptEntry("sha256 is not a hex digest")
        return cls(content_type, float(created_at), float(expires_at), attributes, length, sha256)

    def entry(self, body: bytes) -> Entry:
        """The entry with this header and `body`, once the body is checked against it."""
        if len(body) != self.length:
            raise CorruptEntry(f"body is {len(body)} bytes, header says {self.length}")
        if hashlib.sha256(body).hexdigest() != self.sha256:
            raise CorruptEntry("body does not match its sha256")
        return Entry(body, self.content_type, self.created_at, self.expires_at, self.attributes)


def encode(entry: Entry) -> bytes:
    header = orjson.dumps(Header.of(entry).to_json())
    return b"".join((MAGIC, _LENGTH.pack(len(header)), header, entry.body))


def decode(data: bytes) -> Entry:
    view = memoryview(data)
    if len(view) < _PREFIX:
        raise CorruptEntry(f"{len(view)} bytes is shorter than the framing")
    if view[: len(MAGIC)] != MAGIC:
        raise CorruptEntry("bad magic")
    (header_length,) = _LENGTH.unpack_from(view, len(MAGIC))
    body_start = _PREFIX + header_length
    if body_start > len(view):
        raise CorruptEntry(f"header of {header_length} bytes runs past the end")
    try:
        header = orjson.loads(view[_PREFIX:body_start])
    except orjson.JSONDecodeError as exc:
        raise CorruptEntry(f"header is not JSON: {exc}") from None
    return Header.from_json(header).entry(bytes(view[body_start:]))


def index_record(key: str, stored_at: float, header: Header) -> bytes:
    """What an object-storage level keeps under a key: the entry without its body, which
    lives in a blob named by its sha256."""
    return orjson.dumps({"key": key, "stored_at": stored_at, "header": header.to_json()})


def load_index_record(raw: bytes) -> tuple[str, float, Header]:
    """(key, stored_at, header) of an index record; CorruptEntry when it is not one."""
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CorruptEntry(f"index record is not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise CorruptEntry("index record is not a JSON object")
    key, stored_at = record.get("key"), record.get("stored_at")
    if not isinstance(key, str):
        raise CorruptEntry("index record has no key")
    if isinstance(stored_at, bool) or not isinstance(stored_at, int | float):
        raise CorruptEntry("index record has no stored_at")
    return key, float(stored_at), Header.from_json(record.get("header"))
