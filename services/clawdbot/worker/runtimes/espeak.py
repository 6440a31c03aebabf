"""Text to speech with the espeak-ng command-line synthesiser (Debian package `espeak-ng`).

One `espeak-ng --stdout` process per request: it starts in milliseconds, the runtime
holds no state a second thread could disturb, and a hung synthesis can be killed with its
process. The text goes in on stdin, never on the command line, so no text can be read as
an option and nothing reaches a shell.

Voices: OpenAI's voice names map to distinct espeak-ng voice+variant pairs (accents and
pitch differ; none is meant to resemble OpenAI's). Any installed espeak-ng language
voice ("fr", "en-gb-scotland") also works, optionally with a variant ("en-us+f3").
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from clawdbot.worker.audio import AudioError, decode_wav, to_int16
from clawdbot.worker.runtimes.minilm import ModelUnavailable

I16 = npt.NDArray[np.int16]

_INSTALL_HINT: Final = "espeak-ng is not installed: apt-get install espeak-ng"

# OpenAI's voices (as of the gpt-4o-mini-tts voice list). Every one of these variants
# ships in Debian's espeak-ng-data; `load` checks that they are installed. British voices
# are "en" (gmw/en), not "en-gb": espeak-ng 1.51 silently drops a variant after "en-gb".
OPENAI_VOICES: Final[dict[str, str]] = {
    "alloy": "en-us",
    "ash": "en-us+m3",
    "ballad": "en-gb-x-rp+m2",
    "coral": "en-us+f2",
    "echo": "en-us+m1",
    "fable": "en+m4",
    "onyx": "en-us+m7",
    "nova": "en-us+f3",
    "sage": "en+f4",
    "shimmer": "en-us+f5",
    "verse": "en-gb-scotland+m5",
}

# espeak-ng speaks at 175 words per minute by default, which is OpenAI's speed 1.0.
# Below 80 wpm espeak-ng ignores the setting and above 450 it switches to a time-stretch
# that garbles formant speech, so OpenAI's range (0.25-4.0, i.e. 44-700 wpm) is clamped
# to 80-450: speeds under about 0.46 all sound alike, as do speeds over about 2.57.
_WPM_AT_SPEED_1: Final = 175
_MIN_WPM: Final = 80
_MAX_WPM: Final = 450

# Long enough for OpenAI's longest input (4096 characters) on a busy machine, which
# espeak-ng synthesises in well under ten seconds.
_DEFAULT_TIMEOUT: Final = 60.0


class UnknownVoice(ValueError):
    """The voice is neither an OpenAI voice name nor an installed espeak-ng voice."""

    def __init__(self, voice: str, accepted: tuple[str, ...]) -> None:
        self.voice = voice
        self.accepted = accepted
        super().__init__(f"unknown voice {voice!r}; accepted: {', '.join(accepted)}")


class SynthesisFailed(RuntimeError):
    """espeak-ng exited with an error, timed out, or wrote something that is not a WAV file."""


@dataclass(frozen=True, slots=True)
class _Voices:
    languages: frozenset[str]  # lower-case espeak-ng language voices, e.g. "en-us"
    variants: dict[str, str]  # lower-case name -> the name espeak-ng expects, e.g. "klatt" -> "klatt"


class Espeak:
    """espeak-ng behind a Python call. Safe to share between threads: each call runs its own process."""

    version: str  # espeak-ng's own, e.g. "1.51"

    def __init__(self, binary: str, voices: _Voices, version: str, timeout: float = _DEFAULT_TIMEOUT) -> None:
        self._binary = binary
        self._voices = voices
        self._timeout = timeout
        self.version = version

    @classmethod
    def load(cls, timeout: float = _DEFAULT_TIMEOUT) -> Espeak:
        """Find espeak-ng and read its voice list once; ModelUnavailable if it is missing or broken."""
        binary = shutil.which("espeak-ng")
        if binary is None:
            raise ModelUnavailable(_INSTALL_HINT)
        languages: set[str] = set()
        for row in _voice_rows(binary, "--voices", timeout):
            # MBROLA voices are listed even when the separate mbrola program and its
            # diphone databases are absent, and then fail; offer them only with mbrola.
            if not row.file.startswith("mb/") or shutil.which("mbrola"):
                languages.add(row.language)
                languages.update(row.other_languages)
        variants = {}
        for row in _voice_rows(binary, "--voices=variant", timeout):
            name = row.file.removeprefix("!v/")
            # A few variant files have spaces in their names ("Mr serious"); "+" syntax cannot name them.
            if " " not in name:
                variants[name.lower()] = name
        voices = _Voices(frozenset(languages), variants)
        missing = [f"{openai}={espeak}" for openai, espeak in OPENAI_VOICES.items() if not _resolves(espeak, voices)]
        if missing:
            raise ModelUnavailable(f"espeak-ng at {binary} lacks the voices {', '.join(missing)}; reinstall espeak-ng")
        return cls(binary, voices, _version(binary, timeout), timeout)

    def accepted_voices(self) -> tuple[str, ...]:
        """OpenAI's names first, then the installed espeak-ng language voices (any may take "+variant")."""
        return (*OPENAI_VOICES, *sorted(self._voices.languages))

    def resolve_voice(self, voice: str) -> str:
        """The espeak-ng `-v` argument for `voice`; UnknownVoice if there is none."""
        mapped = OPENAI_VOICES.get(voice.lower())
        if mapped is not None:
            return mapped
        resolved = _resolves(voice, self._voices)
        if resolved is None:
            raise UnknownVoice(voice, self.accepted_voices())
        return resolved

    @staticmethod
    def words_per_minute(speed: float) -> int:
        """espeak-ng's rate for OpenAI's `speed`, clamped to what espeak-ng does well (see _MIN_WPM)."""
        return max(_MIN_WPM, min(_MAX_WPM, round(_WPM_AT_SPEED_1 * speed)))

    def synthesize(self, text: str, voice: str, speed: float = 1.0) -> tuple[I16, int]:
        """16-bit mono samples of `text` spoken by `voice`, and their sample rate (22050 Hz for espeak-ng voices).

        Raises UnknownVoice for a voice it cannot resolve and SynthesisFailed if espeak-ng fails.
        """
        args = [
            self._binary,
            "--stdout",
            "-b",
            "1",  # the input is UTF-8
            "-v",
            self.resolve_voice(voice),
            "-s",
            str(self.words_per_minute(speed)),
        ]
        try:
            # Fixed argv, no shell; the text only ever travels on stdin.
            done = subprocess.run(
                args, input=text.encode("utf-8"), capture_output=True, timeout=self._timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise SynthesisFailed(f"espeak-ng took longer than {self._timeout:g} s") from exc
        if done.returncode != 0:
            detail = done.stderr.decode("utf-8", "replace").strip() or f"exit status {done.returncode}"
            raise SynthesisFailed(f"espeak-ng failed: {detail}")
        try:
            samples, rate = decode_wav(done.stdout)
        except AudioError as exc:
            raise SynthesisFailed(f"espeak-ng wrote unreadable audio: {exc}") from exc
        return to_int16(samples), rate

    def warm_up(self) -> None:
        """Synthesise one word, so the first request does not pay for loading the voice data from disk."""
        self.synthesize("ready", "alloy")


def _resolves(voice: str, voices: _Voices) -> str | None:
    """The canonical spelling of an espeak-ng "language[+variant]" voice, if it is installed."""
    language, plus, variant = voice.strip().lower().partition("+")
    if language not in voices.languages:
        return None
    if not plus:
        return language
    name = voices.variants.get(variant)
    return None if name is None else f"{language}+{name}"


@dataclass(frozen=True, slots=True)
class _VoiceRow:
    language: str
    file: str
    other_languages: tuple[str, ...]


# "(en 2)(en-gb 3)": other languages a voice speaks, each with a priority.
_OTHER_LANGUAGE: Final = re.compile(r"\(([^\s()]+) \d+\)")
_VERSION: Final = re.compile(r"text-to-speech:\s*(\S+)")


def _version(binary: str, timeout: float) -> str:
    # "eSpeak NG text-to-speech: 1.51  Data at: /usr/lib/x86_64-linux-gnu/espeak-ng-data"
    found = _VERSION.search(_run(binary, "--version", timeout))
    if found is None:
        raise ModelUnavailable(f"{binary} --version did not print a version; is it espeak-ng?")
    return found.group(1)


def _run(binary: str, flag: str, timeout: float) -> str:
    """The standard output of `binary flag`; ModelUnavailable if it cannot run or fails."""
    try:
        done = subprocess.run([binary, flag], capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelUnavailable(f"cannot run {binary} {flag}: {exc}") from exc
    if done.returncode != 0:
        detail = done.stderr.decode("utf-8", "replace").strip()
        raise ModelUnavailable(f"{binary} {flag} failed ({done.returncode}): {detail}")
    return done.stdout.decode("utf-8", "replace")


def _voice_rows(binary: str, flag: str, timeout: float) -> list[_VoiceRow]:
    """The rows of `espeak-ng --voices...`: Pty, Language, Age/Gender, VoiceName, File, Other Languages."""
    rows = []
    for line in _run(binary, flag, timeout).splitlines()[1:]:  # the first line is the header
        fields = line.split(None, 4)
        if len(fields) < 5:
            continue
        # The file name can hold a space ("!v/Mr serious") but never a parenthesis, and
        # the other languages come last, in parentheses.
        file, paren, rest = fields[4].partition("(")
        rows.append(
            _VoiceRow(
                language=fields[1].lower(),
                file=file.strip(),
                other_languages=tuple(m.lower() for m in _OTHER_LANGUAGE.findall(paren + rest)),
            )
        )
    if not rows:
        raise ModelUnavailable(f"{binary} {flag} listed no voices; reinstall espeak-ng")
    return rows
