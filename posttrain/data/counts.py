"""`FilterCounts`: what a filter kept and dropped, by reason. Filters never drop silently."""

from __future__ import annotations

from collections import Counter


class FilterCounts:
    """Counts of what a filter kept and dropped, by reason: filters never drop silently.

    >>> fc = FilterCounts("rm pairs"); fc.keep(); fc.drop("slightly_better", 2)
    >>> fc.summary()
    {'name': 'rm pairs', 'total': 3, 'kept': 1, 'dropped': 2, 'dropped_by_reason': {'slightly_better': 2}}
    """

    def __init__(self, name: str = ""):
        self.name = name
        self.kept = 0
        self.dropped: Counter = Counter()

    def keep(self, n: int = 1) -> None:
        self.kept += n

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    @property
    def total(self) -> int:
        return self.kept + sum(self.dropped.values())

    def summary(self) -> dict:
        return {
            "name": self.name,
            "total": self.total,
            "kept": self.kept,
            "dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(sorted(self.dropped.items())),
        }

    def __str__(self) -> str:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.dropped.items())) or "none"
        return f"{self.name or 'filter'}: kept {self.kept} of {self.total} (dropped {reasons})"
