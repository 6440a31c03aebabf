"""The runner's secrets: from the variable, else a 0600 file in the state directory made
once and reused; files that hold a secret are 0600; each child gets only its secrets."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from clawdbot.common.config import Config, ConfigError
from clawdbot.common.internal_auth import TOKEN_ENV
from clawdbot.common.secret_files import env_or_state_secret, write_private
from clawdbot.runner.__main__ import API_KEY_ENV, RunnerSecrets, all_secret_names, child_secrets


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (API_KEY_ENV, TOKEN_ENV, "CLAWDBOT_CALLBACK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_secrets_are_generated_once_with_mode_0600_and_reused(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    first = RunnerSecrets.load(Config(), state)
    for secret, name in (
        (first.api_key, "api_key"),
        (first.internal_token, "internal_token"),
        (first.callback_secret, "callback_secret"),
    ):
        assert secret.source == "generated"
        assert secret.path == state / name
        assert mode(state / name) == 0o600
        assert len(secret.value) >= 43
        assert secret.value not in repr(secret)
    assert first.api_key.value.startswith("cb-")
    again = RunnerSecrets.load(Config(), state)
    assert again.api_key.source == again.internal_token.source == "file"
    assert (again.api_key.value, again.internal_token.value, again.callback_secret.value) == (
        first.api_key.value,
        first.internal_token.value,
        first.callback_secret.value,
    )
    assert again.internal_token.where() == f"in {state / 'internal_token'}"
    # Nothing else is left behind in the state directory (no partial files).
    assert sorted(p.name for p in state.iterdir()) == ["api_key", "callback_secret", "internal_token"]


def test_the_variable_wins_and_no_file_is_written(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(TOKEN_ENV, "from-the-environment-0123456789")
    secret = env_or_state_secret(TOKEN_ENV, tmp_path / "internal_token")
    assert (secret.value, secret.source, secret.where()) == (
        "from-the-environment-0123456789",
        "env",
        f"from {TOKEN_ENV}",
    )
    assert not (tmp_path / "internal_token").exists()


def test_a_loosened_secret_file_is_tightened_and_an_empty_one_refused(tmp_path: Path) -> None:
    loose = tmp_path / "callback_secret"
    loose.write_text("kept-as-it-is\n")
    os.chmod(loose, 0o644)
    assert env_or_state_secret("UNSET_VARIABLE_FOR_THIS_TEST", loose, env={}).value == "kept-as-it-is"
    assert mode(loose) == 0o600
    empty = tmp_path / "api_key"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="api_key"):
        env_or_state_secret("UNSET_VARIABLE_FOR_THIS_TEST", empty, env={})


def test_write_private_is_0600_even_over_a_readable_file(tmp_path: Path) -> None:
    target = tmp_path / "ready.json"
    target.write_text("{}")
    os.chmod(target, 0o644)
    write_private(target, '{"api_key": "x"}')
    assert mode(target) == 0o600
    assert target.read_text() == '{"api_key": "x"}'


def test_each_child_gets_only_the_secrets_it_needs(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PROVIDER_KEY_FOR_TEST", "sk-provider")
    config = Config.model_validate(
        {"models": [{"name": "m", "base_url": "http://127.0.0.1:1/v1", "api_key_env": "PROVIDER_KEY_FOR_TEST"}]}
    )
    secrets = RunnerSecrets.load(config, tmp_path)
    callback = config.jobs.callback_secret_env
    withheld = all_secret_names(config)
    assert {API_KEY_ENV, TOKEN_ENV, callback, "PROVIDER_KEY_FOR_TEST", "QDRANT_API_KEY"} <= withheld

    def given(role: str) -> set[str]:
        return set(child_secrets(config, secrets, role))

    # The jobs service delivers (and signs) callbacks; the adapter only submits jobs to it.
    assert {API_KEY_ENV, TOKEN_ENV} <= given("adapter") and callback not in given("adapter")
    assert "PROVIDER_KEY_FOR_TEST" not in given("adapter")
    assert {TOKEN_ENV, "PROVIDER_KEY_FOR_TEST"} <= given("router")
    assert API_KEY_ENV not in given("router") and callback not in given("router")
    assert {TOKEN_ENV, callback} <= given("jobs") and API_KEY_ENV not in given("jobs")
    for role in ("cache", "worker", "health", "orchestrator"):
        assert TOKEN_ENV in given(role)
        assert not given(role) & {API_KEY_ENV, callback, "PROVIDER_KEY_FOR_TEST"}, role
    assert given("envoy") == {TOKEN_ENV}
    for role in ("redis", "kafka", "prometheus"):
        assert given(role) == set(), role
    assert child_secrets(config, secrets, "router")["PROVIDER_KEY_FOR_TEST"] == "sk-provider"
    assert child_secrets(config, secrets, "adapter")[API_KEY_ENV] == secrets.api_key.value
