"""espeak-ng synthesis, PocketSphinx recognition, the round trip between them, and the two OpenAI tasks.

These need the espeak-ng program (scripts/setup.sh installs it); without it they fail
rather than skip, since the speech endpoint would be broken too.
"""

from __future__ import annotations

import io
import re
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from clawdbot.common.errors import GatewayError
from clawdbot.worker.audio import decode_wav, encode_wav, resample, to_int16
from clawdbot.worker.runtimes.espeak import OPENAI_VOICES, Espeak, UnknownVoice
from clawdbot.worker.runtimes.sphinx import Sphinx, build_arpa
from clawdbot.worker.speech import SpeechTask
from clawdbot.worker.transcription import TranscriptionTask

INTENTS = Path(__file__).resolve().parents[2] / "config" / "intents.yaml"

# Used when config/intents.yaml is absent: varied commands, so that the recogniser has to
# generalise rather than look one sentence up.
FALLBACK_VOCABULARY = [
    "turn on the kitchen lights",
    "turn off the lights in the living room",
    "switch on the bedroom lamp",
    "dim the lights in the hallway",
    "set a timer for ten minutes",
    "start a timer for five minutes",
    "cancel the timer",
    "what is the weather like today",
    "will it rain tomorrow",
    "what's the weather tomorrow morning",
    "play some music",
    "play some jazz in the kitchen",
    "turn the volume down",
    "set an alarm for seven in the morning",
]


def vocabulary() -> list[str]:
    if not INTENTS.is_file():
        return FALLBACK_VOCABULARY
    intents = yaml.safe_load(INTENTS.read_text(encoding="utf-8"))["intents"]
    return [example for intent in intents.values() for example in intent["examples"]]


@pytest.fixture(scope="module")
def espeak() -> Espeak:
    return Espeak.load()


@pytest.fixture(scope="module")
def sphinx() -> Sphinx:
    return Sphinx.load(vocabulary())


def stereo_wav(samples: np.ndarray[Any, Any], rate: int) -> bytes:
    """Two identical 16-bit channels, as a phone or browser might record."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.repeat(to_int16(samples), 2).astype("<i2").tobytes())
    return buffer.getvalue()


# --- espeak-ng --------------------------------------------------------------------------


def test_synthesis_is_valid_audio(espeak: Espeak) -> None:
    samples, rate = espeak.synthesize("Turn on the kitchen lights.", "alloy")
    assert samples.dtype == np.int16
    assert samples.ndim == 1
    assert rate == 22050
    assert 0.5 < len(samples) / rate < 5
    assert np.abs(samples).max() > 3000  # speech, not silence
    decoded, decoded_rate = decode_wav(encode_wav(samples, rate))
    assert decoded_rate == rate
    np.testing.assert_array_equal(to_int16(decoded), samples)


def test_speed_changes_duration(espeak: Espeak) -> None:
    text = "Set a timer for ten minutes, then play some music."
    lengths = [len(espeak.synthesize(text, "alloy", speed)[0]) for speed in (0.5, 1.0, 2.0)]
    assert lengths[0] > lengths[1] * 1.5
    assert lengths[1] > lengths[2] * 1.5


def test_speed_is_clamped_to_espeaks_range() -> None:
    assert Espeak.words_per_minute(1.0) == 175
    assert Espeak.words_per_minute(2.0) == 350
    assert Espeak.words_per_minute(0.25) == 80
    assert Espeak.words_per_minute(4.0) == 450


def test_openai_voices_map_to_distinct_installed_voices(espeak: Espeak) -> None:
    assert set(OPENAI_VOICES) == {
        "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
    }  # fmt: skip
    assert len(set(OPENAI_VOICES.values())) == len(OPENAI_VOICES)
    rendered = set()
    for name in OPENAI_VOICES:
        assert espeak.resolve_voice(name) == OPENAI_VOICES[name]
        assert espeak.resolve_voice(name.upper()) == OPENAI_VOICES[name]
        samples, _ = espeak.synthesize("Hello there.", name)
        rendered.add(samples.tobytes())
    assert len(rendered) == len(OPENAI_VOICES)  # each one sounds different


def test_espeak_voices_directly(espeak: Espeak) -> None:
    assert espeak.resolve_voice("en-gb") == "en-gb"
    assert espeak.resolve_voice("EN-US+F3") == "en-us+f3"
    assert espeak.resolve_voice("fr+klatt") == "fr+klatt"
    assert "en-gb-scotland" in espeak.accepted_voices()
    samples, _ = espeak.synthesize("Bonjour tout le monde.", "fr")
    assert len(samples) > 0


@pytest.mark.parametrize("voice", ["galaxy", "en-us+nosuchvariant", "xx", "en-us --stdout", ""])
def test_unknown_voice(espeak: Espeak, voice: str) -> None:
    with pytest.raises(UnknownVoice) as caught:
        espeak.synthesize("hello", voice)
    assert caught.value.voice == voice
    assert caught.value.accepted[: len(OPENAI_VOICES)] == tuple(OPENAI_VOICES)
    assert "en-us" in caught.value.accepted


def test_text_is_never_read_as_options(espeak: Espeak) -> None:
    # On the command line these would print help or switch voice; on stdin they are just words.
    for text in ("--help", "-v fr -s 80 hello", "$(touch /tmp/clawdbot-pwned) `id`"):
        samples, rate = espeak.synthesize(text, "alloy")
        assert len(samples) / rate > 0.2
    assert not Path("/tmp/clawdbot-pwned").exists()


# --- PocketSphinx -----------------------------------------------------------------------


def test_arpa_model_is_normalised() -> None:
    """Every history's distribution over the vocabulary sums to one, seen and backed-off words together."""
    sentences = [s.split() for s in ("turn on the lights", "turn off the lights", "turn the lights on")]
    words = frozenset({"turn", "on", "off", "the", "lights", "please"})
    arpa = build_arpa(sentences, words)
    probs: dict[tuple[str, ...], float] = {}
    backoffs: dict[tuple[str, ...], float] = {}
    order = 0
    for line in arpa.splitlines():
        if line.endswith("-grams:"):
            order = int(line[1])
            continue
        fields = line.split()
        if order and len(fields) >= order + 1 and not line.startswith("\\"):
            ngram = tuple(fields[1 : order + 1])
            probs[ngram] = 10 ** float(fields[0])
            if len(fields) == order + 2:
                backoffs[ngram] = 10 ** float(fields[-1])

    def p(ngram: tuple[str, ...]) -> float:
        if ngram in probs:
            return probs[ngram]
        return backoffs.get(ngram[:-1], 1.0) * p(ngram[1:])

    targets = [*sorted(words), "</s>"]
    for history in [("<s>",), ("the",), ("turn", "the"), ("<s>", "turn"), ("please",), ("lights", "please")]:
        assert sum(p((*history, w)) for w in targets) == pytest.approx(1.0, abs=1e-6), history
    # "please" is in no sentence, but reachable.
    assert 0 < p(("the", "please")) < p(("the", "lights"))


