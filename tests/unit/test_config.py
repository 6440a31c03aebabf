from pathlib import Path

import pytest

from clawdbot.common.config import DEFAULT_CONFIG_PATH, ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "clawdbot.yaml"
    path.write_text(text)
    return path


def test_default_config_loads() -> None:
    config = load_config(DEFAULT_CONFIG_PATH, env={})
    assert config.gateway.port == 8080
    local = ["gemma-3-270m", "all-minilm-l6-v2", "pocketsphinx-en", "espeak-ng", "intent-classifier"]
    assert [m.name for m in config.models] == local
    assert all(m.connector == "worker" for m in config.models)
    assert sorted(m.name for m in config.worker.models) == sorted(local)
    assert {m.task for m in config.worker.models} == {"chat", "embeddings", "transcription", "speech", "intent"}
    assert config.model_router.strategy == "performance_first"


def test_issue_model_entry_shape(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
models:
  - name: mock-1
    task: chat
    connector: openai
    base_url: http://127.0.0.1:19000/v1
    api_key_env: MOCK_API_KEY
    pricing: {input_per_1k: 0.0005, output_per_1k: 0.0015}
    quality: {chat: 0.7}
""",
    )
    model = load_config(path, env={}).models[0]
    assert model.base_url == "http://127.0.0.1:19000/v1"
    assert model.pricing.output_per_1k == 0.0015
    assert model.quality == {"chat": 0.7}


def test_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "models: []\n")
    config = load_config(
        path,
        env={
            "CLAWDBOT_PORT": "9999",
            "CLAWDBOT_HOST": "0.0.0.0",
            "ADAPTER_TYPES": "rest,ws",
            "MODEL_ROUTER_STRATEGY": "cost_optimized",
        },
    )
    assert config.gateway.port == 9999
    assert config.gateway.host == "0.0.0.0"
    assert config.adapter.types == ("rest", "ws")
    assert config.model_router.strategy == "cost_optimized"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models:\n  - name: x\n    task: chat\n", "models[0].base_url: Field required"),
        ("models:\n  - name: x\n    base_url: ftp://x\n", "models[0].base_url: Value error, must start with http"),
        ("models:\n  - name: x\n    base_url: http://x\n    task: painting\n", "models[0].task"),
        ("gateway:\n  port: seventy\n", "gateway.port"),
        ("gateway:\n  prot: 80\n", "gateway.prot: Extra inputs are not permitted"),
        ("model_router:\n  strategy: fastest\n", "strategy 'fastest' is not one of the strategies"),
        ("adapter:\n  types: [rest, smoke]\n", "unknown protocols ['smoke']"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("models: [\n", "is not valid YAML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert str(path) in message
    assert expected in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read configuration file .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml", env={})
