"""WAV in and out, on numpy and scipy: what the speech and transcription tasks need.

`decode_wav` parses the RIFF chunks itself instead of using the stdlib `wave` module:
`wave` refuses IEEE float and WAVE_FORMAT_EXTENSIBLE files, and one parser for every
format keeps one set of rules for odd headers. `encode_wav` does use `wave`, which writes
plain 16-bit PCM correctly.

A data chunk that claims more bytes than the file holds is read to the end of the file:
writers that stream to a pipe (espeak-ng --stdout, ffmpeg) cannot seek back to fill in
the sizes, so they leave placeholders such as 0x7ffff000 or 0xffffffff.
"""

from __future__ import annotations

import io
import math
import struct
import wave
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy.signal import resample_poly  # type: ignore[import-untyped]

F32 = npt.NDArray[np.float32]
I16 = npt.NDArray[np.int16]

_PCM: Final = 0x0001
_IEEE_FLOAT: Final = 0x0003
_EXTENSIBLE: Final = 0xFFFE
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
_SUPPORTED: Final = "16-bit PCM WAV is the safest choice; 8/24/32-bit PCM and 32/64-bit float WAV also work"


class AudioError(ValueError):
    """The bytes are not audio this module can decode; the message says why, for a client to read."""


class AudioTooLong(AudioError):
    """The audio decodes but is longer than the caller allows."""


