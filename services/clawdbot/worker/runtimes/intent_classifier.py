"""Intent classification: a short utterance in, a ranking of the home assistant's intents out.

The training data is `config/intents.yaml`, kept in the repo and edited by hand. The model
is a scikit-learn pipeline small enough to retrain in seconds, so a model is a cache of
that file rather than an artefact to ship: `IntentClassifier.load` trains whenever the
current model was not made from the dataset as it is now (or by this scikit-learn).

Models live in a directory as `intent-<version>.joblib` plus `intent-<version>.json`
(metadata), and a `current` file names the version in use. The version hashes the dataset
bytes, the scikit-learn version and `RECIPE`, so training the same data again yields the
same version and any change to one of them yields a new one.

scikit-learn and joblib are optional dependencies (the `local` extra) and are imported
only when a model is trained or loaded, so the worker starts without them and reports
the model as unavailable instead.

CLI (run from the repo root):
    python -m clawdbot.worker.runtimes.intent_classifier train [--dataset ...] [--out ...]
    python -m clawdbot.worker.runtimes.intent_classifier classify "turn on the lights" ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

import numpy as np
import yaml

# The worker already handles this exception for every runtime (it marks the model
# unavailable and keeps serving the others), so this runtime raises the same class.
from clawdbot.worker.runtimes.minilm import ModelUnavailable

__all__ = [
    "RECIPE",
    "Dataset",
    "DatasetError",
    "Intent",
    "IntentClassifier",
    "ModelUnavailable",
    "load_dataset",
    "main",
    "normalise",
    "train",
]

log = logging.getLogger(__name__)

DEFAULT_DATASET: Final = Path("config/intents.yaml")
DEFAULT_MODEL_DIR: Final = Path(".clawdbot/models/intent")

# Part of every model version: change it whenever `_build_pipeline` or `normalise` changes,
# so that models made by the old code are retrained instead of reused.
RECIPE: Final = "norm1/tfidf-word1-2+charwb2-5-sublinear/logreg-sag-C20/v1"

MIN_INTENTS: Final = 2
MIN_EXAMPLES: Final = 5
CV_FOLDS: Final = 5
RANDOM_STATE: Final = 0

CURRENT_FILE: Final = "current"
_VERSION_LENGTH: Final = 12
_VERSION_RE: Final = re.compile(rf"[0-9a-f]{{{_VERSION_LENGTH}}}")
_INTENT_NAME_RE: Final = re.compile(r"[a-z][a-z0-9_]*")
_INTENT_KEYS: Final = frozenset({"description", "examples"})
_INSTALL_HINT: Final = "pip install scikit-learn==1.9.1 joblib==1.6.0 (the 'local' extra)"


class DatasetError(ValueError):
    """The intents file is missing, is not YAML, or breaks a rule; the message names the key."""


@dataclass(frozen=True, slots=True)
class Intent:
    name: str
    description: str
    examples: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Dataset:
    path: Path
    sha256: str  # of the file's bytes, comments and all: any edit means a retrain
    intents: tuple[Intent, ...]

    @property
    def names(self) -> list[str]:
        return [intent.name for intent in self.intents]

    def training_data(self) -> tuple[list[str], list[str]]:
        """Normalised texts and their intent labels, in file order."""
        texts = [normalise(example) for intent in self.intents for example in intent.examples]
        labels = [intent.name for intent in self.intents for _ in intent.examples]
        return texts, labels


def normalise(text: str) -> str:
    """Lowercase words separated by single spaces, apostrophes kept: the shape of the dataset.

    Applied before training and before classifying, so typed input ("Turn ON the lights!")
    and speech-recogniser output ("turn on the lights") look alike to the model.
    """
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    text = re.sub(r"[^\w']+", " ", text)
    return " ".join(word.strip("'") for word in text.split() if word.strip("'"))


def load_dataset(path: str | os.PathLike[str]) -> Dataset:
    """Read and validate the intents file; raises DatasetError naming the file and the bad key."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the intents file: {exc.strerror or exc}") from exc
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or "intents" not in doc:
        raise DatasetError(
            f"{path}: expected a top-level 'intents:' mapping of intent name to description and examples"
        )
    unknown = sorted(str(key) for key in doc if key != "intents")
    if unknown:
        raise DatasetError(f"{path}: unknown top-level key(s) {unknown}; only 'intents' is allowed")
    specs = doc["intents"]
    if not isinstance(specs, dict):
        raise DatasetError(f"{path}: 'intents' must be a mapping of intent name to description and examples")
    if len(specs) < MIN_INTENTS:
        raise DatasetError(f"{path}: 'intents' has {len(specs)} intent(s); a classifier needs at least {MIN_INTENTS}")

    owner: dict[str, str] = {}  # normalised example -> the intent it is listed under
    intents = []
    for name, spec in specs.items():
        where = f"{path}: intents.{name}"
        if not isinstance(name, str) or not _INTENT_NAME_RE.fullmatch(name):
            raise DatasetError(f"{where}: intent names are lowercase identifiers like 'lights_on'")
        if not isinstance(spec, dict):
            raise DatasetError(f"{where}: must be a mapping with 'description' and 'examples'")
        unknown = sorted(str(key) for key in spec if key not in _INTENT_KEYS)
        if unknown:
            raise DatasetError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_INTENT_KEYS)}")
        description = spec.get("description")
        if not isinstance(description, str) or not description.strip():
            raise DatasetError(f"{where}.description: must be a non-empty string")
        examples = spec.get("examples")
        if not isinstance(examples, list):
            raise DatasetError(f"{where}.examples: must be a list of sentences")
        if len(examples) < MIN_EXAMPLES:
            raise DatasetError(f"{where}.examples: has {len(examples)}; each intent needs at least {MIN_EXAMPLES}")
        cleaned = []
        for i, example in enumerate(examples):
            if not isinstance(example, str):
                # YAML reads a bare `- no` or `- on` as a boolean; the hint saves a puzzled minute.
                raise DatasetError(
                    f"{where}.examples[{i}]: YAML read {example!r} ({type(example).__name__}), not a sentence; quote it"
                )
            key = normalise(example)
            if not key:
                raise DatasetError(f"{where}.examples[{i}]: is empty")
            if key in owner:
                elsewhere = "again" if owner[key] == name else f"also under intents.{owner[key]}"
                raise DatasetError(f"{where}.examples[{i}]: {example.strip()!r} is listed {elsewhere}")
            owner[key] = name
            cleaned.append(example.strip())
        intents.append(Intent(name=name, description=description.strip(), examples=tuple(cleaned)))
    return Dataset(path=path, sha256=hashlib.sha256(raw).hexdigest(), intents=tuple(intents))


