"""WAV headers read without trusting them, and audio kept within physical bounds.

One reader for the adapter (a cheap header check before a transcription reaches the
router, so a hostile file is a 400 in microseconds rather than a worker busy for minutes)
and the worker (which decodes with it: other callers reach the worker too).

What a header may claim:
- a sample rate from RATES only. Resampling to the recogniser's rate costs a filter of
  20*max(up, down)+1 taps after the gcd (scipy's resample_poly): 999,983 Hz -> 16 kHz is
  about 20M taps and 10,000,019 Hz tens of seconds and gigabytes; every listed rate is a
  few thousand taps at most.
- 1 to 8 channels; 8/16/24/32-bit PCM or 32/64-bit IEEE float (plain or inside
  WAVE_FORMAT_EXTENSIBLE); a frame (block_align) that holds them.
- chunk sizes are checked against the bytes present. A 'data' chunk claiming more than the
  file holds is read to the end of the file when its size is a streaming placeholder
  (writers that cannot seek back, such as espeak-ng --stdout or ffmpeg to a pipe, leave
  0x7ffff000 or 0xffffffff there), and refused as truncated otherwise.
- the duration is counted on the frames actually present, never on the header's sizes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from clawdbot.common.errors import GatewayError

# Sample rates accepted: the ones audio software writes. Anything else is refused, which
# also bounds what resampling a file can cost.
RATES: Final = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 176400, 192000)
MAX_CHANNELS: Final = 8
PCM: Final = 0x0001
IEEE_FLOAT: Final = 0x0003
_EXTENSIBLE: Final = 0xFFFE
_BITS: Final = {PCM: (8, 16, 24, 32), IEEE_FLOAT: (32, 64)}
# Shorter than this there is nothing to transcribe (OpenAI refuses it as well).
MIN_SECONDS: Final = 0.1
# The default duration cap (gateway.max_audio_seconds): ten minutes.
DEFAULT_MAX_SECONDS: Final = 600.0
# A declared 'data' size at least this large (about 2 GiB; a RIFF size field holds at most
# 4 GiB) is a placeholder left by a streaming writer, not a claim about this file.
_STREAMING_PLACEHOLDER: Final = 0x7FFF0000
# Real files carry a handful of chunks (fmt, fact, LIST, bext, JUNK...) before their data;
# thousands of tiny ones are only a way to make the reader loop.
MAX_CHUNKS: Final = 64
# WAVE_FORMAT_EXTENSIBLE names its real format with a GUID whose first two bytes are the
# format tag and whose other fourteen are this fixed KSDATAFORMAT suffix.
_KSDATAFORMAT_SUFFIX: Final = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
# Names for the compressed formats clients are most likely to send, so the error says
# what the file is rather than a bare number.
_FORMAT_NAMES: Final = {
    0x0002: "Microsoft ADPCM",
    0x0006: "A-law",
    0x0007: "mu-law",
    0x0011: "IMA ADPCM",
    0x0031: "GSM 6.10",
    0x0055: "MP3",
    0x00FF: "AAC",
}
SUPPORTED: Final = "16-bit PCM WAV is the safest choice; 8/24/32-bit PCM and 32/64-bit float WAV also work"


class AudioError(ValueError):
    """The bytes are not audio within bounds; the message says why, for a client to read."""


class AudioTooLong(AudioError):
    """The audio is well-formed but longer than the caller allows."""


@dataclass(frozen=True)
class WavLayout:
    """Where a WAV file's samples are and how they are laid out, all of it checked."""

    channels: int
    rate: int
    block_align: int
    sample_format: int  # PCM or IEEE_FLOAT (an extensible file's real format)
    bits: int
    data_start: int
    # The end of the samples actually present: the declared size only when the file holds it.
    data_end: int

    @property
    def frames(self) -> int:
        return (self.data_end - self.data_start) // self.block_align

    @property
    def seconds(self) -> float:
        return self.frames / self.rate


def is_wav(data: bytes) -> bool:
    """Whether the bytes say they are a WAV file (RIFF, or the RIFX/RF64 variants)."""
    return data[:4] in (b"RIFF", b"RIFX", b"RF64") and data[8:12] == b"WAVE"