def decode_wav(data: bytes, max_seconds: float | None = None) -> tuple[F32, int]:
    """Samples in [-1, 1] as float32 mono (channels averaged), and the sample rate.

    Accepts RIFF/WAVE PCM of 8, 16, 24 or 32 bits, IEEE float of 32 or 64 bits, and the
    same inside WAVE_FORMAT_EXTENSIBLE, at any rate and channel count. Raises AudioError
    for anything else, and AudioTooLong past `max_seconds` (checked before decoding).
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        if data[:4] in (b"RIFX", b"RF64") and data[8:12] == b"WAVE":
            raise AudioError(f"{data[:4].decode()} WAV files are not supported; {_SUPPORTED}.")
        raise AudioError(f"The file is not a WAV file (no RIFF/WAVE header); {_SUPPORTED}.")

    fmt: bytes | None = None
    pos = 12
    while True:
        if pos + 8 > len(data):
            if fmt is None:
                raise AudioError("The WAV file is truncated: it ends before its 'fmt ' chunk.")
            raise AudioError("The WAV file is truncated: it ends before its 'data' chunk.")
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body = pos + 8
        if chunk_id == b"fmt ":
            if body + size > len(data):
                raise AudioError("The WAV file is truncated inside its 'fmt ' chunk.")
            fmt = data[body : body + size]
        elif chunk_id == b"data":
            if fmt is None:
                raise AudioError("The WAV file has its 'data' chunk before its 'fmt ' chunk.")
            payload = data[body : body + size]  # shorter than `size` when streamed; see the module docstring
            break
        # Chunks are padded to an even length.
        pos = body + size + (size & 1)

    channels, rate, block_align, sample_format, container_bits = _parse_fmt(fmt)
    frames = len(payload) // block_align
    if frames == 0:
        raise AudioError("The WAV file has no audio frames.")
    seconds = frames / rate
    if max_seconds is not None and seconds > max_seconds:
        raise AudioTooLong(f"The audio is {seconds:.1f} seconds long; the limit is {max_seconds:g} seconds.")

    raw = np.frombuffer(payload, dtype=np.uint8, count=frames * block_align).reshape(frames, block_align)
    width = container_bits // 8
    # Samples sit side by side at the start of each block; some writers pad the block.
    interleaved = raw[:, : channels * width].reshape(frames * channels, width)
    samples = _to_float(interleaved, sample_format, container_bits).reshape(frames, channels)
    mono = samples[:, 0] if channels == 1 else samples.mean(axis=1, dtype=np.float64)
    out = np.ascontiguousarray(mono, dtype=np.float32)
    if sample_format == _IEEE_FLOAT and not np.isfinite(out).all():
        raise AudioError("The WAV file contains NaN or infinite samples.")
    return out, rate


def _parse_fmt(fmt: bytes) -> tuple[int, int, int, int, int]:
    """(channels, rate, block_align, PCM or IEEE float, bits per sample container) from a 'fmt ' chunk."""
    if len(fmt) < 16:
        raise AudioError(f"The WAV 'fmt ' chunk is {len(fmt)} bytes; it needs at least 16.")
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _EXTENSIBLE:
        if len(fmt) < 40:
            raise AudioError("The WAV file says WAVE_FORMAT_EXTENSIBLE but its 'fmt ' chunk is too short for it.")
        guid = fmt[24:40]
        if guid[2:] != _KSDATAFORMAT_SUFFIX:
            raise AudioError(f"The WAV file's sub-format {guid.hex()} is not PCM or float; {_SUPPORTED}.")
        (tag,) = struct.unpack_from("<H", guid)
    if tag not in (_PCM, _IEEE_FLOAT):
        name = _FORMAT_NAMES.get(tag, f"format 0x{tag:04x}")
        raise AudioError(f"Compressed WAV ({name}) is not supported; {_SUPPORTED}.")
    if channels == 0:
        raise AudioError("The WAV file says it has 0 channels.")
    if rate == 0:
        raise AudioError("The WAV file says its sample rate is 0 Hz.")
    allowed = (8, 16, 24, 32) if tag == _PCM else (32, 64)
    if bits not in allowed:
        kind = "PCM" if tag == _PCM else "float"
        raise AudioError(f"{bits}-bit {kind} WAV is not supported; {_SUPPORTED}.")
    if block_align < channels * bits // 8:
        raise AudioError(
            f"The WAV header is inconsistent: {channels} channels of {bits} bits do not fit a {block_align}-byte frame."
        )
    return channels, rate, block_align, tag, bits


def _to_float(interleaved: npt.NDArray[np.uint8], sample_format: int, bits: int) -> npt.NDArray[np.floating]:
    """One column of little-endian sample bytes per row in, floats in [-1, 1] out."""
    flat = np.ascontiguousarray(interleaved).reshape(-1)
    if sample_format == _IEEE_FLOAT:
        return flat.view("<f4" if bits == 32 else "<f8")
    if bits == 8:
        # 8-bit WAV is the one unsigned PCM width: silence is 128.
        return (flat.astype(np.float32) - 128.0) / 128.0
    if bits == 16:
        return flat.view("<i2").astype(np.float32) / 32768.0
    if bits == 24:
        # Put the three bytes in the top of an int32 so the sign comes along, then scale.
        padded = np.zeros((interleaved.shape[0], 4), dtype=np.uint8)
        padded[:, 1:] = interleaved
        return (padded.reshape(-1).view("<i4") >> 8).astype(np.float64) / float(1 << 23)
    return flat.view("<i4").astype(np.float64) / float(1 << 31)


def resample(samples: F32, rate: int, target_rate: int) -> F32:
    """`samples` at `rate` Hz, resampled to `target_rate` Hz with a polyphase filter."""
    if rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {rate} and {target_rate}")
    if rate == target_rate:
        return np.asarray(samples, dtype=np.float32)
    g = math.gcd(rate, target_rate)
    out = resample_poly(np.asarray(samples, dtype=np.float32), target_rate // g, rate // g)
    return np.asarray(out, dtype=np.float32)


def to_int16(samples: npt.NDArray[np.int16] | npt.NDArray[np.floating]) -> I16:
    """16-bit samples: int16 passes through; floats in [-1, 1] are scaled by 32768 and clipped.

    32768 (not 32767) is the inverse of what `decode_wav` divides by, so 16-bit audio
    survives a decode and re-encode bit for bit.
    """
    array = np.asarray(samples)
    if array.dtype == np.int16:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"expected int16 or float samples, got {array.dtype}")
    return np.clip(np.rint(array * 32768.0), -32768, 32767).astype(np.int16)


def encode_wav(samples: npt.NDArray[np.int16] | npt.NDArray[np.floating], rate: int) -> bytes:
    """A 16-bit mono PCM WAV file of `samples` (int16, or floats in [-1, 1]) at `rate` Hz."""
    pcm = to_int16(samples)
    if pcm.ndim != 1:
        raise ValueError(f"expected mono samples (one dimension), got shape {pcm.shape}")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.astype("<i2", copy=False).tobytes())
    return buffer.getvalue()
