"""The intent classifier: dataset rules, versioned training, loading, accuracy, and the task around it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sklearn  # type: ignore[import-untyped]
import yaml

from clawdbot.common.errors import GatewayError
from clawdbot.worker.intent import IntentTask
from clawdbot.worker.runtimes.intent_classifier import (
    CURRENT_FILE,
    DatasetError,
    IntentClassifier,
    ModelUnavailable,
    load_dataset,
    model_version,
    normalise,
    train,
)
from tests.support import REPO_ROOT, SERVICES_DIR

DATASET = REPO_ROOT / "config" / "intents.yaml"

# Written for these tests and checked below not to be dataset lines: the model has to
# generalise to them, not remember them.
HELD_OUT: list[tuple[str, str]] = [
    ("please turn on the lights in the living room", "lights_on"),
    ("switch the kitchen lamp on", "lights_on"),
    ("can you put the bedroom lights on", "lights_on"),
    ("lights on in the kitchen please", "lights_on"),
    ("it is really dark in the hallway", "lights_on"),
    ("turn the living room lights off please", "lights_off"),
    ("switch off the lamp in the bedroom", "lights_off"),
    ("shut off the kitchen light", "lights_off"),
    ("please turn off the office lights", "lights_off"),
    ("will it rain this weekend", "weather"),
    ("how warm is it outside right now", "weather"),
    ("what's the forecast for tomorrow", "weather"),
    ("is it going to be sunny today", "weather"),
    ("should i take an umbrella", "weather"),
    ("set a timer for seven minutes", "timer"),
    ("start a ten minute timer for the rice", "timer"),
    ("how long is left on the timer", "timer"),
    ("cancel my timer", "timer"),
    ("set an alarm for six in the morning", "alarm"),
    ("wake me up at seven tomorrow", "alarm"),
    ("cancel the alarm for tomorrow morning", "alarm"),
    ("play some jazz in the kitchen", "music"),
    ("skip to the next song", "music"),
    ("play my dinner playlist", "music"),
    ("put on some rock music", "music"),
    ("turn the volume up a little", "volume"),
    ("make it a bit louder", "volume"),
    ("lower the volume please", "volume"),
    ("who wrote romeo and juliet", "question"),
    ("what is the capital of italy", "question"),
    ("how many planets are in the solar system", "question"),
    ("how deep is the ocean", "question"),
    ("hi how are you", "smalltalk"),
    ("thanks so much", "smalltalk"),
    ("good morning to you", "smalltalk"),
    ("tell me a funny joke", "smalltalk"),
    ("what is your name", "smalltalk"),
]

SMALL: dict[str, Any] = {
    "intents": {
        "lights_on": {
            "description": "Lights on.",
            "examples": [
                "turn on the lights",
                "switch the lamp on",
                "lights on please",
                "make it brighter",
                "turn the kitchen light on",
                "power on the lamp",
            ],
        },
        "lights_off": {
            "description": "Lights off.",
            "examples": [
                "turn off the lights",
                "switch the lamp off",
                "lights off please",
                "make it darker",
                "turn the kitchen light off",
                "power off the lamp",
            ],
        },
        "weather": {
            "description": "Weather.",
            "examples": [
                "will it rain today",
                "what's the weather like",
                "is it cold outside",
                "what's the forecast",
                "do i need an umbrella",
                "how hot is it going to be",
            ],
        },
    }
}


def write_dataset(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(_dump(doc), encoding="utf-8")
    return path


def expected_version(dataset_path: Path) -> str:
    return model_version(hashlib.sha256(dataset_path.read_bytes()).hexdigest(), sklearn.__version__)


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "intents.yaml", SMALL)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> IntentClassifier:
    model = IntentClassifier.load(tmp_path_factory.mktemp("intent-models"), DATASET)
    model.warm_up()
    return model


# --- the dataset ------------------------------------------------------------------------


def test_repo_dataset_is_valid_and_speech_shaped() -> None:
    dataset = load_dataset(DATASET)
    assert {"lights_on", "lights_off", "weather", "timer", "music", "question", "smalltalk"} <= set(dataset.names)
    for intent in dataset.intents:
        assert 30 <= len(intent.examples) <= 50, intent.name
        for example in intent.examples:
            # What a speech recogniser outputs: lowercase words, numbers spelt out.
            assert re.fullmatch(r"[a-z']+( [a-z']+)*", example), example


def _dump(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


def _with(change: dict[str, Any]) -> dict[str, Any]:
    doc = json.loads(json.dumps(SMALL))
    doc["intents"].update(change)
    return doc


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("intents: [\n", "not valid YAML"),
        ("- just a list\n", "top-level 'intents:'"),
        (_dump({**SMALL, "version": 2}), "unknown top-level key(s) ['version']"),
        (_dump({"intents": {"only": SMALL["intents"]["weather"]}}), "at least 2"),
        (
            _dump(_with({"greet": {"description": "Hi.", "examples": ["hi", "hello"]}})),
            "intents.greet.examples",
        ),
        (_dump(_with({"Bad-Name": SMALL["intents"]["weather"]})), "intents.Bad-Name"),
        (_dump(_with({"greet": ["hi", "hello"]})), "intents.greet: must be a mapping"),
        (
            _dump(_with({"greet": {"description": "Hi.", "examples": ["hi"] * 5, "tags": []}})),
            "intents.greet: unknown key(s) ['tags']",
        ),
        (_dump(_with({"greet": {"examples": ["a", "b", "c", "d", "e"]}})), "intents.greet.description"),
        (
            _dump(_with({"greet": {"description": "Hi.", "examples": ["hi", "hello", "  ", "hey", "yo"]}})),
            "intents.greet.examples[2]: is empty",
        ),
        (
            _dump(
                _with(
                    {"greet": {"description": "Hi.", "examples": ["hi", "hello", "Will it rain today?", "hey", "yo"]}}
                )
            ),
            "intents.greet.examples[2]: 'Will it rain today?' is listed also under intents.weather",
        ),
        (
            _dump(_with({"greet": {"description": "Hi.", "examples": ["hi", "hello", "hey", "hi", "yo"]}})),
            "intents.greet.examples[3]: 'hi' is listed again",
        ),
        (
            _dump(_with({"greet": {"description": "Hi.", "examples": ["hi", "hello", "hey", "yo"]}})).replace(
                "- yo", "- yo\n    - no"
            ),
            "intents.greet.examples[4]: YAML read False (bool)",
        ),
    ],
)
def test_dataset_errors_name_the_key(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "intents.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset(tmp_path / "nope.yaml")


# --- training and the model directory -----------------------------------------------------


def test_training_is_deterministic_and_versioned_by_the_data(small_dataset: Path, tmp_path: Path) -> None:
    first = train(small_dataset, tmp_path / "a")
    again = train(small_dataset, tmp_path / "a")
    elsewhere = train(small_dataset, tmp_path / "b")
    version = expected_version(small_dataset)
    assert first == again == tmp_path / "a" / f"intent-{version}.joblib"
    assert elsewhere.name == first.name

    doc = _with({})
    doc["intents"]["weather"]["examples"].append("is it sunny")
    write_dataset(small_dataset, doc)
    changed = train(small_dataset, tmp_path / "a")
    assert changed.name != first.name
    assert (tmp_path / "a" / CURRENT_FILE).read_text().strip() == expected_version(small_dataset)
    assert first.is_file()  # older versions stay loadable by name


def test_current_pointer_and_metadata(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "models"
    model_path = train(small_dataset, out)
    version = expected_version(small_dataset)
    assert (out / CURRENT_FILE).read_text() == f"{version}\n"
    metadata = json.loads(model_path.with_suffix(".json").read_text())
    assert metadata["version"] == version
    assert metadata["dataset_sha256"] == hashlib.sha256(small_dataset.read_bytes()).hexdigest()
    assert metadata["sklearn_version"] == sklearn.__version__
    assert metadata["intents"] == ["lights_on", "lights_off", "weather"]
    assert metadata["examples"] == {"lights_on": 6, "lights_off": 6, "weather": 6}
    assert 0.0 <= metadata["cv_accuracy"] <= 1.0
    assert metadata["trained_at"].endswith("+00:00")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [CURRENT_FILE, model_path.name, model_path.with_suffix(".json").name]
    )  # no temporary files left behind


def test_load_trains_when_missing_and_reuses_afterwards(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "models"
    model = IntentClassifier.load(out, small_dataset)
    assert model.version == expected_version(small_dataset)
    assert model.intents == ("lights_on", "lights_off", "weather")
    model_file = out / f"intent-{model.version}.joblib"
    before = model_file.stat().st_mtime_ns

    assert IntentClassifier.load(out, small_dataset).version == model.version
    assert model_file.stat().st_mtime_ns == before  # not retrained

    doc = _with({})
    doc["intents"]["lights_on"]["examples"].append("brighten the room")
    write_dataset(small_dataset, doc)
    retrained = IntentClassifier.load(out, small_dataset)
    assert retrained.version == expected_version(small_dataset) != model.version
    # A pinned version loads as it was, whatever the dataset says now.
    assert IntentClassifier.load(out, small_dataset, version=model.version).version == model.version


def test_load_retrains_a_model_from_another_sklearn(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "models"
    model_path = train(small_dataset, out)
    metadata_path = model_path.with_suffix(".json")
    metadata = json.loads(metadata_path.read_text())
    metadata_path.write_text(json.dumps({**metadata, "sklearn_version": "0.1"}))

    with pytest.raises(ModelUnavailable, match=r"scikit-learn 0\.1"):
        IntentClassifier.load(out, small_dataset, version=metadata["version"])
    model = IntentClassifier.load(out, small_dataset)
    assert model.version == metadata["version"]
    assert json.loads(metadata_path.read_text())["sklearn_version"] == sklearn.__version__


def test_unknown_versions(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "models"
    version = train(small_dataset, out).stem.removeprefix("intent-")
    with pytest.raises(ModelUnavailable, match=rf"unknown intent model version 0123456789ab .*known: \['{version}'\]"):
        IntentClassifier.load(out, small_dataset, version="0123456789ab")
    with pytest.raises(ModelUnavailable, match="not an intent model version"):
        IntentClassifier.load(out, small_dataset, version="../../etc/passwd")


def test_corrupt_files_are_unavailable_not_retrained(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "models"
    model_path = train(small_dataset, out)
    model_path.write_bytes(model_path.read_bytes()[:100])
    with pytest.raises(ModelUnavailable, match="unreadable"):
        IntentClassifier.load(out, small_dataset)

    model_path.with_suffix(".json").write_text("{not json")
    with pytest.raises(ModelUnavailable, match="unreadable"):
        IntentClassifier.load(out, small_dataset)

    (out / CURRENT_FILE).write_text("garbage\n")
    with pytest.raises(ModelUnavailable, match="not a model version"):
        IntentClassifier.load(out, small_dataset)


def test_invalid_dataset_is_unavailable(tmp_path: Path) -> None:
    bad = write_dataset(tmp_path / "intents.yaml", {"intents": {"only": SMALL["intents"]["weather"]}})
    with pytest.raises(ModelUnavailable, match="at least 2"):
        IntentClassifier.load(tmp_path / "models", bad)


# --- classification -----------------------------------------------------------------------


def test_held_out_phrases_are_not_dataset_lines() -> None:
    seen = {normalise(example) for intent in load_dataset(DATASET).intents for example in intent.examples}
    copies = [text for text, _ in HELD_OUT if normalise(text) in seen]
    assert copies == []
    assert len({intent for _, intent in HELD_OUT}) == len(load_dataset(DATASET).intents)


def test_held_out_accuracy(classifier: IntentClassifier) -> None:
    rankings = classifier.classify([text for text, _ in HELD_OUT])
    wrong = [
        (text, want, ranking[0][0])
        for (text, want), ranking in zip(HELD_OUT, rankings, strict=True)
        if ranking[0][0] != want
    ]
    accuracy = 1 - len(wrong) / len(HELD_OUT)
    assert accuracy >= 0.9, wrong


@pytest.mark.parametrize(
    ("text", "intent"),
    [
        ("turn on the kitchen lights", "lights_on"),
        ("switch off the bedroom light", "lights_off"),
        ("what's the weather like tomorrow", "weather"),
        ("Turn ON the kitchen lights!", "lights_on"),  # typed, not spoken
    ],
)
def test_named_examples(classifier: IntentClassifier, text: str, intent: str) -> None:
    assert classifier.classify([text])[0][0][0] == intent


def test_rankings_are_distributions(classifier: IntentClassifier) -> None:
    rankings = classifier.classify(["set a timer for ten minutes", "hello there", "zzz"])
    assert len(rankings) == 3
    for ranking in rankings:
        assert sorted(name for name, _ in ranking) == sorted(classifier.intents)
        probabilities = [p for _, p in ranking]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0)
        assert all(0.0 <= p <= 1.0 for p in probabilities)
    assert classifier.classify([]) == []
    with pytest.raises(TypeError):
        classifier.classify("one string")


def test_concurrent_classify_matches_serial(classifier: IntentClassifier) -> None:
    texts = [text for text, _ in HELD_OUT]
    serial = [classifier.classify([text]) for text in texts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda text: classifier.classify([text]), texts * 4))
    assert parallel == serial * 4


# --- the task ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": 5}, "input"),
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": "   "}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": ["ok", 3]}, "input"),
        ({"input": "x" * 2001}, "input"),
        ({"input": ["hi"] * 257}, "input"),
        ({"input": "hi", "top_n": 0}, "top_n"),
        ({"input": "hi", "top_n": 100}, "top_n"),
        ({"input": "hi", "top_n": "2"}, "top_n"),
        ({"input": "hi", "top_n": True}, "top_n"),
        ({"input": "hi", "top_n": 1.5}, "top_n"),
    ],
)
@pytest.mark.asyncio
async def test_task_rejects_bad_requests(classifier: IntentClassifier, body: dict[str, Any], param: str) -> None:
    task = IntentTask("intent-local", classifier)
    with pytest.raises(GatewayError) as caught:
        await task.answer({"model": "intent-local", **body})
    assert caught.value.status == 400
    assert caught.value.param == param


@pytest.mark.asyncio
async def test_task_response_shape(classifier: IntentClassifier) -> None:
    task = IntentTask("intent-local", classifier)
    texts = ["turn on the kitchen lights", "what's the weather like tomorrow"]
    answer = await task.answer({"model": "intent-local", "input": texts, "top_n": 2})
    assert answer["object"] == "list"
    assert answer["model"] == "intent-local"
    assert answer["model_version"] == classifier.version
    assert [item["index"] for item in answer["data"]] == [0, 1]
    assert [item["intent"] for item in answer["data"]] == ["lights_on", "weather"]
    for item in answer["data"]:
        assert item["object"] == "intent"
        assert len(item["ranking"]) == 2
        assert item["ranking"][0] == {"intent": item["intent"], "confidence": item["confidence"]}
        assert item["confidence"] == round(item["confidence"], 6)
        assert item["ranking"][0]["confidence"] >= item["ranking"][1]["confidence"]

    single = await task.answer({"model": "intent-local", "input": "x" * 2000})
    assert len(single["data"]) == 1
    assert len(single["data"][0]["ranking"]) == 3  # the default top_n
    everything = await task.answer({"input": "hi", "top_n": len(classifier.intents)})
    ranking = everything["data"][0]["ranking"]
    assert sum(entry["confidence"] for entry in ranking) == pytest.approx(1.0, abs=1e-5)


# --- the CLI ----------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SERVICES_DIR)}
    return subprocess.run(
        [sys.executable, "-m", "clawdbot.worker.runtimes.intent_classifier", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO_ROOT,
        env=env,
    )


def test_cli_train_and_classify(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "models"
    trained = _cli("train", "--dataset", str(small_dataset), "--out", str(out))
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout.strip())
    assert summary["version"] == expected_version(small_dataset)
    assert 0.0 <= summary["cv_accuracy"] <= 1.0
    assert Path(summary["path"]) == out / f"intent-{summary['version']}.joblib"
    assert Path(summary["path"]).is_file()

    classified = _cli("classify", "--dataset", str(small_dataset), "--model-dir", str(out), "switch the lights off")
    assert classified.returncode == 0, classified.stderr
    (line,) = classified.stdout.splitlines()
    assert json.loads(line)["text"] == "switch the lights off"

    bad = _cli("train", "--dataset", str(tmp_path / "missing.yaml"), "--out", str(out))
    assert bad.returncode == 1
    assert "missing.yaml" in bad.stderr
