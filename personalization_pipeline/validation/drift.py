"""The row-count drift rule: does a batch's ``rows_in`` stray far from the median of its
source's recent batches? Pure logic, no Dagster import; the ``row_count_drift`` check
(assets/checks.py) gathers the history and calls ``judge_row_count``.

How quiet hours are handled (a shop at night, a CRM on a Sunday):

- zero-row batches are part of the history, so a source that is often quiet has a low
  median and its quiet batches are no surprise;
- counts below ``min_rows`` are raised to ``min_rows`` before the ratio is taken, on both
  sides: 0 against a median of 3 is not "infinitely" less, and a quiet source that wakes
  up with a few dozen rows is not a spike. A busy source that goes silent (median 500,
  batch 0) still warns: that is what the check is for;
- a batch whose window is still open (the hour in progress, which the pull schedule
  re-pulls every few minutes) is judged only for being too large: it can still grow.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class DriftSettings:
    """``row_count_drift`` in ``config/validation.yaml``."""

    window: int = 24
    """How many recent batches make the median."""
    factor: float = 5.0
    """Warn when a batch is more than ``factor`` times the median, or less than 1/``factor`` of it."""
    min_history: int = 6
    """No verdict before this many earlier batches exist (a new source has no normal yet)."""
    min_rows: int = 50
    """Counts below this are treated as this many (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.window < 1 or self.min_history < 1 or self.min_history > self.window:
            raise ValueError(f"row_count_drift needs 1 <= min_history <= window, got {self.min_history}, {self.window}")
        if self.factor <= 1:
            raise ValueError(f"row_count_drift factor must be above 1, got {self.factor}")
        if self.min_rows < 1:
            raise ValueError(f"row_count_drift min_rows must be at least 1, got {self.min_rows}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, base: "DriftSettings | None" = None) -> "DriftSettings":
        base = base or cls()
        data = data or {}
        return cls(
            window=int(data.get("window", base.window)),
            factor=float(data.get("factor", base.factor)),
            min_history=int(data.get("min_history", base.min_history)),
            min_rows=int(data.get("min_rows", base.min_rows)),
        )


@dataclass(frozen=True)
class DriftVerdict:
    judged: bool
    drifted: bool
    rows_in: int
    history_size: int
    median: float | None
    expected: float | None
    ratio: float | None
    reason: str

    def metadata(self) -> dict[str, Any]:
        """Plain values for the check's metadata."""
        out: dict[str, Any] = {
            "rows_in": self.rows_in,
            "history_batches": self.history_size,
            "judged": self.judged,
            "reason": self.reason,
        }
        if self.median is not None:
            out["history_median"] = float(self.median)
            out["expected_rows"] = round(float(self.expected or 0.0), 2)
            out["ratio"] = round(float(self.ratio or 0.0), 4)
        return out


def judge_row_count(
    rows_in: int,
    history: Sequence[int | float],
    settings: DriftSettings,
    *,
    span: float = 1.0,
    window_open: bool = False,
) -> DriftVerdict:
    """Judge one batch of ``rows_in`` rows against ``history`` (earlier batches' rows_in,
    oldest first; only the last ``settings.window`` count).

    ``span`` is how many history units the batch covers (a backfill chunk of 24 hourly
    partitions against hourly history: 24). ``window_open``: the batch can still grow, so
    only "too many" is judged.
    """
    rows_in = int(rows_in)
    recent = [float(v) for v in list(history)[-settings.window:] if v is not None and v == v and v >= 0]
    if len(recent) < settings.min_history:
        return DriftVerdict(
            judged=False, drifted=False, rows_in=rows_in, history_size=len(recent), median=None, expected=None,
            ratio=None, reason=f"not judged: {len(recent)} earlier batches, {settings.min_history} needed",
        )
    median = float(statistics.median(recent))
    expected = median * max(span, 0.0)
    floor = float(settings.min_rows)
    ratio = max(rows_in, floor) / max(expected, floor)
    too_many = ratio > settings.factor
    too_few = not window_open and ratio < 1.0 / settings.factor
    if too_many:
        reason = f"{rows_in} rows is {ratio:.1f}x the expected {expected:g} (median of {len(recent)} batches)"
    elif too_few:
        reason = f"{rows_in} rows is {ratio:.2f}x the expected {expected:g} (median of {len(recent)} batches)"
    else:
        reason = f"within {settings.factor:g}x of the expected {expected:g}" + (" (window still open)" if window_open else "")
    return DriftVerdict(
        judged=True, drifted=too_many or too_few, rows_in=rows_in, history_size=len(recent), median=median,
        expected=expected, ratio=ratio, reason=reason,
    )