def read_wav(data: bytes, max_seconds: float | None = None) -> WavLayout:
    """The checked layout of a RIFF/WAVE file; AudioError for anything outside the bounds
    above, AudioTooLong past `max_seconds` (counted on the frames present)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        if data[:4] in (b"RIFX", b"RF64") and data[8:12] == b"WAVE":
            raise AudioError(f"{data[:4].decode()} WAV files are not supported; {SUPPORTED}.")
        raise AudioError(f"The file is not a WAV file (no RIFF/WAVE header); {SUPPORTED}.")
    fmt: bytes | None = None
    pos = 12
    for _ in range(MAX_CHUNKS):
        if pos + 8 > len(data):
            if fmt is None:
                raise AudioError("The WAV file is truncated: it ends before its 'fmt ' chunk.")
            raise AudioError("The WAV file is truncated: it ends before its 'data' chunk.")
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body = pos + 8
        present = len(data) - body
        if chunk_id == b"data":
            if fmt is None:
                raise AudioError("The WAV file has its 'data' chunk before its 'fmt ' chunk.")
            # The format first: an impossible rate or channel count says more than a size.
            parsed = _parse_fmt(fmt)
            if size > present and size < _STREAMING_PLACEHOLDER:
                raise AudioError(
                    f"The WAV 'data' chunk says it holds {size} bytes but the file has only {present} after its "
                    "header: the file is truncated or its header is wrong."
                )
            return _layout(parsed, body, body + min(size, present), max_seconds)
        if size > present:
            name = chunk_id.decode("latin-1")
            raise AudioError(
                f"The WAV file is truncated inside its '{name}' chunk: it says {size} bytes, the file has {present}."
            )
        if chunk_id == b"fmt ":
            fmt = data[body : body + size]
        # Chunks are padded to an even length.
        pos = body + size + (size & 1)
    raise AudioError(f"The WAV file has more than {MAX_CHUNKS} chunks before its 'data' chunk.")


def _layout(
    parsed: tuple[int, int, int, int, int], data_start: int, data_end: int, max_seconds: float | None
) -> WavLayout:
    channels, rate, block_align, sample_format, bits = parsed
    layout = WavLayout(channels, rate, block_align, sample_format, bits, data_start, data_end)
    if layout.frames == 0:
        raise AudioError("The WAV file has no audio frames.")
    if max_seconds is not None and layout.seconds > max_seconds:
        raise AudioTooLong(f"The audio is {layout.seconds:.1f} seconds long; the limit is {max_seconds:g} seconds.")
    return layout


def _parse_fmt(fmt: bytes) -> tuple[int, int, int, int, int]:
    """(channels, rate, block_align, PCM or IEEE float, bits per sample) from a 'fmt ' chunk."""
    if len(fmt) < 16:
        raise AudioError(f"The WAV 'fmt ' chunk is {len(fmt)} bytes; it needs at least 16.")
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _EXTENSIBLE:
        if len(fmt) < 40:
            raise AudioError("The WAV file says WAVE_FORMAT_EXTENSIBLE but its 'fmt ' chunk is too short for it.")
        guid = fmt[24:40]
        if guid[2:] != _KSDATAFORMAT_SUFFIX:
            raise AudioError(f"The WAV file's sub-format {guid.hex()} is not PCM or float; {SUPPORTED}.")
        (tag,) = struct.unpack_from("<H", guid)
    if tag not in _BITS:
        name = _FORMAT_NAMES.get(tag, f"format 0x{tag:04x}")
        raise AudioError(f"Compressed WAV ({name}) is not supported; {SUPPORTED}.")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"The WAV file says it has {channels} channels; 1 to {MAX_CHANNELS} are supported.")
    if rate not in RATES:
        raise AudioError(
            f"The WAV file says its sample rate is {rate} Hz; supported rates are "
            + ", ".join(str(r) for r in RATES)
            + " Hz."
        )
    if bits not in _BITS[tag]:
        kind = "PCM" if tag == PCM else "float"
        raise AudioError(f"{bits}-bit {kind} WAV is not supported; {SUPPORTED}.")
    # A frame holds one sample per channel; writers may pad it, but not beyond a sample's
    # width again per channel.
    if not channels * bits // 8 <= block_align <= 2 * channels * bits // 8:
        raise AudioError(
            f"The WAV header is inconsistent: {channels} channels of {bits} bits do not fit a {block_align}-byte frame."
        )
    return channels, rate, block_align, tag, bits


def check_upload(data: bytes, param: str, max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
    """Refuse, before it goes anywhere, a WAV upload outside the bounds: GatewayError 400
    naming `param` (`invalid_audio`, or `audio_too_long`). Other formats pass: hosted
    models take MP3, FLAC and more, which the provider checks, and the worker refuses."""
    if not is_wav(data):
        return
    try:
        layout = read_wav(data, max_seconds)
    except AudioTooLong as exc:
        raise GatewayError.bad_request(str(exc), param, "audio_too_long") from None
    except AudioError as exc:
        raise GatewayError.bad_request(f"The audio file is out of bounds: {exc}", param, "invalid_audio") from None
    check_min_length(layout, param)


def check_min_length(layout: WavLayout, param: str) -> None:
    """GatewayError 400 for audio too short to transcribe."""
    if layout.seconds < MIN_SECONDS:
        raise GatewayError.bad_request(
            f"The audio is {layout.seconds:.4f} seconds long; at least {MIN_SECONDS:g} seconds are needed.",
            param,
            "invalid_audio",
        )