def test_vocabulary_words_missing_from_the_dictionary_are_reported() -> None:
    recogniser = Sphinx.load(["turn on the zorblax lights", "set a timer"])
    assert recogniser.unknown_words == ("zorblax",)
    assert {"turn", "lights", "timer"} <= recogniser.words


def test_silence_transcribes_to_nothing(sphinx: Sphinx) -> None:
    sphinx.warm_up()
    assert sphinx.transcribe(np.zeros(16000, dtype=np.float32)) == ""
    assert sphinx.transcribe(np.zeros(0, dtype=np.float32)) == ""


# Sentences the recogniser must get, with the words a test holds it to. All but the first
# two are absent from config/intents.yaml, so the model has to generalise.
ROUND_TRIPS = [
    ("turn on the kitchen lights", {"kitchen", "lights"}),
    ("set a timer for ten minutes", {"timer", "ten", "minutes"}),
    ("turn on the bedroom lights", {"bedroom", "lights"}),
    ("play some music in the kitchen", {"music", "kitchen"}),
    ("what is the weather tomorrow", {"weather", "tomorrow"}),
]


@pytest.mark.parametrize(("sentence", "keywords"), ROUND_TRIPS)
def test_round_trip_at_espeaks_rate(espeak: Espeak, sphinx: Sphinx, sentence: str, keywords: set[str]) -> None:
    samples, rate = espeak.synthesize(sentence, "alloy")
    assert rate == 22050
    mono16k = resample(samples.astype(np.float32) / np.float32(32768), rate, Sphinx.sample_rate)
    words = set(sphinx.transcribe(mono16k).split())
    assert keywords <= words


def test_concurrent_transcriptions_agree(espeak: Espeak, sphinx: Sphinx) -> None:
    clips = [
        resample(espeak.synthesize(sentence, "alloy")[0].astype(np.float32) / np.float32(32768), 22050, 16000)
        for sentence, _ in ROUND_TRIPS[:3]
    ]
    alone = [sphinx.transcribe(clip) for clip in clips]
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(sphinx.transcribe, clips * 2))
    assert together == alone * 2


