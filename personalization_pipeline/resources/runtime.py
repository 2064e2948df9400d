"""Run-wide settings: the clock and the lag behind now that the pulls keep."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

import dagster as dg
from pydantic import Field

from personalization_pipeline.core.clock import SYSTEM_CLOCK, Clock, ManualClock


class RuntimeResource(dg.ConfigurableResource):
    """How far behind now the pulls stop (vendors commit late), and an optional fixed
    clock for tests and reproducible replays."""

    lag_seconds: float = Field(default=60, description="Pull windows end this far before now.")
    now_override: Optional[str] = Field(default=None, description="ISO 8601 UTC; fixes the clock.")

    def clock(self) -> Clock:
        if self.now_override:
            moment = datetime.fromisoformat(self.now_override.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return ManualClock(moment)
        return SYSTEM_CLOCK
