"""WAV decoding of every supported layout, resampling, encoding, and the errors for everything else."""

from __future__ import annotations

import io
import struct
import wave

import numpy as np
import numpy.typing as npt
import pytest

from clawdbot.worker.audio import AudioError, AudioTooLong, decode_wav, encode_wav, resample, to_int16

PCM, FLOAT, EXTENSIBLE = 1, 3, 0xFFFE
KSDATAFORMAT_SUFFIX = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def sine(freq: float, rate: int, seconds: float = 0.25, amplitude: float = 0.5) -> npt.NDArray[np.float64]:
    t = np.arange(round(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def wav_bytes(
    payload: bytes,
    *,
    tag: int = PCM,
    channels: int = 1,
    rate: int = 16000,
    bits: int = 16,
    extensible: bool = False,
    data_size: int | None = None,
    before_data: bytes = b"",
) -> bytes:
    """A RIFF/WAVE file assembled by hand, so every header field can be set (and got wrong)."""
    block_align = channels * bits // 8
    fmt = struct.pack(
        "<HHIIHH", EXTENSIBLE if extensible else tag, channels, rate, rate * block_align, block_align, bits
    )
    if extensible:
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + KSDATAFORMAT_SUFFIX
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + before_data
    body += b"data" + struct.pack("<I", len(payload) if data_size is None else data_size) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def quantise(x: npt.NDArray[np.float64], bits: int) -> bytes:
    """Interleaved little-endian PCM bytes of floats in [-1, 1) (frames x channels, or mono)."""
    flat = x.reshape(-1)
    if bits == 8:
        return (np.round(flat * 127) + 128).astype(np.uint8).tobytes()
    scaled = np.round(flat * (2 ** (bits - 1) - 1)).astype(np.int64)
    if bits == 24:
        as_bytes = scaled.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
        return as_bytes.tobytes()
    return scaled.astype({16: "<i2", 32: "<i4"}[bits]).tobytes()


@pytest.mark.parametrize("bits", [8, 16, 24, 32])
def test_pcm_widths(bits: int) -> None:
    x = sine(440, 16000)
    samples, rate = decode_wav(wav_bytes(quantise(x, bits), bits=bits))
    assert rate == 16000
    assert samples.dtype == np.float32
    assert samples.shape == x.shape
    np.testing.assert_allclose(samples, x, atol=2.0 ** -(bits - 1) * 1.5)


@pytest.mark.parametrize(("bits", "dtype"), [(32, "<f4"), (64, "<f8")])
def test_ieee_float(bits: int, dtype: str) -> None:
    x = sine(1000, 22050, amplitude=0.9)
    samples, rate = decode_wav(wav_bytes(x.astype(dtype).tobytes(), tag=FLOAT, bits=bits, rate=22050))
    assert rate == 22050
    np.testing.assert_allclose(samples, x, atol=1e-6)


@pytest.mark.parametrize(("tag", "bits"), [(PCM, 16), (PCM, 24), (FLOAT, 32)])
def test_wave_format_extensible(tag: int, bits: int) -> None:
    x = sine(300, 48000)
    payload = x.astype("<f4").tobytes() if tag == FLOAT else quantise(x, bits)
    samples, rate = decode_wav(wav_bytes(payload, tag=tag, bits=bits, rate=48000, extensible=True))
    assert rate == 48000
    np.testing.assert_allclose(samples, x, atol=1e-4)


@pytest.mark.parametrize("channels", [2, 6])
def test_channels_are_averaged_to_mono(channels: int) -> None:
    left = sine(440, 16000)
    frames = np.stack([left * (1 - 0.5 * c) for c in range(channels)], axis=1)  # c = 0 is the loudest
    samples, _ = decode_wav(wav_bytes(quantise(frames, 16), channels=channels))
    np.testing.assert_allclose(samples, frames.mean(axis=1), atol=1e-4)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_encode_then_decode_is_exact_for_16_bit(rate: int) -> None:
    pcm = to_int16(sine(440, rate, amplitude=0.8))
    data = encode_wav(pcm, rate)
    with wave.open(io.BytesIO(data)) as reader:  # what other software will see
        assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (1, 2, rate)
        assert reader.getnframes() == len(pcm)
    samples, decoded_rate = decode_wav(data)
    assert decoded_rate == rate
    np.testing.assert_array_equal(to_int16(samples), pcm)


def test_encode_clips_floats_out_of_range() -> None:
    samples, _ = decode_wav(encode_wav(np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]), 8000))
    np.testing.assert_allclose(samples, [-1.0, -1.0, 0.0, 0.5, 32767 / 32768, 32767 / 32768])


