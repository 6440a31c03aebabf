"""Speech to text with PocketSphinx 5 and the US English model shipped in its wheel (no download).

Without a vocabulary the decoder uses the wheel's general English trigram model and the
full CMU dictionary. On espeak-ng speech that model is poor: "turn on the kitchen lights"
came out as "they're not like", "set a timer for ten minutes" as "and the".

With a vocabulary (example sentences of the domain, such as the intents in
config/intents.yaml) the decoder uses a trigram model built from those sentences instead:
absolute discounting (D = 0.2) with Katz back-off weights down to an add-k unigram over
every vocabulary word, so word sequences the examples never contain are still reachable
("turn on the bedroom lights" from examples about kitchens and bedrooms). Its dictionary
holds only the vocabulary's words, which also makes loading fast. A JSGF grammar of the
sentences was not used: it can only output the example sentences verbatim, and an
utterance outside them is forced onto the nearest one.

How it was tuned: 10 home-assistant commands, none of them among the examples, spoken
by 6 espeak-ng voices (60 utterances, 324 words), with the other 337 sentences of
config/intents.yaml as the vocabulary. The general model missed 172 of the 324 words.
The domain model, with what follows, missed 14-15 (about 4.5%): the default espeak-ng
voice (OpenAI "alloy") and en-us+m3 none, the high-pitched en-us+f3 ("nova") most.

- Noise. espeak-ng writes exact digital silence between words; its log-energy features
  are far outside anything the acoustic model was trained on and upset the cepstral
  mean. Gaussian noise 30 dB below the signal's RMS (25 and 40 dB did worse) was worth
  a third of the errors; PocketSphinx's own 1-bit `dither` far less. The noise is
  seeded, so a transcription is reproducible; real recordings have their own noise
  floor, which this barely raises.
- Padding. 0.3 s of (noised) silence before and after: without it the last word was
  often lost ("turn off the bedroom lamp" -> "... bedroom am"); 0.15 s and 0.5 s did worse.
- Weights. Language weight 9 rather than 6.5, and D = 0.2 rather than 0.5, each took off
  a few more errors; the word insertion penalty and the unigram k made no difference.

Words of the vocabulary missing from the CMU dictionary cannot be recognised (there is
no grapheme-to-phoneme model here): they are left out of the model and named in a
warning, and n-grams across them are not counted.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import tempfile
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from clawdbot.worker.audio import to_int16
from clawdbot.worker.runtimes.minilm import ModelUnavailable

if TYPE_CHECKING:
    from pocketsphinx import Decoder  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]

_INSTALL_HINT: Final = "pip install pocketsphinx==5.1.1"
_ACOUSTIC_FILES: Final = ("mdef", "means", "variances", "transition_matrices", "sendump", "feat.params", "noisedict")

ORDER: Final = 3
# Absolute discount of every seen n-gram count; what it frees is the back-off mass.
DISCOUNT: Final = 0.2
# Added to every unigram count, so any vocabulary word can follow any other.
UNIGRAM_K: Final = 0.1
LANGUAGE_WEIGHT: Final = 9.0
NOISE_SNR_DB: Final = 30.0
PAD_SECONDS: Final = 0.3
# Floor of the added noise (about -80 dBFS), so all-silent input still gets some.
_NOISE_FLOOR: Final = 1e-4
_NOISE_SEED: Final = 20240607

# Vocabulary sentences are written as a recogniser outputs them (lower case, words and
# apostrophes); anything else separates words.
_WORD: Final = re.compile(r"[a-z]+(?:'[a-z]+)*'?")


class Sphinx:
    """PocketSphinx behind a lock: one utterance at a time per instance, safe to call from any thread."""

    sample_rate: Final = 16000

    def __init__(self, decoder: Decoder, *, words: frozenset[str], unknown_words: tuple[str, ...]) -> None:
        self._decoder = decoder
        self._lock = threading.Lock()
        self.words = words  # empty when the general model is in use
        self.unknown_words = unknown_words

    @classmethod
    def load(cls, vocabulary: Sequence[str] = ()) -> Sphinx:
        """A decoder for US English, biased to `vocabulary` (example sentences) when one is given.

        Raises ModelUnavailable if pocketsphinx or its model files are missing.
        """
        try:
            import pocketsphinx
        except ImportError as exc:
            raise ModelUnavailable(f"speech recognition needs pocketsphinx: {exc}; {_INSTALL_HINT}") from exc
        model_dir = _model_dir()
        hmm = model_dir / "en-us"
        cmudict = model_dir / "cmudict-en-us.dict"
        general_lm = model_dir / "en-us.lm.bin"
        missing = [str(p) for p in (*(hmm / f for f in _ACOUSTIC_FILES), cmudict, general_lm) if not p.is_file()]
        if missing:
            raise ModelUnavailable(f"pocketsphinx's en-us model is incomplete, missing {missing}; {_INSTALL_HINT}")

        sentences = [_WORD.findall(s.lower()) for s in vocabulary]
        sentences = [s for s in sentences if s]
        settings: dict[str, object] = {
            "hmm": str(hmm),
            "loglevel": "ERROR",
            "lw": LANGUAGE_WEIGHT,
        }
        if not sentences:
            decoder = _decoder(pocketsphinx, {**settings, "lm": str(general_lm), "dict": str(cmudict)})
            return cls(decoder, words=frozenset(), unknown_words=())

        wanted = {w for s in sentences for w in s}
        entries = _dictionary_entries(cmudict, wanted)
        known = {line.split(maxsplit=1)[0].split("(", 1)[0] for line in entries}
        unknown = tuple(sorted(wanted - known))
        if unknown:
            log.warning(
                "speech vocabulary: %d word(s) have no pronunciation in the CMU dictionary and cannot be "
                "recognised: %s",
                len(unknown),
                ", ".join(unknown),
            )
        if not known:
            raise ModelUnavailable("none of the speech vocabulary's words are in the CMU dictionary")
        arpa = build_arpa(sentences, frozenset(known))
        # PocketSphinx reads both files while the decoder is built, so they need not outlive it.
        with tempfile.TemporaryDirectory(prefix="clawdbot-sphinx-") as tmp:
            lm_path = Path(tmp) / "domain.arpa"
            dict_path = Path(tmp) / "domain.dict"
            lm_path.write_text(arpa, encoding="utf-8")
            dict_path.write_text("".join(entries), encoding="utf-8")
            decoder = _decoder(pocketsphinx, {**settings, "lm": str(lm_path), "dict": str(dict_path)})
        return cls(decoder, words=frozenset(known), unknown_words=unknown)

    def transcribe(self, samples: F32) -> str:
        """The words spoken in `samples` (float32 mono at 16 kHz), lower case, separated by spaces."""
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"expected mono samples (one dimension), got shape {samples.shape}")
        if samples.size == 0:
            return ""
        rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
        level = max(rms * 10.0 ** (-NOISE_SNR_DB / 20.0), _NOISE_FLOOR)
        pad = np.zeros(round(PAD_SECONDS * self.sample_rate), dtype=np.float32)
        padded = np.concatenate([pad, samples, pad])
        padded += np.random.default_rng(_NOISE_SEED).normal(0.0, level, padded.shape).astype(np.float32)
        pcm = to_int16(padded).astype("<i2", copy=False).tobytes()
        with self._lock:
            self._decoder.start_utt()
            try:
                # full_utt: the whole utterance is here, so the cepstral mean is taken over all of it.
                self._decoder.process_raw(pcm, full_utt=True)
            finally:
                self._decoder.end_utt()
            hypothesis = self._decoder.hyp()
        return "" if hypothesis is None else str(hypothesis.hypstr).strip()

    def warm_up(self) -> None:
        """Decode half a second of silence, so the first request does not pay for first-touch costs."""
        self.transcribe(np.zeros(self.sample_rate // 2, dtype=np.float32))


def _model_dir() -> Path:
    # pocketsphinx.get_model_path() exists too, but locating the package without importing
    # anything further keeps the failure message about the files, not an import.
    spec = importlib.util.find_spec("pocketsphinx")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"pocketsphinx is not installed; {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model" / "en-us"
        if candidate.is_dir():
            return candidate
    raise ModelUnavailable(f"the pocketsphinx package has no model/en-us directory; {_INSTALL_HINT}")


def _decoder(pocketsphinx: ModuleType, settings: dict[str, object]) -> Decoder:
    try:
        return pocketsphinx.Decoder(pocketsphinx.Config(**settings))
    except (RuntimeError, ValueError) as exc:
        raise ModelUnavailable(f"pocketsphinx could not build a decoder from {settings}: {exc}") from exc


def _dictionary_entries(cmudict: Path, words: set[str]) -> list[str]:
    """The CMU dictionary's lines for `words`, alternative pronunciations ("word(2)") included."""
    entries = []
    with cmudict.open(encoding="utf-8") as lines:
        for line in lines:
            head = line.split(maxsplit=1)[0] if line.strip() else ""
            if head.split("(", 1)[0] in words:
                entries.append(line if line.endswith("\n") else line + "\n")
    return entries


