"""The row-count drift rule (pure, no Dagster) and its configuration, including the
``PP_VALIDATION_CONFIG`` override that the suites and the replay read."""

from __future__ import annotations

import os

import pytest
import yaml

from personalization_pipeline.validation import DriftSettings, ValidationConfig, default_config, judge_row_count
from personalization_pipeline.validation.suites import CONFIG_ENV, CONFIG_FILE

SETTINGS = DriftSettings(window=6, factor=4, min_history=3, min_rows=20)


def test_no_verdict_before_the_minimum_history():
    verdict = judge_row_count(10_000, [100, 100], SETTINGS)
    assert not verdict.judged and not verdict.drifted
    assert verdict.history_size == 2 and "3 needed" in verdict.reason
    assert judge_row_count(10_000, [100, 100, 100], SETTINGS).drifted


@pytest.mark.parametrize(
    "rows_in,drifted",
    [(100, False), (400, False), (401, True), (25, False), (24, True), (0, True), (10_000, True)],
)
def test_warns_beyond_the_factor_either_way(rows_in, drifted):
    verdict = judge_row_count(rows_in, [90, 100, 110, 100, 95], SETTINGS)
    assert verdict.judged and verdict.median == 100
    assert verdict.drifted is drifted, verdict.reason


def test_only_the_last_window_batches_count():
    history = [5_000] * 10 + [100] * 6  # the old busy days have left the window
    verdict = judge_row_count(100, history, SETTINGS)
    assert verdict.median == 100 and verdict.history_size == 6 and not verdict.drifted


def test_quiet_hours_are_no_drift_but_a_busy_source_going_silent_is():
    # A source that is mostly quiet: zero-row batches make its normal, and counts below
    # min_rows are not compared as ratios of tiny numbers.
    quiet = [0, 0, 3, 0, 1, 0]
    assert not judge_row_count(0, quiet, SETTINGS).drifted
    assert not judge_row_count(60, quiet, SETTINGS).drifted  # 60 against the floor of 20: 3x
    assert judge_row_count(81, quiet, SETTINGS).drifted  # 81 against 20: above 4x
    # A busy source that goes silent warns.
    busy = [500, 520, 480, 510, 490, 500]
    verdict = judge_row_count(0, busy, SETTINGS)
    assert verdict.drifted and "0 rows" in verdict.reason


def test_an_open_window_is_judged_only_for_being_too_large():
    history = [1_000] * 6
    assert not judge_row_count(10, history, SETTINGS, window_open=True).drifted
    assert judge_row_count(10, history, SETTINGS).drifted
    assert judge_row_count(5_000, history, SETTINGS, window_open=True).drifted


def test_a_batch_spanning_several_units_is_compared_with_as_many_medians():
    history = [100] * 6
    assert not judge_row_count(2_400, history, SETTINGS, span=24).drifted
    assert judge_row_count(2_400, history, SETTINGS).drifted


def test_metadata_is_plain_numbers():
    meta = judge_row_count(50, [100] * 6, SETTINGS).metadata()
    assert meta == {
        "rows_in": 50, "history_batches": 6, "judged": True, "reason": meta["reason"],
        "history_median": 100.0, "expected_rows": 100.0, "ratio": 0.5,
    }


@pytest.mark.parametrize(
    "bad", [dict(window=0), dict(factor=1), dict(min_history=7, window=6), dict(min_rows=0)]
)
def test_settings_are_checked(bad):
    with pytest.raises(ValueError):
        DriftSettings(**{**SETTINGS.__dict__, **bad})


def test_drift_settings_come_from_the_yaml_with_per_asset_overrides():
    config = ValidationConfig.load(CONFIG_FILE)
    assert config.drift == DriftSettings(window=24, factor=5, min_history=6, min_rows=50)
    assert config.drift_for("crm_contacts") == config.drift
    assert config.drift_for("stream_events") == DriftSettings(window=24, factor=8, min_history=6, min_rows=50)
    data = yaml.safe_load(CONFIG_FILE.read_text())
    data["row_count_drift"] = {"factor": 3, "assets": {"kafka_events": {"min_history": 2}}}
    custom = ValidationConfig.from_mapping(data)
    assert custom.drift == DriftSettings(factor=3)
    assert custom.drift_for("kafka_events") == DriftSettings(factor=3, min_history=2)


def test_the_config_env_override_and_an_edited_file_reach_the_next_validation(tmp_path, monkeypatch):
    data = yaml.safe_load(CONFIG_FILE.read_text())
    path = tmp_path / "validation.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert "partner" not in default_config().lifecycle_stages
    data["lifecycle_stages"].append("partner")
    path.write_text(yaml.safe_dump(data))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a coarse clock must not hide the edit
    assert "partner" in default_config().lifecycle_stages
    monkeypatch.delenv(CONFIG_ENV)
    assert "partner" not in default_config().lifecycle_stages
