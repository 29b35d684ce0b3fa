"""When a failed run is tried again: exponential backoff, capped, up to ``max_attempts``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0

    def delay_s(self, attempt: int) -> float:
        """Backoff before attempt ``attempt + 1``, after attempt ``attempt`` (1-based) failed."""
        # Cap the exponent first: 2.0 ** 10_000 overflows a float.
        return float(min(self.max_delay_s, self.base_delay_s * 2 ** min(max(0, attempt - 1), 60)))

    def next_attempt_at(self, attempt: int, now: datetime) -> datetime | None:
        """When to try again after attempt ``attempt`` failed, or None when it was the last one."""
        if attempt >= self.max_attempts:
            return None
        return now + timedelta(seconds=self.delay_s(attempt))