def build_arpa(sentences: Iterable[Sequence[str]], vocabulary: frozenset[str], order: int = ORDER) -> str:
    """An ARPA back-off n-gram model of `sentences`, over the words of `vocabulary`.

    Seen n-grams get (count - DISCOUNT) / count(history); each history's back-off weight
    gives the freed mass to the lower order, renormalised over the words that history was
    not seen with (Katz back-off). Unigrams are add-k smoothed over the whole vocabulary.
    Words outside `vocabulary` break the sentence: no n-gram spans them.
    """
    counts: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(order)]
    for sentence in sentences:
        tokens: list[str | None] = ["<s>", *(w if w in vocabulary else None for w in sentence), "</s>"]
        for n in range(1, order + 1):
            for i in range(len(tokens) - n + 1):
                window = tokens[i : i + n]
                if None in window or window == ["<s>"]:
                    continue
                counts[n - 1][tuple(w for w in window if w is not None)] += 1

    unigram_total = sum(counts[0].values()) + UNIGRAM_K * (len(vocabulary) + 1)
    probs: list[dict[tuple[str, ...], float]] = [
        {(w,): (counts[0][(w,)] + UNIGRAM_K) / unigram_total for w in (*sorted(vocabulary), "</s>")}
    ]
    backoffs: list[dict[tuple[str, ...], float]] = [{} for _ in range(order - 1)]

    def lower(ngram: tuple[str, ...]) -> float:
        """P(last word | rest), backing off through the orders built so far."""
        table = probs[len(ngram) - 1]
        if ngram in table:
            return table[ngram]
        return backoffs[len(ngram) - 2].get(ngram[:-1], 1.0) * lower(ngram[1:])

    for n in range(2, order + 1):
        followers: defaultdict[tuple[str, ...], dict[str, int]] = defaultdict(dict)
        for ngram, count in counts[n - 1].items():
            followers[ngram[:-1]][ngram[-1]] = count
        table: dict[tuple[str, ...], float] = {}
        for history, nexts in followers.items():
            total = sum(nexts.values())
            seen = {w: (c - DISCOUNT) / total for w, c in nexts.items()}
            freed = 1.0 - sum(seen.values())
            lower_seen = sum(lower((*history[1:], w)) for w in nexts)
            backoffs[n - 2][history] = freed / max(1.0 - lower_seen, 1e-9)
            table.update({(*history, w): p for w, p in seen.items()})
        probs.append(table)

    lines = ["\\data\\", *(f"ngram {n + 1}={len(probs[n]) + (n == 0)}" for n in range(order))]
    for n in range(order):
        lines += ["", f"\\{n + 1}-grams:"]
        if n == 0:
            # <s> is only ever a history: ARPA gives it probability 0 (log10 -99).
            lines.append(f"-99 <s> {math.log10(backoffs[0].get(('<s>',), 1.0)):.6f}")
        for ngram in sorted(probs[n]):
            entry = f"{math.log10(probs[n][ngram]):.6f} {' '.join(ngram)}"
            if n < order - 1 and ngram in backoffs[n]:
                entry += f" {math.log10(backoffs[n][ngram]):.6f}"
            lines.append(entry)
    lines += ["", "\\end\\", ""]
    return "\n".join(lines)