def test_streamed_sizes_and_odd_chunks() -> None:
    # espeak-ng --stdout (and ffmpeg writing to a pipe) leave placeholder sizes; a LIST
    # chunk of odd length is followed by a pad byte.
    x = sine(440, 22050)
    odd_chunk = b"LIST" + struct.pack("<I", 5) + b"abcde" + b"\x00"
    data = wav_bytes(quantise(x, 16), rate=22050, data_size=0x7FFFF000, before_data=odd_chunk)
    samples, rate = decode_wav(data)
    assert rate == 22050
    assert samples.shape == x.shape


def test_max_seconds() -> None:
    data = encode_wav(np.zeros(16000 * 3, dtype=np.int16), 16000)
    samples, _ = decode_wav(data, max_seconds=3.0)
    assert len(samples) == 48000
    with pytest.raises(AudioTooLong, match=r"3\.0 seconds long; the limit is 2 seconds"):
        decode_wav(data, max_seconds=2)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a WAV file"),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff" * 100, "not a WAV file"),
        (b"OggS" + b"\x00" * 60, "not a WAV file"),
        (b"RIFX" + b"\x00" * 4 + b"WAVE" + b"\x00" * 40, "RIFX WAV files are not supported"),
        (wav_bytes(b"\x00\x00" * 10)[:30], "truncated"),
        (wav_bytes(b"\x00\x00" * 10)[:36], "ends before its 'data' chunk"),
        (wav_bytes(b""), "no audio frames"),
        (wav_bytes(b"\x00"), "no audio frames"),  # less than one frame
        (wav_bytes(b"\x00" * 64, tag=2, bits=4), r"Compressed WAV \(Microsoft ADPCM\)"),
        (wav_bytes(b"\x00" * 64, tag=0x55, bits=0), r"Compressed WAV \(MP3\)"),
        (wav_bytes(b"\x00" * 64, tag=7, bits=8), r"mu-law"),
        (wav_bytes(b"\x00" * 64, tag=0x1234, bits=8), r"format 0x1234"),
        (wav_bytes(b"\x00" * 64, bits=12), "12-bit PCM"),
        (wav_bytes(b"\x00" * 64, tag=FLOAT, bits=16), "16-bit float"),
        (wav_bytes(b"\x00" * 64, channels=0), "0 channels"),
        (wav_bytes(b"\x00" * 64, rate=0), "0 Hz"),
        (wav_bytes(np.array([0.0, np.nan], dtype="<f4").tobytes(), tag=FLOAT, bits=32), "NaN"),
    ],
)
def test_bad_input(data: bytes, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        decode_wav(data)


def test_extensible_with_a_foreign_subformat() -> None:
    data = bytearray(wav_bytes(b"\x00" * 64, extensible=True))
    guid_at = data.index(KSDATAFORMAT_SUFFIX)
    data[guid_at] ^= 0xFF
    with pytest.raises(AudioError, match="sub-format"):
        decode_wav(bytes(data))


@pytest.mark.parametrize(("rate", "target"), [(44100, 16000), (22050, 16000), (8000, 16000), (48000, 24000)])
def test_resample_keeps_the_frequency(rate: int, target: int) -> None:
    x = sine(440, rate, seconds=1.0).astype(np.float32)
    y = resample(x, rate, target)
    assert y.dtype == np.float32
    assert len(y) == target  # one second
    spectrum = np.abs(np.fft.rfft(y))
    peak_hz = np.argmax(spectrum) * target / len(y)
    assert abs(peak_hz - 440) <= 1
    # Well inside the signal, away from the filter's edge effects, the amplitude is kept.
    assert np.max(np.abs(y[target // 4 : -target // 4])) == pytest.approx(0.5, abs=0.01)


def test_resample_to_the_same_rate_is_a_no_op() -> None:
    x = sine(440, 16000).astype(np.float32)
    np.testing.assert_array_equal(resample(x, 16000, 16000), x)
