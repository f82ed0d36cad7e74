"""AlpacaEval files: model outputs -> Conversation, pairwise annotations -> Preference.

* ``alpaca-eval-outputs`` -- ``{"instruction", "output", "generator", "dataset"}``: one
  model's answer per instruction. ``generator`` and ``dataset`` go to ``meta``.
* ``alpaca-eval-pairwise`` -- ``{"instruction", "output_1", "output_2", "preference", ...}``.
  ``preference`` 1 means output_1 was preferred, 2 output_2 (AlpacaEval 2 writes a
  continuous value in [1, 2]: below 1.5 is output_1, above is output_2). 0, 1.5 (a
  tie) or a missing preference cannot make a pair: the record is reported and skipped
  (in the shipped GPT-4 annotations all 16 such records have identical outputs).
"""

from __future__ import annotations

from typing import Any

from chatforge.data.formats.base import Bad, Format, not_this, single_turn, text_field, with_id
from chatforge.data.records import Conversation, Preference, msg


def detect_outputs(d: Any) -> float:
    if isinstance(d, dict) and isinstance(d.get("instruction"), str) and isinstance(d.get("output"), str) \
            and "generator" in d and "input" not in d:
        return 2.5
    return 0.0


def convert_outputs(obj: Any, meta: dict) -> Conversation:
    if not isinstance(obj, dict) or "instruction" not in obj:
        raise not_this(obj, "instruction/output/generator")
    user, out = text_field(obj, "instruction"), text_field(obj, "output")
    for k in ("generator", "dataset"):
        if isinstance(obj.get(k), str):
            meta[k] = obj[k]
    return Conversation(single_turn(user, out), with_id(meta, obj, "id"))


def detect_pairwise(d: Any) -> float:
    if isinstance(d, dict) and isinstance(d.get("instruction"), str) and "output_1" in d and "output_2" in d \
            and "preference" in d:
        return 3.0
    return 0.0


def convert_pairwise(obj: Any, meta: dict) -> Preference:
    if not isinstance(obj, dict) or "output_1" not in obj:
        raise not_this(obj, "instruction/output_1/output_2/preference")
    user, o1, o2 = text_field(obj, "instruction"), text_field(obj, "output_1"), text_field(obj, "output_2")
    p = obj.get("preference")
    if not isinstance(p, (int, float)) or isinstance(p, bool):
        raise Bad(f"'preference' is {p!r}, expected 1 or 2")
    if p == 0 or p == 1.5:
        same = " (the two outputs are identical)" if o1 == o2 else ""
        raise Bad(f"preference {p!r} is a tie: no chosen/rejected pair{same}")
    if not 1 <= p <= 2:
        raise Bad(f"'preference' {p!r} is outside [1, 2]")
    first = p < 1.5
    chosen, rejected = (o1, o2) if first else (o2, o1)
    for k in ("generator_1", "generator_2", "annotator", "dataset"):
        if isinstance(obj.get(k), str):
            meta[k] = obj[k]
    meta["preference"] = p
    return Preference([msg("user", user)], msg("assistant", chosen), msg("assistant", rejected), with_id(meta, obj, "id"))


FORMATS = [
    Format("alpaca-eval-pairwise", "preference", detect_pairwise, convert_pairwise,
           "AlpacaEval annotations: instruction/output_1/output_2/preference (1|2) -> Preference"),
    Format("alpaca-eval-outputs", "conversation", detect_outputs, convert_outputs,
           "AlpacaEval model outputs: instruction/output/generator -> Conversation"),
]