def model_version(dataset_sha256: str, sklearn_version: str) -> str:
    digest = hashlib.sha256(f"{dataset_sha256}\0{sklearn_version}\0{RECIPE}".encode()).hexdigest()
    return digest[:_VERSION_LENGTH]


def train(dataset_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Fit the classifier on the dataset, save it under out_dir and make it current.

    Returns the path of the saved model; its metadata sits next to it with a .json suffix.
    Raises DatasetError for a bad dataset, ModelUnavailable without scikit-learn, OSError
    when out_dir cannot be written.
    """
    dataset = load_dataset(dataset_path)
    out_dir = Path(out_dir)
    sklearn_version = _sklearn_version()
    version = model_version(dataset.sha256, sklearn_version)
    texts, labels = dataset.training_data()

    cv_accuracy = _cross_validate(texts, labels)
    pipeline = _build_pipeline()
    pipeline.fit(texts, labels)

    import joblib

    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / f"intent-{version}.joblib"
    metadata = {
        "version": version,
        "dataset": str(dataset.path),
        "dataset_sha256": dataset.sha256,
        "sklearn_version": sklearn_version,
        "recipe": RECIPE,
        "intents": dataset.names,
        "examples": {intent.name: len(intent.examples) for intent in dataset.intents},
        "cv_folds": CV_FOLDS,
        "cv_accuracy": round(cv_accuracy, 6),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    # Model, then metadata, then pointer, each renamed into place: a reader that follows
    # `current` only ever finds complete files, and a crash mid-way leaves the old model current.
    _write_atomically(model_path, lambda f: joblib.dump(pipeline, f))
    _write_atomically(model_path.with_suffix(".json"), lambda f: f.write(json.dumps(metadata, indent=2).encode()))
    _write_atomically(out_dir / CURRENT_FILE, lambda f: f.write(f"{version}\n".encode()))
    log.info("trained intent model %s (cv accuracy %.3f) into %s", version, cv_accuracy, model_path)
    return model_path


class IntentClassifier:
    """A trained intent model. Safe to share between threads: classify only reads it."""

    version: str
    intents: tuple[str, ...]
    metadata: dict[str, Any]

    def __init__(self, pipeline: Any, metadata: dict[str, Any]) -> None:
        self._pipeline = pipeline
        self._classes: list[str] = [str(c) for c in pipeline.classes_]
        self.metadata = metadata
        self.version = str(metadata["version"])
        self.intents = tuple(metadata["intents"])

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike[str],
        dataset_path: str | os.PathLike[str],
        version: str | None = None,
    ) -> IntentClassifier:
        """Load `version`, or the current model after training it if it is missing or stale.

        The current model is stale when it was trained from another dataset, scikit-learn or
        RECIPE. A given version is loaded as it is, never retrained. Raises ModelUnavailable
        saying why (bad dataset, missing or corrupt file, unknown version, no scikit-learn).
        """
        model_dir = Path(model_dir)
        if version is not None:
            return cls._load_version(model_dir, version)
        try:
            dataset = load_dataset(dataset_path)
        except DatasetError as exc:
            raise ModelUnavailable(f"the intent dataset is invalid: {exc}") from exc
        current = _read_current(model_dir)
        reason = "no model has been trained yet" if current is None else _stale_reason(model_dir, current, dataset)
        if current is None or reason is not None:
            log.info("training the intent model into %s: %s", model_dir, reason)
            try:
                model_path = train(dataset.path, model_dir)
            except DatasetError as exc:  # the file changed between the two reads
                raise ModelUnavailable(f"the intent dataset is invalid: {exc}") from exc
            except OSError as exc:
                raise ModelUnavailable(f"cannot save the intent model in {model_dir}: {exc}") from exc
            current = model_path.stem.removeprefix("intent-")
        return cls._load_version(model_dir, current)

    @classmethod
    def _load_version(cls, model_dir: Path, version: str) -> IntentClassifier:
        if not _VERSION_RE.fullmatch(version):
            raise ModelUnavailable(f"{version!r} is not an intent model version (12 hex digits)")
        model_path = model_dir / f"intent-{version}.joblib"
        metadata_path = model_path.with_suffix(".json")
        if not model_path.is_file() or not metadata_path.is_file():
            known = sorted(p.stem.removeprefix("intent-") for p in model_dir.glob("intent-*.joblib"))
            raise ModelUnavailable(f"unknown intent model version {version} in {model_dir}; known: {known or 'none'}")
        metadata = _read_metadata(metadata_path)
        if metadata["version"] != version:
            raise ModelUnavailable(f"{metadata_path} describes version {metadata['version']}, not {version}")
        installed = _sklearn_version()
        if metadata["sklearn_version"] != installed:
            # Unpickling across scikit-learn versions may load and then predict wrongly.
            raise ModelUnavailable(
                f"intent model {version} was trained with scikit-learn {metadata['sklearn_version']}, "
                f"this is {installed}; retrain it (make intents)"
            )

        import joblib

        try:
            pipeline = joblib.load(model_path)
        except Exception as exc:
            # Unpickling a truncated or foreign file raises nearly anything (EOFError,
            # UnpicklingError, KeyError, ValueError...); all mean the file is unusable.
            raise ModelUnavailable(
                f"{model_path} is unreadable ({type(exc).__name__}: {exc}); delete it and retrain (make intents)"
            ) from exc
        classes = getattr(pipeline, "classes_", None)
        if not hasattr(pipeline, "predict_proba") or classes is None:
            raise ModelUnavailable(f"{model_path} does not hold a fitted intent classifier")
        if sorted(str(c) for c in classes) != sorted(metadata["intents"]):
            raise ModelUnavailable(
                f"{model_path} predicts {list(classes)}, but its metadata lists {metadata['intents']}"
            )
        return cls(pipeline, metadata)

    def classify(self, texts: Sequence[str]) -> list[list[tuple[str, float]]]:
        """For each text, every intent with its probability, most likely first; each row sums to 1."""
        if isinstance(texts, str):
            raise TypeError("classify takes a sequence of texts, not one string")
        if not texts:
            return []
        probabilities = self._pipeline.predict_proba([normalise(text) for text in texts])
        rankings = []
        for row in probabilities:
            order = np.argsort(-row, kind="stable")
            rankings.append([(self._classes[j], float(row[j])) for j in order])
        return rankings

    def warm_up(self) -> None:
        # The first predict pays for lazy imports and allocations inside scikit-learn and
        # numpy; paying it at load time keeps it off the first request.
        self.classify(["turn on the lights", "what's the weather like"])


# --- training helpers ----------------------------------------------------------------


def _build_pipeline() -> Any:
    """The whole model: keep in step with RECIPE.

    Word uni- and bigrams carry the phrasing ("turn on" against "turn off"); character
    n-grams inside word boundaries carry unseen inflections and rooms ("lamps", "lounge").
    Logistic regression gives probabilities directly, with no calibration split to carve
    out of a few dozen examples per intent; a high C because the data is small and clean.
    The sag solver because lbfgs, on a busy two-core host, took 20-30 times longer: its
    OpenMP threads and OpenBLAS's contend for the cores, and this problem is too small to
    gain from either. (threadpoolctl would fix lbfgs too, but its limits are process-wide.)
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    # The default token pattern drops one-letter words, and "i" and "a" carry signal here.
    words = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"[\w']+")
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)
    return Pipeline(
        [
            ("features", FeatureUnion([("words", words), ("chars", chars)])),
            ("classifier", LogisticRegression(C=20.0, solver="sag", max_iter=5000, random_state=RANDOM_STATE)),
        ]
    )


