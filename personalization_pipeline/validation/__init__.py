"""Great Expectations validation of staged batches: the suites (``suites``) and the split
into staged, quarantined and duplicate rows (``validate``). No Dagster import here."""

from personalization_pipeline.validation.drift import DriftSettings, DriftVerdict, judge_row_count
from personalization_pipeline.validation.suites import KINDS, QuarantineThresholds, ValidationConfig
from personalization_pipeline.validation.validate import (
    QUARANTINE_COLUMNS,
    ValidationOutcome,
    default_config,
    kind_for_source,
    mask_email,
    mask_identifier,
    name_initials,
    validate_batch,
)

__all__ = [
    "DriftSettings",
    "DriftVerdict",
    "KINDS",
    "QUARANTINE_COLUMNS",
    "QuarantineThresholds",
    "ValidationConfig",
    "ValidationOutcome",
    "default_config",
    "judge_row_count",
    "kind_for_source",
    "mask_email",
    "mask_identifier",
    "name_initials",
    "validate_batch",
]
