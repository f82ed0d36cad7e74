"""Preference data as the reward model and DPO read it: one report of what was skipped and
why, and one rule for which responses of a record can be compared.

Both trainers take ``Preference`` (chosen / rejected) and ``Ranking`` (K responses, best
first) records; both must drop the same bad items for the same reasons, so that an RM and
a DPO run on one file see the same comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from chatforge.data.records import Preference, Ranking


def where_of(meta: dict[str, Any]) -> str:
    """``file:line`` of a record (or just its source), for messages."""
    src = meta.get("source", "?")
    return f"{src}:{meta['line']}" if meta.get("line") is not None else str(src)


@dataclass
class SkipReport:
    """Counts per reason for everything not trained on, and the first few cases.
    Subclasses name what a usable item is (``pairs``, ``groups``) as their count field."""

    records: int = 0
    read_errors: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first: list[str] = field(default_factory=list)
    unit: ClassVar[str] = "items"

    @property
    def usable(self) -> int:
        return getattr(self, self.unit)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.first) < 5:
            self.first.append(f"{where}: {reason}")

    def lines(self) -> list[str]:
        out = [f"{self.records} records -> {self.usable} usable {self.unit}"
               + (f", {self.read_errors} unreadable records" if self.read_errors else "")]
        if self.skipped:
            out.append("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        out += ["  " + s for s in self.first]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"records": self.records, self.unit: self.usable, "read_errors": self.read_errors,
                "skipped": dict(self.skipped), "first": list(self.first)}


def ordered_responses(rec: Any, report: SkipReport) -> list[str] | None:
    """The texts of a record best -> worst, or None (reported) when it cannot be used.

    Empty responses are dropped (a ranking survives with >= 2 left); identical responses are
    a tie and a ranking with tied ranks is refused -- neither says which is better.
    """
    where = where_of(rec.meta)
    if isinstance(rec, Preference):
        texts = [rec.chosen["content"], rec.rejected["content"]]
    elif isinstance(rec, Ranking):
        ranks = rec.meta.get("ranking")
        if isinstance(ranks, list) and len(set(map(str, ranks))) < len(ranks):
            report.skip("tied ranks (refused)", where)
            return None
        texts = [r["content"] for r in rec.responses]
    else:
        report.skip(f"{rec.kind} record (needs preference or ranking data)", where)
        return None
    kept = [t for t in texts if t.strip()]
    if len(kept) < 2:
        report.skip("empty response", where)
        return None
    if len(kept) < len(texts):  # the rest of the ranking still says which is better
        report.skip("empty response dropped from a ranking (kept)", where)
    if len({t.strip() for t in kept}) < len(kept):
        report.skip("identical responses (a tie)", where)
        return None
    return kept