def _cross_validate(texts: list[str], labels: list[str]) -> float:
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    # Every intent has at least MIN_EXAMPLES == CV_FOLDS examples, so each fold sees each intent.
    folds = StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=RANDOM_STATE)
    scores = cross_val_score(_build_pipeline(), texts, labels, cv=folds, scoring="accuracy")
    return float(np.mean(scores))


def _sklearn_version() -> str:
    try:
        import joblib  # noqa: F401 - only checking that it is installed
        import sklearn
    except ImportError as exc:
        raise ModelUnavailable(f"the intent classifier needs scikit-learn and joblib ({exc}); {_INSTALL_HINT}") from exc
    return str(sklearn.__version__)


# --- model directory -----------------------------------------------------------------


def _read_current(model_dir: Path) -> str | None:
    """The version `current` names, or None when nothing has been trained into model_dir."""
    path = model_dir / CURRENT_FILE
    try:
        version = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelUnavailable(f"cannot read {path}: {exc}") from exc
    if not _VERSION_RE.fullmatch(version):
        raise ModelUnavailable(f"{path} holds {version[:40]!r}, not a model version; delete it to retrain")
    return version


def _stale_reason(model_dir: Path, version: str, dataset: Dataset) -> str | None:
    """Why the current model must be retrained for this dataset, or None if it need not be."""
    metadata_path = model_dir / f"intent-{version}.json"
    if not metadata_path.is_file():
        return f"the current model {version} has no {metadata_path.name}"
    metadata = _read_metadata(metadata_path)
    if metadata["dataset_sha256"] != dataset.sha256:
        return f"{dataset.path} changed since model {version} was trained"
    installed = _sklearn_version()
    if metadata["sklearn_version"] != installed:
        return f"model {version} was trained with scikit-learn {metadata['sklearn_version']}, this is {installed}"
    if metadata.get("recipe") != RECIPE:
        return f"model {version} was trained with another recipe ({metadata.get('recipe')!r})"
    return None


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelUnavailable(f"{path} is unreadable ({exc}); delete it and retrain (make intents)") from exc
    required = ("version", "dataset_sha256", "sklearn_version", "intents")
    if not isinstance(metadata, dict) or any(key not in metadata for key in required):
        raise ModelUnavailable(f"{path} lacks one of {list(required)}; delete it and retrain (make intents)")
    return metadata


