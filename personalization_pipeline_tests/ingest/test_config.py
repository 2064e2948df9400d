"""IngestConfig.from_env: clear errors naming the variable; secrets kept out of repr."""

from __future__ import annotations

from pathlib import Path

import pytest

from personalization_pipeline.ingest_service import ConfigError, IngestConfig

from .conftest import MAILCHIMP_SECRET, SECRETS, SHOPIFY_SECRET, WRITE_KEY, env_for


def test_from_env_reads_everything(tmp_path):
    env = env_for(
        tmp_path,
        INGEST_MAX_BODY_BYTES="2048",
        INGEST_REPLAY_WINDOW_SECONDS="60.5",
        INGEST_ROTATE_BYTES="4096",
        INGEST_ROTATE_SECONDS="2",
    )
    env["INGEST_WRITE_KEYS"] = f" {WRITE_KEY} , other ,,"
    config = IngestConfig.from_env(env)
    assert config.landing_dir == Path(tmp_path)
    assert config.write_keys == frozenset({WRITE_KEY, "other"})
    assert config.shopify_secret == SHOPIFY_SECRET
    assert config.mailchimp_webhook_secret == MAILCHIMP_SECRET
    assert (config.max_body_bytes, config.replay_window_seconds) == (2048, 60.5)
    assert (config.rotate_bytes, config.rotate_seconds) == (4096, 2.0)


def test_defaults(tmp_path):
    config = IngestConfig.from_env(env_for(tmp_path))
    assert config.max_body_bytes == 1 << 20
    assert config.replay_window_seconds == 48 * 3600  # Shopify retries for 48 h with the original trigger time
    assert config.rotate_bytes == 8 << 20
    assert config.rotate_seconds == 5


@pytest.mark.parametrize(
    "name",
    ["INGEST_LANDING_DIR", "INGEST_WRITE_KEYS", "SHOPIFY_WEBHOOK_SECRET", "MAILCHIMP_WEBHOOK_SECRET"],
)
def test_missing_variable_is_named(tmp_path, name):
    env = env_for(tmp_path)
    del env[name]
    with pytest.raises(ConfigError, match=name):
        IngestConfig.from_env(env)
    env[name] = "   "
    with pytest.raises(ConfigError, match=name):
        IngestConfig.from_env(env)


@pytest.mark.parametrize(
    "name,value",
    [
        ("INGEST_MAX_BODY_BYTES", "1MB"),
        ("INGEST_MAX_BODY_BYTES", "0"),
        ("INGEST_REPLAY_WINDOW_SECONDS", "-1"),
        ("INGEST_REPLAY_WINDOW_SECONDS", "nan"),
        ("INGEST_ROTATE_BYTES", "1.5"),
        ("INGEST_ROTATE_SECONDS", "soon"),
    ],
)
def test_invalid_number_is_named(tmp_path, name, value):
    with pytest.raises(ConfigError, match=name):
        IngestConfig.from_env(env_for(tmp_path, **{name: value}))


def test_write_keys_of_only_commas(tmp_path):
    with pytest.raises(ConfigError, match="INGEST_WRITE_KEYS"):
        IngestConfig.from_env(env_for(tmp_path, INGEST_WRITE_KEYS=" , ,"))


def test_repr_and_errors_hide_secrets(tmp_path):
    config = IngestConfig.from_env(env_for(tmp_path))
    text = repr(config) + str(config)
    for secret in SECRETS:
        assert secret not in text
    with pytest.raises(ConfigError) as info:
        IngestConfig.from_env(env_for(tmp_path, INGEST_ROTATE_SECONDS=SHOPIFY_SECRET))
    # the bad value of a number setting is shown; secrets are never a number setting
    assert "INGEST_ROTATE_SECONDS" in str(info.value)
