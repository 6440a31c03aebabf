"""Bounded decoding: gzip and base64 stop at the limit, quickly, whatever the input claims."""

from __future__ import annotations

import asyncio
import base64
import gzip
import threading
import time
import zlib

import pytest

from clawdbot.common.bounded import (
    MAX_GZIP_MEMBERS,
    OFF_LOOP_BYTES,
    b64decode,
    gunzip,
    max_base64_length,
    off_loop_if_large,
)
from clawdbot.common.errors import GatewayError

MiB = 1024 * 1024


def gzip_of_zeros(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(MiB)
    parts = [compressor.compress(chunk) for _ in range(size // MiB)]
    return b"".join([*parts, compressor.flush()])


def test_a_64_mib_bomb_of_about_65_kb_stops_at_the_cap() -> None:
    bomb = gzip_of_zeros(64 * MiB)
    assert len(bomb) < 70_000
    started = time.perf_counter()
    with pytest.raises(GatewayError) as caught:
        gunzip(bomb, MiB, what="The frame")
    elapsed = time.perf_counter() - started
    print(f"64 MiB bomb of {len(bomb)} bytes refused at a 1 MiB cap in {elapsed * 1000:.1f} ms")
    assert caught.value.status == 413 and caught.value.code == "request_too_large"
    assert "The frame" in caught.value.message and str(MiB) in caught.value.message
    assert elapsed < 0.5


def test_exactly_at_the_limit_is_accepted_one_byte_more_is_not() -> None:
    data = bytes(range(256)) * 16  # 4096 bytes
    packed = gzip.compress(data)
    assert gunzip(packed, len(data)) == data
    with pytest.raises(GatewayError) as caught:
        gunzip(packed, len(data) - 1)
    assert caught.value.status == 413


def test_members_are_joined_and_their_total_is_capped() -> None:
    assert gunzip(gzip.compress(b"ab") + gzip.compress(b"cd"), 100) == b"abcd"
    # Zero padding after the last member is not another member (gzip.decompress agrees).
    assert gunzip(gzip.compress(b"ab") + b"\x00" * 10, 100) == gzip.decompress(gzip.compress(b"ab") + b"\x00" * 10)
    # Each member within the cap, their sum past it.
    with pytest.raises(GatewayError) as caught:
        gunzip(gzip.compress(bytes(600)) + gzip.compress(bytes(600)), 1000)
    assert caught.value.status == 413


def test_many_gzip_members_are_refused_quickly() -> None:
    empty = gzip.compress(b"")
    assert gunzip(empty * MAX_GZIP_MEMBERS, 10) == b""
    many = empty * 100_000
    started = time.perf_counter()
    with pytest.raises(GatewayError) as caught:
        gunzip(many, MiB)
    elapsed = time.perf_counter() - started
    print(f"100,000 empty gzip members ({len(many)} bytes) refused in {elapsed * 1000:.2f} ms")
    assert caught.value.status == 400 and "members" in caught.value.message
    assert elapsed < 0.1


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\x1f\x8bnot really gzip", "not valid gzip"),
        (gzip.compress(b"hello world" * 100)[:-12], "truncated"),
        (gzip.compress(b"hello") + b"junk after it", "not valid gzip"),
        (b"", "empty"),
    ],
)
def test_broken_gzip_is_a_400(data: bytes, needle: str) -> None:
    with pytest.raises(GatewayError) as caught:
        gunzip(data, MiB, param="frame", code="invalid_frame")
    assert caught.value.status == 400 and caught.value.code == "invalid_frame" and caught.value.param == "frame"
    assert needle in caught.value.message


def test_base64_round_trips_within_the_limit() -> None:
    for size in (0, 1, 2, 3, 4, 1000, 1001, 1002):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        encoded = base64.b64encode(data)
        assert len(encoded) <= max_base64_length(size)
        assert b64decode(encoded, size) == data
        assert b64decode(encoded.decode(), size) == data
        if size:
            with pytest.raises(GatewayError) as caught:
                b64decode(encoded, size - 1)
            assert caught.value.status == 413


def test_oversized_base64_is_refused_by_its_length_before_decoding() -> None:
    huge = "A" * (64 * MiB)  # valid base64 of 48 MiB of zeros
    started = time.perf_counter()
    with pytest.raises(GatewayError) as caught:
        b64decode(huge, MiB, what="'request.file'", param="request.file")
    elapsed = time.perf_counter() - started
    print(f"64 MiB of base64 refused at a 1 MiB cap in {elapsed * 1e6:.0f} us")
    assert caught.value.status == 413 and caught.value.code == "request_too_large"
    assert caught.value.param == "request.file"
    assert elapsed < 0.01


@pytest.mark.parametrize(
    "junk",
    ["not base64!", "QUJD\nREVG", "QUJDRA", "QUI=QUJD", "Q===", "QUJD\u00e9", "QU JD"],
)
def test_junk_base64_is_a_400_never_silently_cleaned(junk: str) -> None:
    with pytest.raises(GatewayError) as caught:
        b64decode(junk, MiB, param="file", code="invalid_audio")
    assert caught.value.status == 400 and caught.value.code == "invalid_audio" and caught.value.param == "file"


@pytest.mark.asyncio
async def test_large_inputs_are_decoded_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()

    def where(_: bytes) -> int:
        return threading.get_ident()

    assert await off_loop_if_large(OFF_LOOP_BYTES - 1, where, b"") == loop_thread
    assert await off_loop_if_large(OFF_LOOP_BYTES, where, b"") != loop_thread

    # While a large bomb is refused in a thread, the loop keeps turning.
    bomb = gzip_of_zeros(256 * MiB)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    with pytest.raises(GatewayError):
        await off_loop_if_large(len(bomb), gunzip, bomb, 4 * MiB)
    ticker.cancel()
    assert ticks > 0
