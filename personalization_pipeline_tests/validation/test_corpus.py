"""The corpus of bad inputs: at least two cases per expectation per source. Each bad row
ends in quarantine naming the expectation it broke, the good rows next to it are staged,
nothing raises and ``rows_in = rows_staged + rows_quarantined + rows_duplicate`` holds.

Where it matters the bad rows go through the real converters (core/sources.py,
core/events.py) first, so a case shows where a bad vendor value ends up after canonical
conversion (a null, a wrong date, or passed through as given)."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd
import pytest

from personalization_pipeline.core import canonical, sources
from personalization_pipeline.validation import validate_batch
from personalization_pipeline_tests.validation.builders import (
    GOOD_ROWS,
    RECEIVED,
    canonical_row,
    crm_record,
    esp_member,
    events_frame,
    good_crm,
    good_esp,
    good_events,
    iso,
    loose_frame,
    order_envelope,
    track_envelope,
)

LONG = "x" * 10_000


def crm_via_source(**props):
    """Good contacts plus one converted from a HubSpot record with ``props``."""
    return sources.crm_contacts_to_canonical([crm_record(i) for i in range(GOOD_ROWS)] + [crm_record(77, **props)], RECEIVED)


def crm_rows(*rows):
    return loose_frame(good_crm(), list(rows))


def esp_via_source(**fields):
    return sources.esp_members_to_canonical([esp_member(i) for i in range(GOOD_ROWS)] + [esp_member(77, **fields)], RECEIVED)


def esp_rows(*rows):
    return loose_frame(good_esp(), list(rows))


def events_via(envelope):
    good = [track_envelope(i) for i in range(3)] + [order_envelope(i + 50) for i in range(3)]
    return events_frame(good + [envelope])


def event_rows(*rows):
    return loose_frame(good_events(), list(rows))


def crm(**values):
    return canonical_row("crm_contact", **values)


def esp(**values):
    return canonical_row("esp_member", **values)


def evt(**values):
    return canonical_row("event", **values)


LATE = RECEIVED + timedelta(minutes=6)

# (case id, kind, frame builder, expected check) -- the bad row is the last row.
CASES = [
    # ---------------------------------------------------------------- CRM contacts
    ("crm id null", "crm_contact", lambda: crm_rows(crm(source_record_id=None)), "source_record_id_not_null"),
    ("crm id blank", "crm_contact", lambda: crm_rows(crm(source_record_id="   ")), "source_record_id_not_null"),
    ("crm id 300 chars", "crm_contact", lambda: crm_rows(crm(source_record_id="9" * 300)), "source_record_id_length"),
    ("crm id 10k chars", "crm_contact", lambda: crm_rows(crm(source_record_id=LONG)), "source_record_id_length"),
    ("crm email no domain", "crm_contact", lambda: crm_via_source(email="jane@"), "email_well_formed"),
    ("crm email no at", "crm_contact", lambda: crm_via_source(email="jane.example.com"), "email_well_formed"),
    ("crm email umlaut", "crm_contact", lambda: crm_via_source(email="jöhn@example.com"), "email_well_formed"),
    ("crm email zero-width", "crm_contact", lambda: crm_via_source(email="john@example.com\u200b"), "email_well_formed"),
    ("crm email fullwidth at", "crm_contact", lambda: crm_via_source(email="john\uff20example.com"), "email_well_formed"),
    ("crm email wrong type", "crm_contact", lambda: crm_rows(crm(email=12345)), "email_well_formed"),
    ("crm email 300 chars", "crm_contact", lambda: crm_via_source(email="a" * 290 + "@example.com"), "email_length"),
    ("crm email 10k chars", "crm_contact", lambda: crm_via_source(email=LONG + "@example.com"), "email_length"),
    ("crm lastmodified missing", "crm_contact", lambda: crm_via_source(lastmodifieddate=None), "observed_at_not_null"),
    ("crm lastmodified garbage", "crm_contact", lambda: crm_rows(crm(observed_at="last tuesday")), "observed_at_not_null"),
    (
        "crm lastmodified epoch ms",
        "crm_contact",
        lambda: crm_rows(crm(observed_at=1_764_331_200_000)),
        "observed_at_not_null",
    ),
    ("crm before 2000", "crm_contact", lambda: crm_via_source(lastmodifieddate="1999-12-31T23:59:59Z"), "observed_at_not_before_earliest"),
    ("crm epoch zero", "crm_contact", lambda: crm_via_source(lastmodifieddate="1970-01-01T00:00:00Z"), "observed_at_not_before_earliest"),
    ("crm 6 min after received", "crm_contact", lambda: crm_via_source(lastmodifieddate=iso(LATE)), "observed_at_not_after_received_at"),
    ("crm a year after received", "crm_contact", lambda: crm_via_source(lastmodifieddate="2027-11-28T12:00:00Z"), "observed_at_not_after_received_at"),
    ("crm received_at missing", "crm_contact", lambda: crm_rows(crm(received_at=None)), "observed_at_not_after_received_at"),
    ("crm lifecycle unknown", "crm_contact", lambda: crm_via_source(lifecyclestage="alien"), "lifecycle_stage_in_set"),
    ("crm lifecycle wrong case", "crm_contact", lambda: crm_via_source(lifecyclestage="Customer"), "lifecycle_stage_in_set"),
    ("crm lifecycle wrong type", "crm_contact", lambda: crm_rows(crm(lifecycle_stage=5)), "lifecycle_stage_in_set"),
    ("crm lifecycle 10k chars", "crm_contact", lambda: crm_via_source(lifecyclestage=LONG), "lifecycle_stage_in_set"),
    # ---------------------------------------------------------------- ESP members
    ("esp id null", "esp_member", lambda: esp_rows(esp(source_record_id=None)), "source_record_id_not_null"),
    (
        "esp id field missing",
        "esp_member",
        lambda: esp_rows({k: v for k, v in esp().items() if k != "source_record_id"}),
        "source_record_id_not_null",
    ),
    ("esp id 300 chars", "esp_member", lambda: esp_via_source(id="h" * 300), "source_record_id_length"),
    ("esp id 10k chars", "esp_member", lambda: esp_via_source(id=LONG), "source_record_id_length"),
    ("esp email missing", "esp_member", lambda: esp_via_source(email_address=None), "email_not_null"),
    ("esp email blank", "esp_member", lambda: esp_via_source(email_address="  "), "email_not_null"),
    ("esp email a@b", "esp_member", lambda: esp_via_source(email_address="a@b"), "email_well_formed"),
    ("esp email cyrillic o", "esp_member", lambda: esp_via_source(email_address="j\u043ehn@example.com"), "email_well_formed"),
    ("esp email double at", "esp_member", lambda: esp_via_source(email_address="a@@example.com"), "email_well_formed"),
    ("esp email trailing newline", "esp_member", lambda: esp_via_source(email_address="a@example.com\n"), "email_well_formed"),
    ("esp email 300 chars", "esp_member", lambda: esp_via_source(email_address="b" * 290 + "@example.com"), "email_length"),
    ("esp email 10k chars", "esp_member", lambda: esp_via_source(email_address=LONG + "@example.com"), "email_length"),
    ("esp status missing", "esp_member", lambda: esp_via_source(status=None), "email_consent_not_null"),
    ("esp status blank", "esp_member", lambda: esp_rows(esp(email_consent="")), "email_consent_not_null"),
    ("esp status unknown", "esp_member", lambda: esp_via_source(status="deleted"), "email_consent_in_set"),
    ("esp status wrong case", "esp_member", lambda: esp_via_source(status="Subscribed"), "email_consent_in_set"),
    ("esp last_changed missing", "esp_member", lambda: esp_via_source(last_changed=None), "observed_at_not_null"),
    ("esp last_changed garbage", "esp_member", lambda: esp_rows(esp(observed_at="yesterday")), "observed_at_not_null"),
    ("esp before 2000", "esp_member", lambda: esp_via_source(last_changed="1999-06-01T00:00:00+00:00"), "observed_at_not_before_earliest"),
    ("esp year 1900", "esp_member", lambda: esp_via_source(last_changed="1900-01-01T00:00:00Z"), "observed_at_not_before_earliest"),
    ("esp 6 min after received", "esp_member", lambda: esp_via_source(last_changed=iso(LATE)), "observed_at_not_after_received_at"),
    ("esp offset hides future", "esp_member", lambda: esp_via_source(last_changed="2026-11-28T13:30:00+01:00"), "observed_at_not_after_received_at"),
    # ---------------------------------------------------------------- events
    (
        "event no message or delivery id",
        "event",
        lambda: events_via(track_envelope(77, {"messageId": None}, delivery_id=None)),
        "source_record_id_not_null",
    ),
    ("event id blank", "event", lambda: event_rows(evt(source_record_id="")), "source_record_id_not_null"),
    ("event type null", "event", lambda: event_rows(evt(event_type=None)), "event_type_not_null"),
    ("event type blank", "event", lambda: event_rows(evt(event_type=" ")), "event_type_not_null"),
    ("event type unknown", "event", lambda: event_rows(evt(event_type="teleported")), "event_type_in_vocabulary"),
    ("event type track name", "event", lambda: event_rows(evt(event_type="Page Viewed")), "event_type_in_vocabulary"),
    ("event type 10k chars", "event", lambda: event_rows(evt(event_type=LONG)), "event_type_in_vocabulary"),
    ("event time garbage", "event", lambda: events_via(track_envelope(77, {"timestamp": "soon"})), "observed_at_not_null"),
    (
        # parse_time reads epoch numbers, not epoch text: the string becomes null.
        "event time epoch-ms as text",
        "event",
        lambda: events_via(track_envelope(77, {"timestamp": "1764331200000"})),
        "observed_at_not_null",
    ),
    (
        # 86_400_000 ms (1970-01-02) is below parse_time's 1e11 cut, so it is read as
        # seconds: 1972-09-27, a wrong date that the earliest-date rule catches.
        "event time small epoch ms",
        "event",
        lambda: events_via(track_envelope(77, {"timestamp": 86_400_000})),
        "observed_at_not_before_earliest",
    ),
    ("event before 2000", "event", lambda: events_via(track_envelope(77, {"timestamp": "1999-01-01T00:00:00Z"})), "observed_at_not_before_earliest"),
    ("event 10 min after received", "event", lambda: events_via(track_envelope(77, {"timestamp": iso(RECEIVED + timedelta(minutes=10))})), "observed_at_not_after_received_at"),
    (
        "shop order a day ahead",
        "event",
        lambda: events_via(
            {
                "v": 1,
                "delivery_id": "shop-77",
                "transport": "shopify",
                "topic": "orders/create",
                "received_at": iso(RECEIVED),
                "headers": {},
                "payload": {"id": 77, "created_at": "2026-11-29T12:00:00Z", "email": "o@example.com",
                            "total_price": "10.00", "currency": "EUR", "customer": {"id": 5}},
            }
        ),
        "observed_at_not_after_received_at",
    ),
    ("event no identifier", "event", lambda: events_via(track_envelope(77, {"anonymousId": None})), "has_identifier"),
    (
        "event blocked identifiers only",
        "event",
        lambda: events_via(track_envelope(77, {"anonymousId": "undefined", "userId": "0", "properties": {"email": "null"}})),
        "has_identifier",
    ),
    ("event negative total", "event", lambda: events_via(order_envelope(77, total="-5.00")), "order_total_minor_non_negative_integer"),
    ("event negative total row", "event", lambda: event_rows(evt(order_total_minor=-1, currency="EUR")), "order_total_minor_non_negative_integer"),
    ("event total wrong type", "event", lambda: event_rows(evt(order_total_minor="abc", currency="EUR")), "order_total_minor_non_negative_integer"),
    ("event total fractional", "event", lambda: event_rows(evt(order_total_minor=12.5, currency="EUR")), "order_total_minor_non_negative_integer"),
    ("event currency 4 letters", "event", lambda: events_via(order_envelope(77, currency="EURO")), "currency_three_upper_letters"),
    ("event currency symbols", "event", lambda: events_via(order_envelope(77, currency="€€€")), "currency_three_upper_letters"),
    ("event currency lower case row", "event", lambda: event_rows(evt(currency="usd")), "currency_three_upper_letters"),
]


@pytest.mark.parametrize("case_id,kind,build,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_row_is_quarantined_with_its_reason(config, case_id, kind, build, expected):
    frame = build()
    bad_position = len(frame) - 1
    outcome = validate_batch(frame, kind, config)

    assert outcome.identity_holds
    assert outcome.rows_in == len(frame)
    by_position = outcome.quarantine.set_index("row_position")["failed_expectations"]
    assert bad_position in by_position.index, f"{case_id}: not quarantined; staged={outcome.rows_staged}"
    assert expected in by_position[bad_position], by_position[bad_position]
    # The good rows next to it go on.
    assert list(by_position.index) == [bad_position], by_position.to_dict()
    assert outcome.rows_staged == len(frame) - 1
    assert outcome.failure_counts.get(expected) == 1
    assert outcome.complete_run


def test_every_check_of_every_suite_has_two_cases(config):
    from personalization_pipeline.validation.suites import KINDS, suite_checks

    covered: dict[tuple[str, str], int] = {}
    for _, kind, _, expected in CASES:
        covered[(kind, expected)] = covered.get((kind, expected), 0) + 1
    missing = [
        (kind, check.name)
        for kind in KINDS
        for check in suite_checks(kind, config)
        if check.name != "source_record_id_unique" and covered.get((kind, check.name), 0) < 2
    ]
    assert missing == []  # the uniqueness rule has its own tests below


def test_crm_id_repeated_in_batch_quarantines_every_copy(config):
    frame = crm_rows(crm(i=1000, observed_at=RECEIVED - timedelta(hours=2)))  # id 1000 is good row 0 too
    outcome = validate_batch(frame, "crm_contact", config)
    by_position = outcome.quarantine.set_index("row_position")["failed_expectations"].to_dict()
    assert by_position == {0: ["source_record_id_unique"], len(frame) - 1: ["source_record_id_unique"]}
    assert outcome.rows_duplicate == 0 and outcome.identity_holds


def test_crm_id_as_number_and_text_is_not_unique(config):
    frame = crm_rows(crm(source_record_id=1001, observed_at=RECEIVED - timedelta(hours=3)))
    outcome = validate_batch(frame, "crm_contact", config)
    assert sorted(outcome.quarantine["row_position"]) == [1, len(frame) - 1]
    assert outcome.failure_counts == {"source_record_id_unique": 2}


def test_exact_redeliveries_are_duplicates_not_quarantine(config):
    good = [track_envelope(i) for i in range(4)]
    frame = events_frame(good + [good[1], good[1], good[3]])
    outcome = validate_batch(frame, "event", config)
    assert (outcome.rows_in, outcome.rows_staged, outcome.rows_quarantined, outcome.rows_duplicate) == (7, 4, 0, 3)
    assert list(outcome.duplicates.index) == [4, 5, 6]
    assert not outcome.complete_run


def test_same_id_new_version_is_not_a_duplicate(config):
    first = crm_record(1)
    later = crm_record(1, lastmodifieddate=iso(RECEIVED - timedelta(minutes=1)))
    frame = sources.crm_contacts_to_canonical([first, later, first], RECEIVED)
    outcome = validate_batch(frame, "crm_contact", config)
    # The exact copy is a duplicate; the two versions fail uniqueness in one batch.
    assert outcome.rows_duplicate == 1
    assert outcome.failure_counts == {"source_record_id_unique": 2}
    assert outcome.identity_holds


def test_rows_without_a_key_are_never_duplicates(config):
    frame = event_rows(evt(source_record_id=None), evt(source_record_id=None))
    outcome = validate_batch(frame, "event", config)
    assert outcome.rows_duplicate == 0
    assert outcome.failure_counts == {"source_record_id_not_null": 2}


def test_epoch_milliseconds_in_crm_lastmodifieddate_are_read_and_garbage_is_quarantined(config):
    """HubSpot sends ISO text, but epoch milliseconds (number or digits) are read as such;
    a value that is neither becomes null and is quarantined, never a crash for the batch."""
    frame = sources.crm_contacts_to_canonical(
        [crm_record(1), crm_record(2, lastmodifieddate=1_764_331_200_000), crm_record(3, lastmodifieddate="soon")],
        RECEIVED,
    )
    assert frame["observed_at"].iloc[1] == pd.Timestamp(1_764_331_200_000, unit="ms", tz="UTC")
    outcome = validate_batch(frame, "crm_contact", config)
    assert outcome.rows_in == outcome.rows_staged + outcome.rows_quarantined + outcome.rows_duplicate
    quarantined = dict(zip(outcome.quarantine["source_record_id"], outcome.quarantine["failed_expectations"]))
    assert "observed_at_not_null" in quarantined["1003"]


def test_epoch_milliseconds_number_in_an_event_is_read_correctly(config):
    millis = int(pd.Timestamp(RECEIVED - timedelta(minutes=2)).timestamp() * 1000)
    frame = events_via(track_envelope(77, {"timestamp": millis}))
    assert frame["observed_at"].iloc[-1] == pd.Timestamp(RECEIVED - timedelta(minutes=2))
    outcome = validate_batch(frame, "event", config)
    assert outcome.rows_quarantined == 0 and outcome.rows_staged == len(frame)


def test_five_minutes_of_skew_is_allowed(config):
    frame = crm_via_source(lastmodifieddate=iso(RECEIVED + timedelta(minutes=5)))
    outcome = validate_batch(frame, "crm_contact", config)
    assert outcome.rows_quarantined == 0


def test_one_row_can_fail_several_expectations(config):
    frame = event_rows(evt(event_type="nope", anonymous_id=None, currency="eu", order_total_minor=-3))
    outcome = validate_batch(frame, "event", config)
    (failed,) = outcome.quarantine["failed_expectations"].tolist()
    assert failed == [
        "event_type_in_vocabulary",
        "has_identifier",
        "order_total_minor_non_negative_integer",
        "currency_three_upper_letters",
    ]


def test_missing_optional_values_pass(config):
    frame = crm_rows(crm(email=None, lifecycle_stage=None))
    outcome = validate_batch(frame, "crm_contact", config)
    assert outcome.rows_quarantined == 0


def test_a_record_without_any_columns_but_the_kind_does_not_raise(config):
    frame = pd.DataFrame({"record_kind": ["event", "event"]})
    outcome = validate_batch(frame, "event", config)
    assert outcome.rows_quarantined == 2 and outcome.identity_holds
    assert set(outcome.failure_counts) >= {"source_record_id_not_null", "event_type_not_null", "observed_at_not_null", "has_identifier"}


def test_canonical_columns_are_unchanged_in_staged(config):
    frame = good_events()
    outcome = validate_batch(frame, "event", config)
    pd.testing.assert_frame_equal(outcome.staged, frame)
    assert list(outcome.staged.columns) == list(canonical.CANONICAL_COLUMNS)