def _write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    # A temporary file in the same directory, so the rename is atomic on one filesystem.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        # mkstemp makes the file private (0600); a model is no secret, and the service
        # that loads it may run as another user than the one who trained it.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        # After the rename tmp no longer exists; after a failure this removes the partial file.
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- CLI -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clawdbot.worker.runtimes.intent_classifier",
        description="Train the intent classifier, or try it on some sentences.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="fit on the dataset and make the result current")
    train_cmd.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="intents YAML (%(default)s)")
    train_cmd.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="model directory (%(default)s)")
    classify_cmd = commands.add_parser("classify", help="rank the intents of each text (trains first if needed)")
    classify_cmd.add_argument("texts", nargs="+", metavar="TEXT")
    classify_cmd.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="intents YAML (%(default)s)")
    classify_cmd.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="(%(default)s)")
    classify_cmd.add_argument("--model-version", help="a trained version instead of the current one")
    classify_cmd.add_argument("--top", type=int, default=3, help="intents shown per text (%(default)s)")
    args = parser.parse_args(argv)

    try:
        if args.command == "train":
            model_path = train(args.dataset, args.out)
            metadata = _read_metadata(model_path.with_suffix(".json"))
            summary = {key: metadata[key] for key in ("version", "cv_accuracy", "intents", "examples")}
            print(json.dumps({**summary, "path": str(model_path)}))
        else:
            classifier = IntentClassifier.load(args.model_dir, args.dataset, args.model_version)
            for text, ranking in zip(args.texts, classifier.classify(args.texts), strict=True):
                top = [{"intent": name, "confidence": round(p, 4)} for name, p in ranking[: max(1, args.top)]]
                print(json.dumps({"text": text, "intent": top[0]["intent"], "ranking": top}))
    except (DatasetError, ModelUnavailable, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    raise SystemExit(main())
