"""Great Expectations validation of staged batches: the suites (``suites``) and the split
into staged, quarantined and duplicate rows (``validate``). No Dagster import here."""

from personalization_pipeline.validation.suites import KINDS, QuarantineThresholds, ValidationConfig
from personalization_pipeline.validation.validate import (
    QUARANTINE_COLUMNS,
    ValidationOutcome,
    kind_for_source,
    mask_email,
    validate_batch,
)

__all__ = [
    "KINDS",
    "QUARANTINE_COLUMNS",
    "QuarantineThresholds",
    "ValidationConfig",
    "ValidationOutcome",
    "kind_for_source",
    "mask_email",
    "validate_batch",
]
