"""Decoding compressed or encoded input with a bound on what it decodes to.

A body limit bounds what a client sends, not what it expands to: 255 KiB of gzip inflates
to 256 MiB, and every decoder in the standard library's convenient form (`gzip.decompress`,
`zlib.decompress(bufsize=...)`) inflates in full before anyone can look at the size. Here
the output is capped while decoding, so an oversized input costs at most `limit` bytes of
memory and the time to produce them, and is refused with a 413 (`request_too_large`) that
each protocol renders in its own shape.

`off_loop_if_large` runs a decoder in a thread once the input is large, so a big frame does
not hold up every other request on the event loop while it inflates.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import zlib
from collections.abc import Callable
from typing import Final, ParamSpec, TypeVar

from clawdbot.common.errors import GatewayError

# Inputs at least this large are decoded in a thread: below it, decoding takes well under
# a millisecond and a thread hop would cost more than it saves.
OFF_LOOP_BYTES: Final = 64 * 1024
# A gzip stream may hold several members, decoded one after another. Real senders write
# one; each member costs a fresh decompressor, and thousands of empty ones burn CPU without
# producing output (aiohttp GHSA-h4cc-hm5h-fmm9), so a few are enough.
MAX_GZIP_MEMBERS: Final = 16
_GZIP_MAGIC: Final = b"\x1f\x8b"

T = TypeVar("T")
P = ParamSpec("P")


def too_large(limit: int, what: str, param: str | None = None) -> GatewayError:
    """The 413 for input that decodes past the body limit."""
    return GatewayError(
        413,
        f"{what} decodes to more than {limit} bytes, the limit for a request (gateway.max_request_bytes).",
        "invalid_request_error",
        "request_too_large",
        param,
    )


def is_gzip(data: bytes) -> bool:
    return data[:2] == _GZIP_MAGIC


def gunzip(
    data: bytes,
    limit: int,
    *,
    what: str = "The gzip data",
    param: str | None = None,
    code: str = "invalid_gzip",
    max_members: int = MAX_GZIP_MEMBERS,
) -> bytes:
    """The concatenated members of a gzip stream, at most `limit` bytes of them.

    GatewayError 413 past `limit`; 400 (`code`) for data that is not gzip, is truncated, or
    has more than `max_members` members.
    """
    if limit < 0:
        raise ValueError(f"limit must not be negative, got {limit}")
    out: list[bytes] = []
    produced = 0
    rest = data
    members = 0
    while rest:
        members += 1
        if members > max_members:
            raise GatewayError.bad_request(f"{what} has more than {max_members} gzip members.", param, code)
        inflater = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer, not raw deflate
        try:
            # One byte more than is left tells "exactly at the limit" from "past it"; a
            # max_length of 0 would mean no limit at all, so it is never passed.
            chunk = inflater.decompress(rest, limit - produced + 1)
        except zlib.error as exc:
            raise GatewayError.bad_request(f"{what} is not valid gzip ({exc}).", param, code) from None
        produced += len(chunk)
        if produced > limit:
            raise too_large(limit, what, param)
        out.append(chunk)
        if not inflater.eof:
            raise GatewayError.bad_request(f"{what} is truncated: its gzip stream does not end.", param, code)
        # As gzip.decompress does: zero bytes after a member are padding, not another member.
        rest = inflater.unused_data.lstrip(b"\x00")
    if members == 0:
        raise GatewayError.bad_request(f"{what} is empty.", param, code)
    return b"".join(out)


def max_base64_length(limit: int) -> int:
    """The longest base64 text (with padding) that can decode to at most `limit` bytes."""
    return 4 * -(-limit // 3)


def b64decode(
    text: str | bytes,
    limit: int,
    *,
    what: str = "The base64 data",
    param: str | None = None,
    code: str = "invalid_base64",
) -> bytes:
    """Standard base64 (RFC 4648, padded, nothing else in it) decoded, at most `limit` bytes.

    The encoded length is checked before anything is decoded. GatewayError 413 past
    `limit`, 400 (`code`) for anything that is not strict base64: the lenient default of
    `base64.b64decode` silently drops stray characters, so junk would decode to something.
    """
    if isinstance(text, str):
        if len(text) > max_base64_length(limit):
            raise too_large(limit, what, param)
        try:
            encoded = text.encode("ascii")
        except UnicodeEncodeError:
            raise GatewayError.bad_request(
                f"{what} is not base64: it holds non-ASCII characters.", param, code
            ) from None
    else:
        encoded = text
    if len(encoded) > max_base64_length(limit):
        raise too_large(limit, what, param)
    try:
        decoded = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GatewayError.bad_request(f"{what} is not valid base64 ({exc}).", param, code) from None
    if len(decoded) > limit:  # 4*ceil(limit/3) characters can decode to up to two bytes more
        raise too_large(limit, what, param)
    return decoded


async def off_loop_if_large(size: int, decode: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """decode(*args, **kwargs), in a worker thread when its input (`size` bytes) is large
    enough to matter, else right here."""
    if size >= OFF_LOOP_BYTES:
        return await asyncio.to_thread(decode, *args, **kwargs)
    return decode(*args, **kwargs)
