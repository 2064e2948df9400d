"""The Great Expectations suites, one per source kind, defined here and nowhere else
(PRODUCT.md section 7).

A suite is a list of ``Check``: a stable name (what the quarantine table and the check
metadata show), the GX expectation class and its arguments. The configurable sets and
limits come from ``config/validation.yaml``. Suites are built fresh for each validation
because GX binds expectation objects to the suite (and the context) that holds them.

The time rules and "at least one identifier" run on helper columns that
``validate.prepare_frame`` computes before GX, so they compare with ``received_at`` and
never with the wall clock:

- ``_observed_epoch_s``: ``observed_at`` in Unix seconds (null when missing/unparseable);
- ``_seconds_after_received``: ``observed_at - received_at`` in seconds;
- ``_identifier_count``: how many of crm_id/customer_id/email/anonymous_id carry a usable
  (non-blocked) value;
- ``_order_total_minor``: ``order_total_minor`` as a float, -1 where it was given but is
  not an integer (a wrong type), so a total of "abc" is quarantined instead of read as
  null;
- ``_seconds_after_received`` is +inf where ``observed_at`` is present but ``received_at``
  is not, so such a row fails the skew rule.

GX value expectations (regex, between, in set) skip nulls, so each required column also
has a not-null expectation. GX itself is imported lazily, once per process
(``load_gx``): the import costs 3-4 s.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import yaml

from personalization_pipeline.validation.drift import DriftSettings

CONFIG_FILE = Path(__file__).resolve().parent.parent / "config" / "validation.yaml"
CONFIG_ENV = "PP_VALIDATION_CONFIG"
"""An absolute path to another validation YAML (same shape as config/validation.yaml):
the suites of the next validation in every process use it."""

KINDS = ("crm_contact", "esp_member", "event")
"""The suites: CRM contacts, ESP members, events (stream and ESP engagement alike)."""

KIND_SOURCES = {"crm_contact": ("crm",), "esp_member": ("esp",), "event": ("shop", "web", "esp")}
KIND_RECORD_KIND = {"crm_contact": "contact", "esp_member": "member", "event": "event"}

OBSERVED_EPOCH = "_observed_epoch_s"
SECONDS_AFTER_RECEIVED = "_seconds_after_received"
IDENTIFIER_COUNT = "_identifier_count"
ORDER_TOTAL = "_order_total_minor"
HELPER_COLUMNS = (OBSERVED_EPOCH, SECONDS_AFTER_RECEIVED, IDENTIFIER_COUNT, ORDER_TOTAL)


@dataclass(frozen=True)
class QuarantineThresholds:
    max_quarantine_rate: float = 0.05
    min_rows_for_rate: int = 200
    max_quarantine_count: int = 10

    def passed(self, rows_validated: int, rows_quarantined: int) -> bool:
        """The blocking verdict: True when the batch may go on to profiles and the push."""
        if rows_validated >= self.min_rows_for_rate:
            return rows_quarantined <= self.max_quarantine_rate * rows_validated
        return rows_quarantined <= self.max_quarantine_count


@dataclass(frozen=True)
class ValidationConfig:
    """``config/validation.yaml`` as read: the sets, limits and quarantine thresholds."""

    lifecycle_stages: tuple[str, ...]
    esp_statuses: tuple[str, ...]
    event_types: tuple[str, ...]
    max_future_skew_seconds: float = 300.0
    earliest_observed_at: pd.Timestamp = field(default_factory=lambda: pd.Timestamp("2000-01-01", tz="UTC"))
    email_regex: str = r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,63}\Z"
    max_email_length: int = 254
    max_id_length: int = 255
    currency_regex: str = r"^[A-Z]{3}\Z"
    thresholds: QuarantineThresholds = QuarantineThresholds()
    drift: DriftSettings = DriftSettings()
    drift_by_asset: Mapping[str, DriftSettings] = field(default_factory=dict)

    def drift_for(self, asset: str) -> DriftSettings:
        """The row_count_drift settings of one asset (its override, else the default)."""
        return self.drift_by_asset.get(asset, self.drift)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "ValidationConfig":
        earliest = pd.Timestamp(data.get("earliest_observed_at", "2000-01-01"))
        earliest = earliest.tz_localize("UTC") if earliest.tzinfo is None else earliest.tz_convert("UTC")
        quarantine = data.get("quarantine") or {}
        defaults = QuarantineThresholds()
        drift_data = dict(data.get("row_count_drift") or {})
        per_asset = drift_data.pop("assets", None) or {}
        drift = DriftSettings.from_mapping(drift_data)
        return cls(
            lifecycle_stages=tuple(str(v) for v in data["lifecycle_stages"]),
            esp_statuses=tuple(str(v) for v in data["esp_statuses"]),
            event_types=tuple(str(v) for v in data["event_types"]),
            max_future_skew_seconds=float(data.get("max_future_skew_seconds", 300)),
            earliest_observed_at=earliest,
            email_regex=str(data.get("email_regex", cls.email_regex)),
            max_email_length=int(data.get("max_email_length", 254)),
            max_id_length=int(data.get("max_id_length", 255)),
            currency_regex=str(data.get("currency_regex", cls.currency_regex)),
            thresholds=QuarantineThresholds(
                max_quarantine_rate=float(quarantine.get("max_quarantine_rate", defaults.max_quarantine_rate)),
                min_rows_for_rate=int(quarantine.get("min_rows_for_rate", defaults.min_rows_for_rate)),
                max_quarantine_count=int(quarantine.get("max_quarantine_count", defaults.max_quarantine_count)),
            ),
            drift=drift,
            drift_by_asset={str(k): DriftSettings.from_mapping(v, drift) for k, v in per_asset.items()},
        )

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ValidationConfig":
        """Read ``path``, else the file named by ``$PP_VALIDATION_CONFIG``, else
        ``config/validation.yaml``."""
        with open(path or config_path(), encoding="utf-8") as handle:
            return cls.from_mapping(yaml.safe_load(handle) or {})


def config_path() -> Path:
    """The validation YAML in force: ``$PP_VALIDATION_CONFIG`` when set, else the packaged one."""
    override = os.environ.get(CONFIG_ENV, "").strip()
    return Path(override) if override else CONFIG_FILE


@dataclass(frozen=True)
class Check:
    """One expectation of a suite: ``name`` is what quarantine rows and metadata show."""

    name: str
    expectation: str  # class name in great_expectations.expectations
    kwargs: Mapping[str, Any]
    description: str = ""

    @property
    def column(self) -> str:
        return str(self.kwargs["column"])


def _not_null(column: str, what: str) -> Check:
    return Check(f"{column}_not_null", "ExpectColumnValuesToNotBeNull", {"column": column}, f"{what} is present")


def _time_checks(config: ValidationConfig, *, earliest: bool = True) -> list[Check]:
    # A missing received_at makes _seconds_after_received +inf (prepare_frame), so the row
    # fails the skew rule instead of slipping past it: one expectation fewer per suite.
    checks = [
        _not_null("observed_at", "observed_at is present and parseable"),
        Check(
            "observed_at_not_after_received_at",
            "ExpectColumnValuesToBeBetween",
            {"column": SECONDS_AFTER_RECEIVED, "max_value": config.max_future_skew_seconds},
            f"observed_at is at most {config.max_future_skew_seconds:g} s after received_at "
            "(a row without received_at fails this too)",
        ),
    ]
    if earliest:
        checks.append(
            Check(
                "observed_at_not_before_earliest",
                "ExpectColumnValuesToBeBetween",
                {"column": OBSERVED_EPOCH, "min_value": config.earliest_observed_at.timestamp()},
                f"observed_at is not before {config.earliest_observed_at:%Y-%m-%d}",
            )
        )
    return checks


def _email_checks(config: ValidationConfig) -> list[Check]:
    return [
        Check(
            "email_well_formed",
            "ExpectColumnValuesToMatchRegex",
            {"column": "email", "regex": config.email_regex},
            "email is a well-formed ASCII address when present",
        ),
        Check(
            "email_length",
            "ExpectColumnValueLengthsToBeBetween",
            {"column": "email", "max_value": config.max_email_length},
            f"email is at most {config.max_email_length} characters",
        ),
    ]


def _id_checks(config: ValidationConfig, what: str) -> list[Check]:
    return [
        _not_null("source_record_id", what),
        Check(
            "source_record_id_length",
            "ExpectColumnValueLengthsToBeBetween",
            {"column": "source_record_id", "max_value": config.max_id_length},
            f"source_record_id is at most {config.max_id_length} characters",
        ),
    ]


def suite_checks(kind: str, config: ValidationConfig) -> list[Check]:
    """The checks of one suite (``kind`` in ``KINDS``)."""
    if kind == "crm_contact":
        return [
            *_id_checks(config, "the contact id is present"),
            Check(
                "source_record_id_unique",
                "ExpectColumnValuesToBeUnique",
                {"column": "source_record_id"},
                "the contact id is unique in the batch",
            ),
            *_email_checks(config),
            *_time_checks(config),
            Check(
                "lifecycle_stage_in_set",
                "ExpectColumnValuesToBeInSet",
                {"column": "lifecycle_stage", "value_set": list(config.lifecycle_stages)},
                "lifecycle stage is one of the configured stages when present",
            ),
        ]
    if kind == "esp_member":
        return [
            *_id_checks(config, "the member id is present"),
            _not_null("email", "email is present"),
            *_email_checks(config),
            _not_null("email_consent", "member status is present"),
            Check(
                "email_consent_in_set",
                "ExpectColumnValuesToBeInSet",
                {"column": "email_consent", "value_set": list(config.esp_statuses)},
                "member status is a known Mailchimp status",
            ),
            *_time_checks(config),
        ]
    if kind == "event":
        return [
            # No id-length rule here: every expectation costs GX ~15-25 ms per batch and the
            # event path is the micro-batch path; a delivery id is ours or the SDK's.
            _not_null("source_record_id", "the event id is present"),
            _not_null("event_type", "event type is present"),
            Check(
                "event_type_in_vocabulary",
                "ExpectColumnValuesToBeInSet",
                {"column": "event_type", "value_set": list(config.event_types)},
                "event type is in the vocabulary",
            ),
            *_time_checks(config),
            Check(
                "has_identifier",
                "ExpectColumnValuesToBeBetween",
                {"column": IDENTIFIER_COUNT, "min_value": 1},
                "at least one usable identifier among crm_id, customer_id, email, anonymous_id",
            ),
            Check(
                "order_total_minor_non_negative_integer",
                "ExpectColumnValuesToBeBetween",
                {"column": ORDER_TOTAL, "min_value": 0},
                "order total is a non-negative integer amount of minor units when present "
                "(a value of the wrong type counts as -1)",
            ),
            Check(
                "currency_three_upper_letters",
                "ExpectColumnValuesToMatchRegex",
                {"column": "currency", "regex": config.currency_regex},
                "currency is three upper-case letters when present",
            ),
        ]
    raise ValueError(f"unknown validation kind {kind!r}; expected one of {KINDS}")


def suite_columns(kind: str, config: ValidationConfig) -> list[str]:
    """The columns a suite reads: only these are handed to GX (it fingerprints the frame)."""
    return list(dict.fromkeys(check.column for check in suite_checks(kind, config)))


_GX_LOCK = threading.Lock()
_GX: dict[str, Any] = {}


def load_gx() -> Any:
    """``great_expectations``, imported once per process (the import costs 3-4 s)."""
    module = _GX.get("gx")
    if module is None:
        with _GX_LOCK:
            module = _GX.get("gx")
            if module is None:
                import great_expectations  # noqa: PLC0415 - deliberately lazy
                import great_expectations.expectations  # noqa: F401,PLC0415

                _GX["gx"] = module = great_expectations
    return module


def build_suite(kind: str, config: ValidationConfig, checks: list[Check] | None = None) -> Any:
    """A fresh ``gx.ExpectationSuite`` for ``kind`` (or just ``checks``). Each expectation
    carries its check name in ``meta["check"]``, so results map back to names."""
    gx = load_gx()
    chosen = suite_checks(kind, config) if checks is None else checks
    expectations = [
        getattr(gx.expectations, check.expectation)(**dict(check.kwargs), meta={"check": check.name})
        for check in chosen
    ]
    return gx.ExpectationSuite(name=f"{kind}_suite", expectations=expectations)
