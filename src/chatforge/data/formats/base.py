"""What a format adapter is, and the small helpers the adapters share.

An adapter is a :class:`Format`: a name, the record kind it produces, a ``detect``
function that scores a sample, and a converter.

* JSON formats (``text=False``): ``detect(obj) -> float`` scores *one* parsed item
  (0 = not this format); ``convert(obj, meta) -> Record | list[Record]`` converts one
  item or raises :class:`Bad` with a reason the user can act on.
* Text formats (``text=True``): ``detect(lines) -> float`` scores the first lines of the
  file; ``parse(lines, source) -> Iterator[Record | ReadError]`` reads the whole stream
  of ``(line_number, text)``.

Detection sums the per-item scores over a sample, so a few odd records (``{}``, a
translator's refusal) do not change the verdict; adapters that match more keys score
higher, so the specific formats win over the generic ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from chatforge.data.records import Message, msg


class Bad(ValueError):
    """This item cannot become a record; the message is the user-facing reason."""


@dataclass(frozen=True)
class Format:
    name: str
    kind: str  # conversation | preference | ranking | prompt (what every record will be)
    detect: Callable[[Any], float]
    convert: Callable[..., Any]
    doc: str
    text: bool = False  # reads raw text lines instead of JSON items
    unsupported: str = ""  # recognised, but not convertible: the reason (detection then raises DataError)


def describe(obj: Any) -> str:
    """A short description of an item for error messages: its keys, or its type."""
    if isinstance(obj, dict):
        if not obj:
            return "an empty object {}"
        keys = list(obj)
        shown = "|".join(map(str, keys[:8])) + ("|…" if len(keys) > 8 else "")
        return f"an object with keys {shown}"
    return f"a JSON {type(obj).__name__.replace('str', 'string').replace('dict', 'object')}"


def not_this(obj: Any, expected: str) -> Bad:
    """The standard reason for an item that does not have this format's shape."""
    if isinstance(obj, dict) and set(obj) == {"message"} and isinstance(obj["message"], str):
        head = obj["message"][:70].replace("\n", " ")
        return Bad(f"a {{\"message\": ...}} record instead of data (translator/API refusal?): {head!r}")
    return Bad(f"{describe(obj)}; expected {expected}")


def text_field(obj: dict, key: str, *, required: bool = True) -> str | None:
    """``obj[key]`` as a string, or Bad naming the field."""
    v = obj.get(key)
    if v is None:
        if required:
            raise Bad(f"missing {key!r} ({describe(obj)})")
        return None
    if not isinstance(v, str):
        raise Bad(f"{key!r} is a {type(v).__name__}, expected a string")
    return v


# The many ways datasets say "this instruction has no input" (AlpacaDataCleaned lists
# several; translations add more). Compared after lower-casing and dropping everything
# but letters and digits, so "<No Input>", "no-input", "N/A." all match.
NOINPUT_KEYS = frozenset(
    {
        "", "noinput", "nooinput", "na", "none", "nan", "null", "nil", "empty", "blank", "nothing",
        "notapplicable", "noinputrequired", "noinputneeded", "noinputprovided", "noinputgiven",
        "inputnone", "inputna", "inputnoinput", "noinputdata", "tiadainput", "tiada",
        "无", "无输入", "没有输入", "空", "없음", "입력없음",
    }
)
_NOT_ALNUM = re.compile(r"[\W_]+")


def is_noinput(s: str) -> bool:
    """True if ``s`` is one of the spellings of "no input" (or empty)."""
    if len(s) > 40:
        return False
    key = _NOT_ALNUM.sub("", s.lower())
    if key == "na" and "/" not in s:  # "Na" is sodium; only "N/A" means no input
        return False
    return key in NOINPUT_KEYS


def instruction_prompt(instruction: str, inp: str | None) -> str:
    """Alpaca's instruction + optional input as one user message (no-input markers dropped)."""
    instruction = instruction.strip()
    if inp is None or is_noinput(inp):
        return instruction
    return f"{instruction}\n\n{inp.strip()}"


def single_turn(user: str, assistant: str, system: str | None = None) -> list[Message]:
    out = [msg("system", system)] if system else []
    out.append(msg("user", user))
    out.append(msg("assistant", assistant))
    return out


def with_id(meta: dict, obj: dict, *keys: str) -> dict:
    """Copy the first present id-like key of ``obj`` into ``meta['id']``."""
    for k in keys:
        v = obj.get(k)
        if v is not None and v != "":
            # a table's id may be bytes, a timestamp, a numpy scalar: keep it as text then
            meta["id"] = v if isinstance(v, (str, int, float, bool)) else str(v)
            break
    return meta
