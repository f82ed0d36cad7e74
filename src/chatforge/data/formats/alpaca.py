"""Alpaca-shaped instruction data: alpaca, ChatDoctor, self-instruct seed tasks.

* ``alpaca`` -- ``{"instruction", "input", "output"}`` (Stanford Alpaca, AlpacaDataCleaned,
  GPTeacher, GSM8K copy, Luotuo, the Chinese translations, MYChatGPT's ``malay.json``).
  ``input`` is optional; every spelling of "no input" (``""``, ``<noinput>``, ``No input``,
  ``N/A``, ``none``, ``nan`` ...; see :func:`base.is_noinput`) counts as none, so the user
  message is the instruction alone; otherwise it is ``instruction + "\\n\\n" + input``.
  Optional ``system`` becomes a system message; optional ``history`` (BELLE /
  LLaMA-Factory style list of ``[question, answer]`` pairs; ``""`` or ``[]`` = none)
  becomes earlier turns. Other keys are ignored.
* ``chatdoctor`` -- alpaca-shaped, but ``instruction`` is one fixed sentence in every
  record ("If you are a doctor, please answer the medical questions based on the
  patient's description."; the Malay copy words it several ways). Detected by a short
  instruction that mentions a doctor plus a non-empty input. That sentence is a persona, not a
  request, so it becomes the *system* message; ``input`` (the patient) is the user turn.
* ``self-instruct-seeds`` -- Stanford Alpaca ``seed_tasks.jsonl``: ``instruction`` plus a
  list of ``instances`` (``{input, output}``); one conversation per instance.
"""

from __future__ import annotations

import re
from typing import Any

from chatforge.data.formats.base import Bad, Format, instruction_prompt, not_this, single_turn, text_field, with_id
from chatforge.data.records import Conversation, msg

_DOCTOR = re.compile(r"\b(doctor|doktor)\b|医生", re.IGNORECASE)


def _is_alpaca(d: Any) -> bool:
    return isinstance(d, dict) and isinstance(d.get("instruction"), str) and isinstance(d.get("output"), str)


def detect_alpaca(d: Any) -> float:
    if not _is_alpaca(d) or "instances" in d or "output_1" in d:
        return 0.0
    return 2.1 if "input" in d else 2.0


def _history(obj: dict) -> list:
    h = obj.get("history")
    if h in (None, "", []):
        return []
    if not isinstance(h, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in h):
        raise Bad("'history' must be a list of [question, answer] pairs")
    out = []
    for q, a in h:
        if not isinstance(q, str) or not isinstance(a, str):
            raise Bad("'history' pairs must hold strings")
        out += [msg("user", q), msg("assistant", a)]
    return out


def convert_alpaca(obj: Any, meta: dict) -> Conversation:
    if not _is_alpaca(obj):
        raise not_this(obj, "instruction/input/output")
    user = instruction_prompt(obj["instruction"], text_field(obj, "input", required=False))
    if not user:
        raise Bad("empty instruction and no input")
    system = text_field(obj, "system", required=False)
    messages = [msg("system", system)] if system else []
    messages += _history(obj)
    messages += [msg("user", user), msg("assistant", obj["output"])]
    return Conversation(messages, with_id(meta, obj, "id"))


def detect_chatdoctor(d: Any) -> float:
    if detect_alpaca(d) and len(d["instruction"]) < 300 and _DOCTOR.search(d["instruction"]) and d.get("input"):
        return 2.5
    return 0.0


def convert_chatdoctor(obj: Any, meta: dict) -> Conversation:
    if not _is_alpaca(obj):
        raise not_this(obj, "instruction/input/output")
    patient = (text_field(obj, "input", required=False) or "").strip()
    if not patient:
        raise Bad("empty 'input' (no patient description)")
    return Conversation(single_turn(patient, obj["output"], system=obj["instruction"].strip()), with_id(meta, obj, "id"))


def detect_seeds(d: Any) -> float:
    if isinstance(d, dict) and isinstance(d.get("instruction"), str) and isinstance(d.get("instances"), list):
        return 3.0
    return 0.0


def convert_seeds(obj: Any, meta: dict) -> list:
    if not detect_seeds(obj):
        raise not_this(obj, "instruction/instances")
    if not obj["instances"]:
        raise Bad("'instances' is empty")
    out: list = []
    for i, inst in enumerate(obj["instances"]):
        m = with_id(dict(meta, instance=i), obj, "id")
        if not isinstance(inst, dict) or not isinstance(inst.get("output"), str):
            out.append(Bad(f"instance {i}: expected an object with 'input' and 'output'"))
            continue
        inp = inst.get("input")
        user = instruction_prompt(obj["instruction"], inp if isinstance(inp, str) else None)
        out.append(Conversation(single_turn(user, inst["output"]), m))
    return out


FORMATS = [
    Format("self-instruct-seeds", "conversation", detect_seeds, convert_seeds,
           "Stanford Alpaca seed tasks: instruction + instances[{input, output}], one conversation per instance"),
    Format("chatdoctor", "conversation", detect_chatdoctor, convert_chatdoctor,
           "ChatDoctor: alpaca-shaped, fixed doctor instruction -> system, input -> user, output -> assistant"),
    Format("alpaca", "conversation", detect_alpaca, convert_alpaca,
           "instruction/input/output (+ optional system, history); 'no input' markers normalised"),
]
