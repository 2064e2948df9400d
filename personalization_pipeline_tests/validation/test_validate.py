"""validate_batch beyond the corpus: thresholds, accounting, the quarantine table's shape,
masked samples, configuration, and thread safety (one ephemeral GX context per call)."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from bench.bench_validation import synthetic_events
from personalization_pipeline.core import canonical
from personalization_pipeline.validation import (
    QUARANTINE_COLUMNS,
    QuarantineThresholds,
    ValidationConfig,
    kind_for_source,
    mask_email,
    validate_batch,
)
from personalization_pipeline.validation.suites import CONFIG_FILE, KINDS, suite_checks
from personalization_pipeline_tests.validation.builders import (
    RECEIVED,
    canonical_row,
    good_crm,
    good_esp,
    good_events,
    loose_frame,
)


def events_with_bad(rows: int, bad: int) -> pd.DataFrame:
    frame = synthetic_events(rows)
    frame.loc[frame.index[:bad], "event_type"] = "teleported"
    return frame


@pytest.mark.parametrize(
    "rows,bad,passed",
    [
        (300, 15, True),  # exactly 5%: not above the threshold
        (300, 16, False),  # 5.3%
        (200, 11, False),  # the rate applies from 200 rows on
        (199, 10, True),  # below 200 rows the count applies: 10 is allowed
        (199, 11, False),
        (50, 0, True),
    ],
)
def test_blocking_verdict_follows_the_thresholds(config, rows, bad, passed):
    outcome = validate_batch(events_with_bad(rows, bad), "event", config)
    assert outcome.rows_quarantined == bad
    assert outcome.passed_threshold is passed
    assert outcome.quarantine_rate == pytest.approx(bad / rows)


def test_a_bad_batch_fails_while_a_clean_one_next_to_it_passes(config):
    bad = validate_batch(events_with_bad(1_000, 80), "event", config)
    good = validate_batch(synthetic_events(1_000), "event", config)
    assert (bad.passed_threshold, good.passed_threshold) == (False, True)
    assert bad.failure_counts == {"event_type_in_vocabulary": 80}
    assert good.failure_counts == {} and not good.complete_run


def test_duplicates_do_not_count_towards_the_rate(config):
    frame = events_with_bad(200, 10)
    frame = pd.concat([frame, frame.iloc[50:250]], ignore_index=True)  # 150 re-deliveries
    outcome = validate_batch(frame, "event", config)
    assert (outcome.rows_in, outcome.rows_duplicate, outcome.rows_quarantined) == (350, 150, 10)
    assert outcome.passed_threshold  # 10 of 200 validated rows


def test_thresholds_come_from_configuration(config):
    strict = replace(config, thresholds=QuarantineThresholds(max_quarantine_rate=0.0, min_rows_for_rate=1))
    assert not validate_batch(events_with_bad(300, 1), "event", strict).passed_threshold


def test_failures_beyond_the_200_value_cap_are_all_found(config):
    frame = synthetic_events(5_000)
    bad = np.arange(0, 5_000, 7)  # 715 rows, far past GX's 200-entry value lists
    frame.loc[bad, "currency"] = "eur"
    frame.index = frame.index * 3 + 11  # a non-range index must not matter
    outcome = validate_batch(frame, "event", config)
    assert outcome.failure_counts == {"currency_three_upper_letters": len(bad)}
    assert outcome.quarantine["row_position"].tolist() == bad.tolist()
    assert list(outcome.staged.index) == [p * 3 + 11 for p in range(5_000) if p % 7]


@pytest.mark.parametrize("kind,build", [("crm_contact", good_crm), ("esp_member", good_esp), ("event", good_events)])
def test_clean_batches_take_the_fast_path(config, kind, build):
    outcome = validate_batch(build(), kind, config)
    assert outcome.rows_quarantined == 0 and outcome.passed_threshold
    assert not outcome.complete_run


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch(config, kind):
    outcome = validate_batch(canonical.empty_frame(), kind, config)
    assert (outcome.rows_in, outcome.rows_staged, outcome.rows_quarantined, outcome.rows_duplicate) == (0, 0, 0, 0)
    assert outcome.passed_threshold
    assert list(outcome.quarantine.columns) == list(QUARANTINE_COLUMNS)


def test_quarantine_rows_carry_source_raw_reasons_and_received_at(config):
    frame = loose_frame(good_crm(), [canonical_row("crm_contact", email="bad@", lifecycle_stage="alien")])
    outcome = validate_batch(frame, "crm_contact", config, partition="2026-11-28-12:00")
    (row,) = outcome.quarantine.to_dict("records")
    assert list(outcome.quarantine.columns) == list(QUARANTINE_COLUMNS)
    assert row["source"] == "crm" and row["kind"] == "crm_contact" and row["partition"] == "2026-11-28-12:00"
    assert row["failed_expectations"] == ["email_well_formed", "lifecycle_stage_in_set"]
    assert row["received_at"] == pd.Timestamp(RECEIVED)
    raw = json.loads(row["raw"])
    assert raw["email"] == "bad@" and raw["source_record_id"] == "900"


def test_raw_records_given_by_the_caller_are_kept(config):
    frame = good_events()
    envelopes = [{"delivery_id": f"d{i}", "payload": {"n": i, "text": "line\nbreak \u2028"}} for i in range(len(frame))]
    frame.loc[2, "event_type"] = "nope"
    outcome = validate_batch(frame, "event", config, raw=envelopes)
    assert json.loads(outcome.quarantine["raw"].iloc[0]) == envelopes[2]
    with pytest.raises(ValueError):
        validate_batch(frame, "event", config, raw=envelopes[:-1])


def test_samples_mask_emails(config):
    frame = loose_frame(good_esp(), [canonical_row("esp_member", email="jane.doe@example.com", email_consent="gone")])
    outcome = validate_batch(frame, "esp_member", config)
    (sample,) = outcome.samples
    assert sample["email"] == "j***@example.com"
    assert "jane.doe" not in json.dumps(outcome.metadata(), default=str)
    assert outcome.metadata()["failed_expectations"] == {"email_consent_in_set": 1}


def test_sample_count_is_capped(config):
    outcome = validate_batch(events_with_bad(100, 40), "event", config)
    assert len(outcome.samples) == 5


@pytest.mark.parametrize(
    "value,masked",
    [("john@example.com", "j***@example.com"), ("a@b", "a***@b"), ("no-at-sign", "***"), ("@x.com", "***"), (None, None)],
)
def test_mask_email(value, masked):
    assert mask_email(value) == masked


def test_unknown_fields_are_counted_not_validated(config):
    frame = good_events()
    frame["utm_source"] = ["x", None, "y", None, None, "z"]
    outcome = validate_batch(frame, "event", config)
    assert outcome.unknown_fields == {"utm_source": 3}
    assert outcome.rows_quarantined == 0


def test_configured_sets_reach_the_suites(config):
    custom = replace(config, lifecycle_stages=("alien",))
    frame = loose_frame(good_crm().iloc[:0], [canonical_row("crm_contact", lifecycle_stage="alien")])
    assert validate_batch(frame, "crm_contact", custom).rows_quarantined == 0
    assert validate_batch(frame, "crm_contact", config).rows_quarantined == 1


def test_yaml_holds_the_product_defaults():
    config = ValidationConfig.load(CONFIG_FILE)
    assert config.lifecycle_stages == (
        "subscriber", "lead", "marketingqualifiedlead", "salesqualifiedlead",
        "opportunity", "customer", "evangelist", "other",
    )
    assert set(config.esp_statuses) == {"subscribed", "unsubscribed", "cleaned", "pending", "transactional", "archived"}
    assert config.event_types == canonical.EVENT_TYPES
    assert config.max_future_skew_seconds == 300
    assert config.earliest_observed_at == pd.Timestamp("2000-01-01", tz="UTC")
    assert config.thresholds == QuarantineThresholds(0.05, 200, 10)


def test_every_required_column_has_a_not_null_expectation(config):
    required = {
        "crm_contact": {"source_record_id", "observed_at"},
        "esp_member": {"source_record_id", "email", "email_consent", "observed_at"},
        "event": {"source_record_id", "event_type", "observed_at"},
    }
    for kind, columns in required.items():
        not_null = {c.column for c in suite_checks(kind, config) if c.expectation == "ExpectColumnValuesToNotBeNull"}
        assert columns <= not_null, kind


def test_unknown_kind_is_an_error(config):
    with pytest.raises(ValueError):
        validate_batch(good_events(), "tweets", config)


def test_kind_for_source():
    assert kind_for_source("crm", "contact") == "crm_contact"
    assert kind_for_source("esp", "member") == "esp_member"
    assert [kind_for_source(s, "event") for s in ("shop", "web", "esp")] == ["event"] * 3


def test_the_verdict_does_not_depend_on_the_wall_clock(config):
    """Rows observed far in the past relative to now, but fine relative to received_at."""
    frame = good_events()
    shift = pd.Timedelta(days=3650)
    frame["observed_at"] -= shift
    frame["received_at"] -= shift
    assert validate_batch(frame, "event", config).rows_quarantined == 0
    frame["observed_at"] = frame["received_at"] + pd.Timedelta(minutes=10)
    assert validate_batch(frame, "event", config).rows_quarantined == len(frame)


def _summary(outcome) -> tuple:
    return (
        outcome.rows_in,
        outcome.rows_staged,
        outcome.rows_duplicate,
        tuple(outcome.staged["source_record_id"]),
        tuple(outcome.quarantine["row_position"]),
        tuple(tuple(r) for r in outcome.quarantine["failed_expectations"]),
    )


def test_two_threads_each_get_their_own_frames_result(config):
    first = events_with_bad(2_000, 30)
    second = synthetic_events(1_500, bad_share=0.05, seed=11)
    second["source_record_id"] = "other-" + second["source_record_id"].astype(str)
    expected = {"first": _summary(validate_batch(first, "event", config)),
                "second": _summary(validate_batch(second, "event", config))}
    assert expected["first"] != expected["second"]
    mismatches: list[str] = []
    errors: list[BaseException] = []

    def worker(name: str, frame: pd.DataFrame) -> None:
        try:
            for _ in range(12):
                if _summary(validate_batch(frame, "event", config)) != expected[name]:
                    mismatches.append(name)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n, f)) for n, f in (("first", first), ("second", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and mismatches == []


def test_an_expectation_gx_cannot_evaluate_holds_the_whole_batch_back(config, monkeypatch):
    """If GX reports an exception for an expectation, no row is known to pass it: every
    row is quarantined under "<check>:error" and the batch fails its blocking check."""
    from personalization_pipeline.validation import validate as module

    frame = events_with_bad(300, 3)
    monkeypatch.setattr(module, "_raised", lambda item: "boom" if item.expectation_config.meta["check"] == "event_type_in_vocabulary" else None)
    outcome = validate_batch(frame, "event", config)
    assert outcome.failure_counts == {"event_type_in_vocabulary:error": 300}
    assert outcome.rows_quarantined == 300 and not outcome.passed_threshold and outcome.identity_holds
