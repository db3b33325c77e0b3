"""The training clock: a time budget kept by sizing each piece of work to the time left.

Work is done in micro-batches of rows. The clock learns each kind of work's cost per row
from the pieces already done (a conservative running estimate) and answers how many rows
the next piece may take: as many as wanted if they fit in the time left (with a safety
factor and a reserve for what must still happen after them), fewer if not, none when even
one row would overrun. Pieces are also kept to ``GRAIN`` of the budget, so the clock is
looked at often enough for an estimate that turns out wrong to cost little.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

SAFETY = 1.3     # predicted cost x this must fit: step times vary on a shared machine
GRAIN = 0.05     # a piece of work takes at most this share of the budget


@dataclass
class Clock:
    """Seconds of training (callback time excluded) against an optional ``budget``.

    Args:
        budget: seconds, or ``None`` for no limit.
        offset: seconds already spent by the run being resumed.
    """

    budget: float | None = None
    offset: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    paused: float = 0.0
    per_row: dict[str, float] = field(default_factory=dict)   # kind -> seconds per row
    fixed: dict[str, float] = field(default_factory=dict)     # kind -> seconds per event

    def elapsed(self) -> float:
        """Seconds so far (plus ``offset``, minus paused time)."""
        return self.offset + time.perf_counter() - self.start - self.paused

    def left(self) -> float:
        """Seconds left of the budget (infinite without one; negative once over)."""
        return float("inf") if self.budget is None else self.budget - self.elapsed()

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` (a callback's time) out of the clock."""
        self.paused += seconds

    def record(self, kind: str, seconds: float, rows: int = 0) -> None:
        """Learn from one piece of work: per row when ``rows`` > 0, else per event.

        The estimate moves halfway to each new measurement but never below it, so one fast
        piece does not talk the clock into a piece it cannot afford.
        """
        table, value = (self.per_row, seconds / rows) if rows else (self.fixed, seconds)
        old = table.get(kind)
        table[kind] = value if old is None else max(value, 0.5 * (old + value))

    def rows_that_fit(self, kind: str, wanted: int, reserve: float = 0.0,
                      prior: float | None = None) -> int:
        """How many of ``wanted`` rows of ``kind`` the next piece may take (0: none fits).

        Args:
            kind: the kind of work, whose cost per row was :meth:`record`-ed.
            wanted: rows the caller would like to do.
            reserve: seconds that must stay free for what follows (a solve, a save).
            prior: seconds per row to assume before any measurement; without one, an
                unmeasured kind gets a one-row probe.
        """
        if self.budget is None or wanted <= 0:
            return max(wanted, 0)
        cost = self.per_row.get(kind, prior)
        if cost is None:
            return 1 if self.left() - reserve > 0 else 0
        by_time = int((self.left() - reserve) / (cost * SAFETY))
        by_grain = max(1, int(GRAIN * self.budget / cost))
        return max(0, min(wanted, by_time, by_grain))

    def fits(self, seconds: float, reserve: float = 0.0) -> bool:
        """Whether ``seconds`` of work (safety factor applied) fits in the time left."""
        return seconds * SAFETY + reserve <= self.left()
