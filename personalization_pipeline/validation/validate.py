"""Validate one batch of canonical rows and split it: staged, quarantined, duplicate
(PRODUCT.md section 7). Pure logic, no Dagster import; the staging step calls
``validate_batch`` and writes the three parts.

Order of work:

1. exact re-deliveries (same ``source``, ``source_record_id``, ``observed_at``) after the
   first are set aside as duplicates and counted;
2. ``prepare_frame`` parses the times and computes the helper columns the suites read
   (time rules against ``received_at``, never the wall clock);
3. the suite runs once with a cheap result format (BOOLEAN_ONLY: which expectations
   failed, nothing else); when every expectation passed that is all (the fast path).
   Otherwise only the failed expectations run again with COMPLETE, and
   the failing rows come from ``unexpected_index_list`` over a fresh RangeIndex -- never
   from the value lists, which GX caps at 200 entries;
4. rows failing any expectation go to quarantine with the names of what they failed.

``rows_in == rows_staged + rows_quarantined + rows_duplicate`` holds for every batch (it is
asserted). One ephemeral GX context per call: a context shared between threads validates
the wrong frame.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Sequence

import numpy as np
import pandas as pd

from personalization_pipeline.core import canonical
from personalization_pipeline.core.canonical import mask_email
from personalization_pipeline.validation.suites import (
    IDENTIFIER_COUNT,
    KIND_SOURCES,
    KINDS,
    OBSERVED_EPOCH,
    ORDER_TOTAL,
    SECONDS_AFTER_RECEIVED,
    Check,
    QuarantineThresholds,
    ValidationConfig,
    build_suite,
    config_path,
    load_gx,
    suite_checks,
)

QUARANTINE_COLUMNS = (
    "source",
    "partition",
    "kind",
    "source_record_id",
    "observed_at",
    "received_at",
    "failed_expectations",
    "raw",
    "row_position",
    "row",
)
"""The quarantine table: ``raw`` is the record as JSON text, ``failed_expectations`` a list
of check names, ``row_position`` the row's position in the validated frame, ``row`` the
canonical row as JSON text (what a replay re-validates with the suites then in force)."""

SAMPLE_ROWS = 5

FIRST_PASS_FORMAT = {"result_format": "BOOLEAN_ONLY"}
"""The first pass only asks which expectations failed. BOOLEAN_ONLY answers that like
SUMMARY does, without the partial value lists: 0.10 s instead of 0.18 s for the event
suite on 10k rows (bench/bench_validation.py)."""

COMPLETE_FORMAT = {
    "result_format": "COMPLETE",
    "partial_unexpected_count": 0,
    "exclude_unexpected_values": True,
    "return_unexpected_index_query": False,
    "include_unexpected_rows": False,
}
"""The second pass, for the failed expectations only: ``unexpected_index_list`` (uncapped)
is all we read; the value lists (capped at 200) are not computed at all."""
_ERROR_SUFFIX = ":error"

_default_config: tuple[tuple[str, int], ValidationConfig] | None = None


def default_config() -> ValidationConfig:
    """The validation YAML in force (``suites.config_path``), read again when the file or
    its modification time changes, so an edited set reaches the next validation (and a
    replay) in a long-lived process too."""
    global _default_config
    path = config_path()
    stamp = (str(path), path.stat().st_mtime_ns)
    if _default_config is None or _default_config[0] != stamp:
        _default_config = (stamp, ValidationConfig.load(path))
    return _default_config[1]


@dataclass
class ValidationOutcome:
    """What one batch came to. ``staged`` and ``duplicates`` keep the input's columns and
    index; ``quarantine`` has ``QUARANTINE_COLUMNS``."""

    kind: str
    staged: pd.DataFrame
    quarantine: pd.DataFrame
    duplicates: pd.DataFrame
    rows_in: int
    rows_staged: int
    rows_quarantined: int
    rows_duplicate: int
    failure_counts: dict[str, int]
    samples: list[dict[str, Any]]
    passed_threshold: bool
    quarantine_rate: float
    unknown_fields: dict[str, int] = field(default_factory=dict)
    complete_run: bool = False
    seconds: float = 0.0

    def with_unparseable(self, count: int, thresholds: QuarantineThresholds | None = None) -> "ValidationOutcome":
        """This outcome with ``count`` records that could not even be parsed into rows (a
        Kafka message that is not JSON) counted in: they are refused rows of the batch, in
        rows_in and rows_quarantined (as ``unparseable``) and in the quarantine verdict, so
        rows_in covers every record the batch read."""
        if count <= 0:
            return self
        thresholds = thresholds or default_config().thresholds
        rows_q = self.rows_quarantined + count
        validated = self.rows_in + count - self.rows_duplicate
        return replace(
            self,
            rows_in=self.rows_in + count,
            rows_quarantined=rows_q,
            failure_counts={**self.failure_counts, "unparseable": self.failure_counts.get("unparseable", 0) + count},
            passed_threshold=thresholds.passed(validated, rows_q),
            quarantine_rate=rows_q / validated if validated else 0.0,
        )

    @property
    def identity_holds(self) -> bool:
        return self.rows_in == self.rows_staged + self.rows_quarantined + self.rows_duplicate

    def metadata(self) -> dict[str, Any]:
        """Plain values for Dagster metadata (numbers, so the UI plots them)."""
        return {
            "rows_in": self.rows_in,
            "rows_staged": self.rows_staged,
            "rows_quarantined": self.rows_quarantined,
            "rows_duplicate": self.rows_duplicate,
            "quarantine_rate": round(self.quarantine_rate, 6),
            "passed_threshold": self.passed_threshold,
            "failed_expectations": dict(self.failure_counts),
            "sample_rows": list(self.samples),
            "unknown_fields": dict(self.unknown_fields),
            "validation_seconds": round(self.seconds, 4),
        }


def _as_utc(series: pd.Series) -> pd.Series:
    """Any column of times -> datetime64 UTC; what is not ISO 8601 text or a datetime
    (epoch numbers included: the sources promise ISO) becomes NaT, never an error."""
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        return series.dt.tz_convert("UTC")
    if pd.api.types.is_datetime64_dtype(series.dtype):
        return series.dt.tz_localize("UTC")

    def text(value: Any) -> Any:
        if value is None or value is pd.NaT or (isinstance(value, float) and value != value):
            return None
        if isinstance(value, datetime):
            stamp = pd.Timestamp(value)
            return (stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp).isoformat()
        if isinstance(value, str):
            return value
        return f"not-a-time:{type(value).__name__}"

    texts = series.astype(object).map(text)
    try:
        parsed = pd.to_datetime(texts, utc=True, format="ISO8601", errors="coerce")
    except (ValueError, OverflowError, TypeError):  # pragma: no cover - defence in depth
        parsed = pd.Series(pd.NaT, index=series.index, dtype="datetime64[us, UTC]")
    return parsed


def _as_text(series: pd.Series) -> pd.Series:
    """Non-text values in a text column (a number where an id or an email belongs) -> text,
    so GX's string expectations judge them instead of raising."""
    kind = pd.api.types.infer_dtype(series, skipna=True)
    if kind in ("string", "empty"):
        return series
    return series.astype(object).map(lambda v: v if v is None or isinstance(v, str) else str(v)).where(
        series.notna(), None
    )


