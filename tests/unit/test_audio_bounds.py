"""WAV headers outside physical bounds are refused by the header alone, in microseconds."""

from __future__ import annotations

import math
import struct
import time

import numpy as np
import pytest

from clawdbot.common.audio_bounds import RATES, AudioError, AudioTooLong, check_upload, read_wav
from clawdbot.common.errors import GatewayError
from clawdbot.worker.audio import MAX_RESAMPLE_TAPS, decode_wav, resample
from tests.support import handmade_wav as wav_bytes

SECOND_16K = bytes(32000)  # one second of 16-bit mono silence at 16 kHz


def sixty_byte_file(data_size: int) -> bytes:
    """44 bytes of header and 16 of samples, the RIFF and data sizes claiming `data_size`."""
    data = bytearray(wav_bytes(bytes(16), data_size=data_size))
    struct.pack_into("<I", data, 4, min(data_size + 36, 0xFFFFFFFF))
    assert len(data) == 60
    return bytes(data)


def with_chunk_before_data(chunk_id: bytes, size: int, body: bytes) -> bytes:
    return wav_bytes(SECOND_16K, before_data=chunk_id + struct.pack("<I", size) + body)


def fmt_claiming(size: int) -> bytes:
    data = bytearray(wav_bytes(SECOND_16K))
    struct.pack_into("<I", data, 16, size)  # the 'fmt ' chunk's size field
    return bytes(data)


HOSTILE = [
    ("rate 10,000,019 Hz", wav_bytes(SECOND_16K, rate=10_000_019), "10000019 Hz"),
    ("rate 999,983 Hz", wav_bytes(SECOND_16K, rate=999_983), "999983 Hz"),
    ("rate 1e8 Hz", wav_bytes(SECOND_16K, rate=100_000_000), "100000000 Hz"),
    ("rate 7,999 Hz", wav_bytes(SECOND_16K, rate=7_999), "7999 Hz"),
    ("rate 0", wav_bytes(SECOND_16K, rate=0), "0 Hz"),
    ("0 channels", wav_bytes(SECOND_16K, channels=0), "0 channels"),
    ("65,535 channels", wav_bytes(SECOND_16K, channels=65535), "65535 channels"),
    ("9 channels", wav_bytes(bytes(18 * 1600), channels=9), "9 channels"),
    ("fmt chunk size 0xFFFFFFFF", fmt_claiming(0xFFFFFFFF), "truncated inside its 'fmt ' chunk"),
    ("LIST chunk size 0xFFFFFFFF", with_chunk_before_data(b"LIST", 0xFFFFFFFF, b"abcd"), "'LIST' chunk"),
    ("a 60-byte file claiming 1 GiB", sixty_byte_file(1 << 30), "truncated or its header is wrong"),
    ("12-bit samples", wav_bytes(SECOND_16K, bits=12), "12-bit PCM"),
    ("a frame far larger than its samples", wav_bytes(SECOND_16K, block_align=65535), "inconsistent"),
    ("thousands of empty chunks", wav_bytes(SECOND_16K, before_data=b"JUNK\x00\x00\x00\x00" * 5000), "chunks"),
]


@pytest.mark.parametrize(("case", "data", "needle"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_headers_are_refused_from_the_header(case: str, data: bytes, needle: str) -> None:
    started = time.perf_counter()
    with pytest.raises(AudioError, match=needle):
        read_wav(data)
    assert time.perf_counter() - started < 0.05
    # The adapter's check: a 400 naming the field the file came in.
    with pytest.raises(GatewayError) as caught:
        check_upload(data, "file")
    assert caught.value.status == 400 and caught.value.param == "file" and caught.value.code == "invalid_audio"
    # The worker decodes with the same reader.
    with pytest.raises(AudioError, match=needle):
        decode_wav(data)


def test_a_60_byte_file_with_a_streaming_placeholder_is_too_short_to_transcribe() -> None:
    data = sixty_byte_file(0xFFFFFFFF)
    layout = read_wav(data)  # read to the end of the file, never to the claimed 4 GiB
    assert layout.frames == 8
    with pytest.raises(GatewayError) as caught:
        check_upload(data, "request.file")
    assert caught.value.param == "request.file" and caught.value.code == "invalid_audio"
    assert "at least 0.1 seconds" in caught.value.message


def test_the_duration_is_counted_on_the_samples_present() -> None:
    eleven_minutes = wav_bytes(bytes(8000 * 60 * 11), rate=8000, bits=8)
    with pytest.raises(AudioTooLong, match=r"660\.0 seconds long; the limit is 600 seconds"):
        read_wav(eleven_minutes, max_seconds=600)
    with pytest.raises(GatewayError) as caught:
        check_upload(eleven_minutes, "file", max_seconds=600)
    assert caught.value.code == "audio_too_long" and caught.value.param == "file"
    # A header claiming hours of audio holds one second: it is one second long.
    claims_hours = wav_bytes(SECOND_16K, data_size=0xFFFFFFFF)
    assert read_wav(claims_hours, max_seconds=2).seconds == 1.0
    check_upload(claims_hours, "file", max_seconds=2)


@pytest.mark.parametrize("rate", RATES)
def test_every_listed_rate_is_accepted_and_cheap_to_resample(rate: int) -> None:
    frames = rate // 10
    layout = read_wav(wav_bytes(bytes(2 * frames), rate=rate))
    assert (layout.rate, layout.frames) == (rate, frames)
    for target in (16000, 24000):
        g = math.gcd(rate, target)
        assert 20 * max(target // g, rate // g) + 1 <= MAX_RESAMPLE_TAPS


def test_resampling_refuses_a_ratio_whose_filter_would_be_huge() -> None:
    with pytest.raises(ValueError, match="too long a filter"):
        resample(np.zeros(100, dtype=np.float32), 999_983, 16000)


def test_other_formats_pass_the_upload_check_for_the_provider_to_judge() -> None:
    check_upload(b"ID3\x04" + bytes(200), "file")  # MP3
    check_upload(b"fLaC" + bytes(200), "file")
    check_upload(b"RIFF", "file")  # too short to say it is a WAV file at all


def test_normal_files_pass() -> None:
    for channels, bits in ((1, 16), (2, 16), (8, 24), (1, 8), (2, 32)):
        frames = 4800
        data = wav_bytes(bytes(frames * channels * bits // 8), rate=48000, channels=channels, bits=bits)
        check_upload(data, "file")
        assert read_wav(data).seconds == 0.1
