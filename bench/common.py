"""What every benchmark returns: figures with their target from PRODUCT.md section 10."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Figure:
    benchmark: str
    name: str
    value: float
    unit: str
    target: float | None = None
    higher_is_better: bool = True
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """> 1 means the target is met with room to spare, whichever way the target points."""
        if self.target is None or self.value == 0:
            return None
        return self.value / self.target if self.higher_is_better else self.target / self.value

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "—"
        return f"{'≥' if self.higher_is_better else '≤'} {self.target:g} {self.unit}"
