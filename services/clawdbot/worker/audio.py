"""WAV in and out, on numpy and scipy: what the speech and transcription tasks need.

`decode_wav` reads the RIFF chunks with clawdbot.common.audio_bounds (the reader the
adapter checks uploads with) instead of the stdlib `wave` module: `wave` trusts the
header's chunk sizes and refuses IEEE float and WAVE_FORMAT_EXTENSIBLE files, and one
reader for every format keeps one set of rules for odd and hostile headers. `encode_wav`
does use `wave`, which writes plain 16-bit PCM correctly.

A data chunk whose size is a streaming placeholder is read to the end of the file:
writers that stream to a pipe (espeak-ng --stdout, ffmpeg) cannot seek back to fill in
the sizes, so they leave placeholders such as 0x7ffff000 or 0xffffffff.
"""

from __future__ import annotations

import io
import math
import wave
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy.signal import resample_poly  # type: ignore[import-untyped]

from clawdbot.common.audio_bounds import IEEE_FLOAT, AudioError, AudioTooLong, read_wav

F32 = npt.NDArray[np.float32]
I16 = npt.NDArray[np.int16]

# The longest resampling filter allowed; between any two listed rates it is at most 12,801.
MAX_RESAMPLE_TAPS: Final = 32_769

__all__ = ["AudioError", "AudioTooLong", "decode_wav", "encode_wav", "resample", "to_int16"]


def decode_wav(data: bytes, max_seconds: float | None = None) -> tuple[F32, int]:
    """Samples in [-1, 1] as float32 mono (channels averaged), and the sample rate.

    Accepts RIFF/WAVE PCM of 8, 16, 24 or 32 bits, IEEE float of 32 or 64 bits, and the
    same inside WAVE_FORMAT_EXTENSIBLE, within the bounds of clawdbot.common.audio_bounds
    (listed sample rates, 1 to 8 channels). Raises AudioError for anything else, and
    AudioTooLong past `max_seconds` (checked on the frames present, before decoding).
    """
    layout = read_wav(data, max_seconds)
    frames, block_align, channels = layout.frames, layout.block_align, layout.channels
    payload = memoryview(data)[layout.data_start : layout.data_end]
    raw = np.frombuffer(payload, dtype=np.uint8, count=frames * block_align).reshape(frames, block_align)
    width = layout.bits // 8
    # Samples sit side by side at the start of each block; some writers pad the block.
    interleaved = raw[:, : channels * width].reshape(frames * channels, width)
    samples = _to_float(interleaved, layout.sample_format, layout.bits).reshape(frames, channels)
    mono = samples[:, 0] if channels == 1 else samples.mean(axis=1, dtype=np.float64)
    out = np.ascontiguousarray(mono, dtype=np.float32)
    if layout.sample_format == IEEE_FLOAT and not np.isfinite(out).all():
        raise AudioError("The WAV file contains NaN or infinite samples.")
    return out, layout.rate


def _to_float(interleaved: npt.NDArray[np.uint8], sample_format: int, bits: int) -> npt.NDArray[np.floating]:
    """One column of little-endian sample bytes per row in, floats in [-1, 1] out."""
    flat = np.ascontiguousarray(interleaved).reshape(-1)
    if sample_format == IEEE_FLOAT:
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
    up, down = target_rate // g, rate // g
    # resample_poly designs a filter of 20*max(up, down)+1 taps: an odd rate pair (999,983 Hz
    # to 16 kHz: 20M taps) costs seconds and gigabytes. Decoded files only carry listed
    # rates (audio_bounds.RATES), which stay far below this; anything else is a bug.
    if 20 * max(up, down) + 1 > MAX_RESAMPLE_TAPS:
        raise ValueError(f"resampling {rate} Hz to {target_rate} Hz needs too long a filter ({up}/{down})")
    out = resample_poly(np.asarray(samples, dtype=np.float32), up, down)
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
