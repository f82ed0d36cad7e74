"""Preference data as the reward model and DPO read it: one report of what was skipped and
why, and one rule for which responses of a record can be compared.

Both trainers take ``Preference`` (chosen / rejected) and ``Ranking`` (K responses, best
first, optionally with ``tiers``: ties) records; both must drop the same bad items for the
same reasons, so that an RM and a DPO run on one file see the same comparisons
(:func:`ranked_responses`). Tied responses make no (better, worse) pair; a ranking marked
"all answers unacceptable" (``meta.unacceptable``, written by ``chatforge label``) is
trained on or dropped by the ``unacceptable`` option (keep | drop), counted either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from chatforge.data.records import Preference, Ranking


def where_of(meta: dict[str, Any]) -> str:
    """``file:line`` of a record (or just its source), for messages. ``file`` is set by the
    canonical reader when ``source`` names something else (``"human"``, ``"ai"``)."""
    src = meta.get("file") or meta.get("source", "?")
    if meta.get("row") is not None:  # a table's row (chatforge.data.tabular)
        return f"{src} row {meta['row']}"
    return f"{src}:{meta['line']}" if meta.get("line") is not None else str(src)


@dataclass
class SkipReport:
    """Counts per reason for everything not trained on, and the first few cases.
    Subclasses name what a usable item is (``pairs``, ``groups``) as their count field."""

    records: int = 0
    read_errors: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first: list[str] = field(default_factory=list)
    kept: dict[str, int] = field(default_factory=dict)  # trained on, but worth counting (e.g. all unacceptable)
    unit: ClassVar[str] = "items"

    @property
    def usable(self) -> int:
        return getattr(self, self.unit)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.first) < 5:
            self.first.append(f"{where}: {reason}")

    def keep(self, reason: str) -> None:
        """Count a record that is trained on but marked (it is not a skip)."""
        self.kept[reason] = self.kept.get(reason, 0) + 1

    def lines(self) -> list[str]:
        out = [f"{self.records} records -> {self.usable} usable {self.unit}"
               + (f", {self.read_errors} unreadable records" if self.read_errors else "")]
        if self.kept:
            out.append("kept, marked: " + ", ".join(f"{k} {v}" for k, v in sorted(self.kept.items())))
        if self.skipped:
            out.append("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        out += ["  " + s for s in self.first]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"records": self.records, self.unit: self.usable, "read_errors": self.read_errors,
                "skipped": dict(self.skipped), "kept": dict(self.kept), "first": list(self.first)}


UNACCEPTABLE = ("keep", "drop")  # what a ranking marked "all answers unacceptable" becomes


@dataclass
class Ranked:
    """A record's usable responses best -> worst and their tiers (equal tier = a tie)."""

    texts: list[str]
    tiers: list[int]

    def ordered_pairs(self) -> list[tuple[int, int]]:
        """(better, worse) index pairs; tied responses make none."""
        t, k = self.tiers, len(self.texts)
        return [(i, j) for i in range(k) for j in range(i + 1, k) if t[i] < t[j]]


def ranked_responses(rec: Any, report: SkipReport, unacceptable: str = "keep") -> Ranked | None:
    """The texts of a record best -> worst with their tiers, or None (reported) when it
    cannot be used. One rule for the reward model and DPO:

    * empty responses are dropped (a ranking survives while an ordered pair is left);
    * identical responses in one tier are a consistent tie (no pair between them); identical
      responses in different tiers (or a ``Preference`` with chosen == rejected) say nothing
      about which is better and refuse the record;
    * a ranking whose responses are all tied states no pair and is skipped;
    * ``meta.unacceptable`` (the annotator marked every answer unacceptable): ``keep`` trains
      on the order among the bad answers (it is still a human judgement of which is less
      bad) and counts the record; ``drop`` skips it, counted.
    """
    if unacceptable not in UNACCEPTABLE:
        raise ValueError(f"unacceptable must be one of {', '.join(UNACCEPTABLE)}, got {unacceptable!r}")
    where = where_of(rec.meta)
    if isinstance(rec, Preference):
        texts, tiers = [rec.chosen["content"], rec.rejected["content"]], [0, 1]
    elif isinstance(rec, Ranking):
        ranks = rec.meta.get("ranking")
        if isinstance(ranks, list) and len(set(map(str, ranks))) < len(ranks):
            report.skip("tied ranks (refused)", where)
            return None
        texts = [r["content"] for r in rec.responses]
        tiers = [rec.tier(i) for i in range(len(texts))]
    else:
        report.skip(f"{rec.kind} record (needs preference or ranking data)", where)
        return None
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if len(keep) < 2:
        report.skip("empty response", where)
        return None
    if len(keep) < len(texts):  # the rest of the ranking still says which is better
        report.skip("empty response dropped from a ranking (kept)", where)
    out = Ranked([texts[i] for i in keep], [tiers[i] for i in keep])
    tier_of: dict[str, int] = {}
    for text, tier in zip(out.texts, out.tiers):
        if tier_of.setdefault(text.strip(), tier) != tier:
            report.skip("identical responses (a tie)", where)
            return None
    if not out.ordered_pairs():
        report.skip("all responses tied (no pair)", where)
        return None
    if rec.meta.get("unacceptable") is True:
        if unacceptable == "drop":
            report.skip("all answers unacceptable (dropped)", where)
            return None
        report.keep("all answers unacceptable (order kept)")
    return out


def ordered_responses(rec: Any, report: SkipReport, unacceptable: str = "keep") -> list[str] | None:
    """The texts of :func:`ranked_responses`, best -> worst (ties not shown)."""
    r = ranked_responses(rec, report, unacceptable)
    return None if r is None else r.texts