@pytest.mark.asyncio
async def test_round_trip_through_the_task_as_44k_stereo(espeak: Espeak, sphinx: Sphinx) -> None:
    samples, rate = espeak.synthesize("Turn on the kitchen lights", "alloy")
    stereo = stereo_wav(resample(samples.astype(np.float32) / np.float32(32768), rate, 44100), 44100)
    result = await TranscriptionTask("sphinx-en", sphinx).answer({"model": "sphinx-en", "language": "en"}, stereo)
    assert {"kitchen", "lights"} <= set(result["text"].split())
    assert result["language"] == "english"
    assert result["duration"] == pytest.approx(len(samples) / rate, abs=0.01)


@pytest.mark.asyncio
async def test_speech_task_output_transcribes(espeak: Espeak, sphinx: Sphinx) -> None:
    audio, content_type = await SpeechTask("espeak", espeak).answer(
        {"model": "espeak", "input": "Set a timer for ten minutes.", "voice": "alloy"}
    )
    assert content_type == "audio/wav"
    result = await TranscriptionTask("sphinx-en", sphinx).answer({}, audio)
    assert {"timer", "minutes"} <= set(result["text"].split())


# --- the speech task --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_speech_formats(espeak: Espeak) -> None:
    task = SpeechTask("espeak", espeak)
    body = {"model": "espeak", "input": "Hello world.", "voice": "nova"}
    wav, wav_type = await task.answer({**body, "response_format": "wav", "speed": 1.5})
    assert wav_type == "audio/wav"
    samples, rate = decode_wav(wav)
    pcm, pcm_type = await task.answer({**body, "response_format": "pcm"})
    assert pcm_type == "audio/pcm;rate=24000"
    assert len(pcm) % 2 == 0
    # Slower speech (speed 1 vs 1.5) at a higher rate (24 kHz vs 22.05): more samples.
    assert len(pcm) // 2 > len(samples)
    assert rate == 22050


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("change", "param", "says"),
    [
        ({"input": None}, "input", "must be a string"),
        ({"input": ["a", "b"]}, "input", "must be a string"),
        ({"input": "   "}, "input", "empty"),
        ({"input": "x" * 4097}, "input", "4097 characters; the limit is 4096"),
        ({"voice": None}, "voice", "'voice' is required"),
        ({"voice": 3}, "voice", "'voice' is required"),
        ({"voice": "galaxy"}, "voice", "Unknown voice 'galaxy'.*alloy, ash, ballad.*en-gb"),
        ({"speed": 0.1}, "speed", "from 0.25 to 4.0"),
        ({"speed": 4.5}, "speed", "from 0.25 to 4.0"),
        ({"speed": "fast"}, "speed", "number"),
        ({"speed": True}, "speed", "number"),
        ({"response_format": "mp3"}, "response_format", "'mp3' is not supported.*'wav' or 'pcm'"),
        ({"response_format": "opus"}, "response_format", "'wav' or 'pcm'"),
    ],
)
async def test_speech_task_rejects(espeak: Espeak, change: dict[str, Any], param: str, says: str) -> None:
    body = {"model": "espeak", "input": "Hello.", "voice": "alloy", **change}
    with pytest.raises(GatewayError) as caught:
        await SpeechTask("espeak", espeak).answer(body)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    assert re.search(says, caught.value.message), caught.value.message


@pytest.mark.asyncio
async def test_speech_task_accepts_openai_extras(espeak: Espeak) -> None:
    audio, content_type = await SpeechTask("espeak", espeak).answer(
        {"model": "espeak", "input": "Hi.", "voice": "ash", "instructions": "Speak cheerfully.", "speed": 1}
    )
    assert content_type == "audio/wav"
    assert audio[:4] == b"RIFF"


# --- the transcription task -------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("params", "audio", "param", "code"),
    [
        ({"language": "fr"}, encode_wav(np.zeros(1600, dtype=np.int16), 16000), "language", "unsupported_language"),
        ({}, b"", "file", "empty_file"),
        ({}, b"ID3\x04" + b"\x00" * 200, "file", "invalid_audio"),
        ({}, encode_wav(np.zeros(16000 * 3, dtype=np.int16), 16000), "file", "audio_too_long"),
    ],
)
async def test_transcription_task_rejects(
    sphinx: Sphinx, params: dict[str, Any], audio: bytes, param: str, code: str
) -> None:
    task = TranscriptionTask("sphinx-en", sphinx, max_seconds=2.0)
    with pytest.raises(GatewayError) as caught:
        await task.answer({"model": "sphinx-en", **params}, audio)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert caught.value.code == code
    if code == "invalid_audio":
        assert caught.value.message.startswith("The audio file could not be decoded: ")