def _usable_identifiers(frame: pd.DataFrame) -> pd.Series:
    count = np.zeros(len(frame), dtype=np.int64)
    for column in canonical.IDENTIFIER_TYPES:
        if column not in frame:
            continue
        col = frame[column]
        present = col.notna().to_numpy()
        if not present.any():
            continue
        text = col.astype("string").str.strip().str.lower()
        blocked = text.isin(canonical.BLOCKED_VALUES) | text.str.fullmatch(r"[0-]*").fillna(True)
        count += present & ~blocked.fillna(True).to_numpy(dtype=bool)
    return pd.Series(count, index=frame.index)


def prepare_frame(frame: pd.DataFrame, kind: str, config: ValidationConfig) -> pd.DataFrame:
    """The columns the suite for ``kind`` reads, over a fresh RangeIndex, with the times
    parsed and the helper columns computed. Never raises on odd values."""
    checks = suite_checks(kind, config)
    columns = {check.column for check in checks} | {"observed_at", "received_at", "source", "source_record_id"}
    base = frame.reset_index(drop=True)
    out = pd.DataFrame(index=base.index)
    null = pd.Series(None, index=base.index, dtype=object)
    for column in sorted(columns):
        if column in base:
            out[column] = base[column]
        elif column in canonical.CANONICAL_COLUMNS:
            out[column] = null
    observed = _as_utc(out["observed_at"])
    received = _as_utc(out["received_at"])
    out["observed_at"] = observed
    out["received_at"] = received
    out[OBSERVED_EPOCH] = (observed - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    seconds = (observed - received).dt.total_seconds()
    out[SECONDS_AFTER_RECEIVED] = seconds.mask(observed.notna() & received.isna(), np.inf)
    for column in ("source_record_id", "email", "event_type", "lifecycle_stage", "email_consent", "currency", "source"):
        if column in out:
            out[column] = _as_text(out[column])
    for column in ("source_record_id", "email", "event_type", "email_consent"):
        # Blank is missing: "" or "   " must fail the not-null rule, not pass it.
        if column in out and out[column].notna().any():
            text = out[column]
            blank = text.astype("string").str.strip().eq("").fillna(False).to_numpy(dtype=bool)
            if blank.any():
                out[column] = text.astype(object).mask(blank, None)
    if kind == "event":
        out[IDENTIFIER_COUNT] = _usable_identifiers(base)
        given = base["order_total_minor"] if "order_total_minor" in base else pd.Series(None, index=base.index)
        if pd.api.types.is_integer_dtype(given.dtype):
            numeric = given.astype("float64")
        else:
            as_object = given.astype(object)
            no_bools = as_object.where(~as_object.map(lambda v: isinstance(v, bool)), "not-a-number")
            numeric = pd.to_numeric(no_bools, errors="coerce").astype("float64")
            wrong = given.notna() & (numeric.isna() | (numeric % 1 != 0) | np.isinf(numeric))
            numeric = numeric.mask(wrong, -1.0)
        out[ORDER_TOTAL] = numeric
    return out


def _duplicate_mask(prepared: pd.DataFrame) -> np.ndarray:
    """Exact re-deliveries after the first; rows missing a key part are never duplicates
    (they are quarantined for the missing part instead)."""
    keys = prepared[list(canonical.RECORD_KEY)]
    complete = keys.notna().all(axis=1).to_numpy()
    if not complete.any():
        return np.zeros(len(prepared), dtype=bool)
    dup = keys.duplicated(keep="first").to_numpy()
    return dup & complete


def _gx_batch(gx_frame: pd.DataFrame, kind: str) -> Any:
    """A GX batch over ``gx_frame`` in its own ephemeral context (one per validation: a
    context shared between threads validates the wrong frame)."""
    gx = load_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: PLC0415

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("staging").add_dataframe_asset(f"{kind}_batch")
    return asset.add_batch_definition_whole_dataframe("whole_batch").get_batch(
        batch_parameters={"dataframe": gx_frame}
    )


def _run(batch: Any, kind: str, config: ValidationConfig, checks: list[Check], result_format: dict) -> dict[str, Any]:
    """One run of ``checks``; returns ``{check name: expectation result}``. The result
    format goes to the run, not to the expectations (where GX ignores it). Batch.validate
    skips storing a suite and a validation definition in the context, ~50 ms per batch
    that buys nothing for a context thrown away afterwards."""
    result = batch.validate(build_suite(kind, config, checks), result_format=result_format)
    return {item.expectation_config.meta["check"]: item for item in result.results}


def _raised(item: Any) -> str | None:
    info = getattr(item, "exception_info", None) or {}
    if isinstance(info, dict) and info.get("raised_exception"):
        return str(info.get("exception_message") or "error")
    return None


def _failing_rows(gx_frame: pd.DataFrame, kind: str, config: ValidationConfig) -> tuple[dict[str, np.ndarray], bool]:
    """``{check name: positions in gx_frame that failed it}`` and whether COMPLETE ran."""
    checks = suite_checks(kind, config)
    batch = _gx_batch(gx_frame, kind)
    first = _run(batch, kind, config, checks, FIRST_PASS_FORMAT)
    failed = [check for check in checks if not first[check.name].success]
    if not failed:
        return {}, False  # the fast path: everything passed, no COMPLETE run
    complete = _run(batch, kind, config, failed, COMPLETE_FORMAT)
    out: dict[str, np.ndarray] = {}
    everything = np.arange(len(gx_frame))
    for check in failed:
        item = complete[check.name]
        error = _raised(item)
        indexes = (item.result or {}).get("unexpected_index_list") if error is None else None
        if indexes is None:
            # GX could not judge the rows: hold them all back rather than let them through.
            out[f"{check.name}{_ERROR_SUFFIX}"] = everything
            continue
        if indexes and isinstance(indexes[0], dict):
            indexes = [entry.get("index") for entry in indexes]
        out[check.name] = np.asarray(sorted(set(int(i) for i in indexes)), dtype=np.int64)
    return out, True


def _raw_json(frame: pd.DataFrame, positions: np.ndarray, raw: Sequence[Any] | None) -> list[str]:
    if raw is not None:
        return [json.dumps(raw[int(p)], default=str, ensure_ascii=False) for p in positions]
    if len(positions) == 0:
        return []
    text = frame.iloc[positions].to_json(
        orient="records", lines=True, date_format="iso", date_unit="us", default_handler=str, force_ascii=False
    )
    # JSON escapes newlines inside strings, so "\n" splits records and nothing else.
    return text.rstrip("\n").split("\n")


def validate_batch(
    frame: pd.DataFrame,
    kind: str,
    config: ValidationConfig | None = None,
    *,
    raw: Sequence[Any] | None = None,
    partition: str | None = None,
) -> ValidationOutcome:
    """Validate one batch of canonical rows of ``kind`` (``crm_contact``, ``esp_member``
    or ``event``) and split it into staged, quarantined and duplicate rows.

    ``raw``, when given, holds each row's raw record (e.g. its landing envelope), aligned
    with the rows of ``frame``; it becomes the quarantine's ``raw`` JSON text. Otherwise the
    row itself is written there. ``partition`` is copied into the quarantine rows.
    """
    started = time.perf_counter()
    if kind not in KINDS:
        raise ValueError(f"unknown validation kind {kind!r}; expected one of {KINDS}")
    config = config or default_config()
    if raw is not None and len(raw) != len(frame):
        raise ValueError(f"raw has {len(raw)} records for {len(frame)} rows")
    rows_in = len(frame)
    prepared = prepare_frame(frame, kind, config)
    duplicate = _duplicate_mask(prepared)
    candidates = np.flatnonzero(~duplicate)

    failures_by_check: dict[str, np.ndarray] = {}
    complete_run = False
    if len(candidates):
        columns = list(dict.fromkeys(check.column for check in suite_checks(kind, config)))
        gx_frame = prepared.iloc[candidates][columns].reset_index(drop=True)
        local, complete_run = _failing_rows(gx_frame, kind, config)
        failures_by_check = {name: candidates[rows] for name, rows in local.items()}

    failed_mask = np.zeros(rows_in, dtype=bool)
    for positions in failures_by_check.values():
        failed_mask[positions] = True
    quarantined_positions = np.flatnonzero(failed_mask)
    staged_positions = np.flatnonzero(~failed_mask & ~duplicate)

    reasons: dict[int, list[str]] = {int(p): [] for p in quarantined_positions}
    for name, positions in failures_by_check.items():
        for p in positions.tolist():
            reasons[p].append(name)

    q_source = prepared["source"].iloc[quarantined_positions].to_numpy() if rows_in else []
    quarantine = pd.DataFrame(
        {
            "source": pd.Series(q_source, dtype=object),
            "partition": pd.Series([partition] * len(quarantined_positions), dtype=object),
            "kind": kind,
            "source_record_id": pd.Series(
                prepared["source_record_id"].iloc[quarantined_positions].to_numpy(), dtype=object
            ),
            "observed_at": prepared["observed_at"].iloc[quarantined_positions].reset_index(drop=True),
            "received_at": prepared["received_at"].iloc[quarantined_positions].reset_index(drop=True),
            "failed_expectations": pd.Series([reasons[int(p)] for p in quarantined_positions], dtype=object),
            "raw": pd.Series(_raw_json(frame, quarantined_positions, raw), dtype=object),
            "row_position": pd.Series(quarantined_positions, dtype="int64"),
            "row": pd.Series(
                _raw_json(frame[[c for c in frame.columns if c in canonical.CANONICAL_COLUMNS]], quarantined_positions, None),
                dtype=object,
            ),
        },
        columns=list(QUARANTINE_COLUMNS),
    )

    outcome_rows_q = len(quarantined_positions)
    rows_duplicate = int(duplicate.sum())
    rows_validated = rows_in - rows_duplicate
    assert rows_in == len(staged_positions) + outcome_rows_q + rows_duplicate, "accounting identity broken"

    samples = []
    email = frame["email"].reset_index(drop=True) if "email" in frame else None
    first = frame["first_name"].reset_index(drop=True) if "first_name" in frame else None
    last = frame["last_name"].reset_index(drop=True) if "last_name" in frame else None
    for p in quarantined_positions[:SAMPLE_ROWS].tolist():
        observed = prepared["observed_at"].iloc[p]
        received = prepared["received_at"].iloc[p]
        record_id = prepared["source_record_id"].iloc[p]
        samples.append(
            {
                "row_position": p,
                "source": None if pd.isna(prepared["source"].iloc[p]) else str(prepared["source"].iloc[p]),
                "source_record_id": mask_identifier(record_id),
                "email": mask_email(email.iloc[p]) if email is not None else None,
                "name": name_initials(
                    first.iloc[p] if first is not None else None, last.iloc[p] if last is not None else None
                ),
                "observed_at": None if pd.isna(observed) else observed.isoformat(),
                "received_at": None if pd.isna(received) else received.isoformat(),
                "failed_expectations": reasons[p],
            }
        )

    unknown = {
        str(column): int(frame[column].notna().sum())
        for column in frame.columns
        if column not in canonical.CANONICAL_COLUMNS
    }
    rate = outcome_rows_q / rows_validated if rows_validated else 0.0
    return ValidationOutcome(
        kind=kind,
        staged=frame.iloc[staged_positions],
        quarantine=quarantine,
        duplicates=frame.iloc[np.flatnonzero(duplicate)],
        rows_in=rows_in,
        rows_staged=len(staged_positions),
        rows_quarantined=outcome_rows_q,
        rows_duplicate=rows_duplicate,
        failure_counts={name: int(len(positions)) for name, positions in failures_by_check.items()},
        samples=samples,
        passed_threshold=config.thresholds.passed(rows_validated, outcome_rows_q),
        quarantine_rate=rate,
        unknown_fields=unknown,
        complete_run=complete_run,
        seconds=time.perf_counter() - started,
    )


def _present(value: Any) -> bool:
    return not (value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and value != value))


def name_initials(first: Any, last: Any = None) -> str | None:
    """``Jane``, ``van Dyke`` -> ``J. v.``: names reach Dagster metadata as initials only
    (PRODUCT.md section 11). Missing or blank -> None."""
    parts = [str(v).strip() for v in (first, last) if _present(v) and str(v).strip()]
    return " ".join(f"{p[0]}." for p in parts) or None


def mask_identifier(value: Any) -> str | None:
    """A record id for metadata: an id that is an email address (some sources key people by
    address) is masked like one; anything else is cut to 80 characters."""
    if not _present(value):
        return None
    text = str(value)
    return mask_email(text) if "@" in text else text[:80]


def kind_for_source(source: str, record_kind: str) -> str:
    """The suite for a canonical row's (source, record_kind): contact -> crm_contact,
    member -> esp_member, event -> event."""
    if record_kind == "contact":
        return "crm_contact"
    if record_kind == "member":
        return "esp_member"
    if record_kind == "event" and source in KIND_SOURCES["event"]:
        return "event"
    raise ValueError(f"no suite for source {source!r} record_kind {record_kind!r}")
