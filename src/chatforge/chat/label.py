"""``chatforge label``: people rank a model's answers in a browser; every judgement becomes a
``Ranking`` record the reward model and DPO read as they are.

The loop it closes: prompts -> K candidate answers per prompt (sampled by the engine, asked of
an OpenAI-compatible server, or read from a candidates file) -> an annotator orders them in the
page (``static/label.html``) -> one JSON line per judgement, appended and fsynced at once.

Files (``OUT`` = ``--out``, e.g. ``rankings.jsonl``; all canonical chatforge JSONL, so
``chatforge data inspect`` reads each of them):

* ``OUT`` -- ``Ranking`` records only: ``chatforge rm --data OUT`` / ``chatforge dpo --data OUT``.
  ``responses`` best -> worst, ``tiers`` when the annotator marked ties; ``meta``: ``annotator``,
  ``source: "human"``, ``time`` (ISO 8601 UTC), ``item`` (stable id), ``candidates`` (per
  response in the stored order: its provenance -- model, sampling settings -- and ``index``,
  its place in the item's candidate list), ``shown`` (candidate indices in the order the page
  showed them: position bias can be checked), ``unacceptable`` (every answer marked
  unacceptable; the order among them is still stated), ``comment``.
* ``OUT.demos.jsonl`` -- ``Conversation`` records: the better answer an annotator wrote (the
  InstructGPT "demonstration"), same ``meta`` keys: ``chatforge sft --data`` reads it.
* ``OUT.skips.jsonl`` -- ``Prompt`` records with ``meta.skipped``: a skip is remembered (the
  item is not shown to that annotator again) but trains no reward model.
* ``OUT.candidates.jsonl`` -- the generated candidates (a candidates file, see
  :func:`read_candidates`), written once: a restart, or a second annotator, sees the same ones.

Crash safety: one writer (this process) appends each record under a lock, ``flush`` +
``fsync`` before the page is answered, so a killed server or a closed tab loses nothing
that was acknowledged; start-up re-reads the files and continues where everyone stopped (a
torn last line, from a kill in mid-write, is moved to ``OUT.torn`` and reported). A second
``chatforge label`` on the same ``OUT`` is refused (an ``flock`` on ``OUT.lock``).

Assignment: items in prompt order; an annotator gets the first item they have not judged
that still needs a judgement (1, or 2 for the ``overlap`` share, chosen by a seeded draw),
counting items shown to someone else in the last ``lease_s`` seconds as taken. Candidates
are shown in an order shuffled per (item, annotator), never with their provenance: models
are compared blind.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

from chatforge.chat import server
from chatforge.chat.api import ApiError
from chatforge.data.records import Conversation, Message, Prompt, Ranking, RecordError, from_dict, msg, to_dict
from chatforge.errors import ChatforgeError, ConfigError, DataError

MIN_K = 2
MAX_K = 9  # keys 1..9 pick the order
NAME = re.compile(r"^[\w][\w .@+-]{0,39}$")  # an annotator's name: letters, digits, a few separators
MAX_TEXT = 20_000  # characters of a demonstration or comment


# ---------------------------------------------------------------------------- items
@dataclass
class Item:
    """One prompt and its candidate answers; ``info[i]`` is candidate i's provenance."""

    id: str
    prompt: list[Message]
    texts: list[str]
    info: list[dict[str, Any]]

    def to_line(self) -> dict[str, Any]:
        """The candidates-file form of this item (:func:`read_candidates` reads it back)."""
        return {"id": self.id, "prompt": self.prompt,
                "candidates": [{"content": t, **i} for t, i in zip(self.texts, self.info)]}


def item_id(prompt: list[Message], given: Any = None) -> str:
    """The record's own id when it has one, else a hash of the prompt: stable across restarts."""
    if given is not None and str(given).strip():
        return str(given)
    return hashlib.sha1(json.dumps(prompt, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:12]


def read_prompts(path: str, fmt: str | None = None) -> list[tuple[str, list[Message], str]]:
    """``(item id, prompt, file:line)`` of every record of a prompts file (any format that has
    prompts: prompt records, conversations, preferences, rankings). Strict: an unreadable
    record, or one with no user turn to answer, is a :class:`DataError` naming file and line;
    the same prompt twice is kept once."""
    from chatforge.data.readers import read_file
    from chatforge.data.records import prompt_of

    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    res = read_file(path, format=fmt, on_error="skip")
    if res.errors:
        first = "; ".join(f"{e.where()}: {e.reason}" for e in res.errors[:3])
        raise DataError(f"{path}: {len(res.errors)} unreadable record(s), fix them first: {first}")
    out, seen = [], set()
    for rec in res.records:
        where = f"{path}:{rec.meta.get('line', '?')}"
        prompt = prompt_of(rec)
        if not prompt or prompt[-1]["role"] != "user":
            raise DataError(f"{where}: the prompt does not end with a user message (nothing to answer)")
        iid = item_id(prompt, rec.meta.get("id"))
        if iid in seen:
            continue  # the same prompt (or id) again: one item
        seen.add(iid)
        out.append((iid, prompt, where))
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


def read_candidates(path: str) -> list[Item]:
    """A candidates file: JSON Lines, one item per line::

        {"id": "q1", "prompt": "text" or [messages ending with a user turn],
         "candidates": ["text", {"content": "text", "model": "runs/dpo", ...provenance}, ...]}

    ``id`` is optional (default: a hash of the prompt); each item needs at least 2 candidates;
    every key of a candidate but ``content`` (or ``text``) is kept as its provenance (e.g. the
    answers of the SFT, PPO and DPO checkpoints to the same prompts, for a blind comparison).
    Errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    items: list[Item] = []
    ids: dict[str, int] = {}
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 (invalid byte at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                item = _candidate_item(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path}:{n}: JSON nested too deeply to read") from None
            except (RecordError, ValueError) as e:
                raise DataError(f"{path}:{n}: {e}") from None
            if item.id in ids:
                raise DataError(f"{path}:{n}: item id {item.id!r} again (first on line {ids[item.id]})")
            ids[item.id] = n
            items.append(item)
    if not items:
        raise DataError(f"{path}: no items")
    return items


def _candidate_item(obj: Any) -> Item:
    if not isinstance(obj, dict) or "prompt" not in obj or "candidates" not in obj:
        raise ValueError("expected an object with 'prompt' and 'candidates'")
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("empty 'prompt'")
        prompt = [msg("user", prompt)]
    Prompt(prompt).validate()  # a list of messages ending with a user turn (RecordError otherwise)
    cands = obj["candidates"]
    if not isinstance(cands, list) or not (MIN_K <= len(cands) <= MAX_K):
        raise ValueError(f"'candidates' must be a list of {MIN_K} to {MAX_K} answers")
    texts, info = [], []
    for i, c in enumerate(cands):
        if isinstance(c, str):
            c = {"content": c}
        text = c.get("content", c.get("text")) if isinstance(c, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"candidates[{i}] must be a non-empty string or an object with 'content'")
        texts.append(text)
        info.append({k: v for k, v in c.items() if k not in ("content", "text")})
    return Item(item_id(prompt, obj.get("id")), prompt, texts, info)


def engine_candidates(engine, prompts: list[tuple[str, list[Message], str]], k: int, cfg, model: str,
                      batch: int = 16, progress: bool = True) -> list[Item]:
    """K samples per prompt from the decoding engine (one seeded batch per ``batch`` rows;
    ``cfg`` a :class:`SamplingConfig` with temperature > 0, so the K differ)."""
    from tqdm.auto import tqdm

    cfg = engine.chat_config(cfg)
    settings = {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k, "min_p": cfg.min_p,
                "repetition_penalty": cfg.repetition_penalty, "max_tokens": cfg.max_new_tokens, "seed": cfg.seed}
    jobs = []
    for iid, prompt, where in prompts:
        ids = engine.encode_chat(prompt)
        if len(ids) + cfg.max_new_tokens > engine.max_context:
            raise DataError(f"{where}: the prompt is {len(ids)} tokens; with --max-tokens {cfg.max_new_tokens} it "
                            f"does not fit the model's {engine.max_context}-token context")
        jobs += [(iid, j, ids) for j in range(k)]
    texts: dict[tuple[str, int], tuple[str, str]] = {}
    bar = tqdm(total=len(jobs), desc="candidates", unit="answer", disable=not progress)
    for start in range(0, len(jobs), batch):
        part = jobs[start:start + batch]
        seed = None if cfg.seed is None else cfg.seed + start  # each batch its own draws, reproducibly
        for (iid, j, _), c in zip(part, engine.generate([x[2] for x in part], cfg.replace(seed=seed))):
            texts[iid, j] = (c.text, c.finish_reason)
        bar.update(len(part))
    bar.close()
    return [Item(iid, prompt, [texts[iid, j][0] for j in range(k)],
                 [{"model": model, "sample": j, "finish_reason": texts[iid, j][1], **settings} for j in range(k)])
            for iid, prompt, _ in prompts]


def remote_candidates(client, model: str, prompts: list[tuple[str, list[Message], str]], k: int, cfg,
                      progress: bool = True) -> list[Item]:
    """K answers per prompt from an OpenAI-compatible server (``chat/remote.Client``), one
    request each with seed ``seed + j`` (``n > 1`` is not supported everywhere)."""
    from tqdm.auto import tqdm

    settings = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_new_tokens}
    items = []
    bar = tqdm(total=len(prompts) * k, desc="candidates", unit="answer", disable=not progress)
    for iid, prompt, _ in prompts:
        texts, info = [], []
        for j in range(k):
            body = {"model": model, "messages": prompt, **settings}
            if cfg.seed is not None:
                body["seed"] = cfg.seed + j
            stream = client.stream_chat(body)
            for _ in stream:
                pass
            texts.append(stream.completion.text)
            info.append({"model": model, "url": client.url, "sample": j,
                         "finish_reason": stream.completion.finish_reason, **settings, "seed": body.get("seed")})
            bar.update(1)
        items.append(Item(iid, prompt, texts, info))
    bar.close()
    return items


def write_candidates(items: list[Item], path: Path) -> None:
    """Atomically (``.tmp`` + rename): a half-written candidates file never exists."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it.to_line(), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


# ---------------------------------------------------------------------------- agreement
def rank_positions(rec: dict) -> dict[int, int]:
    """Candidate index -> tier (0 = best) of one stored ranking record."""
    tiers = rec.get("tiers") or list(range(len(rec["responses"])))
    return {c["index"]: t for c, t in zip(rec["meta"]["candidates"], tiers)}


def agreement(a: dict[int, int], b: dict[int, int]) -> tuple[float, float | None]:
    """(pairwise agreement, Kendall tau-b) of two rankings of the same candidates.

    Over every candidate pair each ranking says better, worse or tied; agreement is the share
    of pairs where both say the same. Tau-b = (concordant - discordant) / sqrt((pairs - ties
    in a)(pairs - ties in b)): 1 = the same order, -1 = reversed, ties handled; None when one
    ranking ties everything (no order to correlate)."""
    keys = sorted(set(a) & set(b))
    same = conc = disc = ties_a = ties_b = n = 0
    for x in range(len(keys)):
        for y in range(x + 1, len(keys)):
            i, j = keys[x], keys[y]
            ra, rb = _sign(a[j] - a[i]), _sign(b[j] - b[i])
            n += 1
            same += ra == rb
            conc += ra * rb > 0
            disc += ra * rb < 0
            ties_a += ra == 0
            ties_b += rb == 0
    if not n:
        return 1.0, None
    denom = math.sqrt((n - ties_a) * (n - ties_b))
    return same / n, ((conc - disc) / denom if denom else None)


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


# ---------------------------------------------------------------------------- the store
def sibling(out: Path, tag: str) -> Path:
    """``rankings.jsonl`` -> ``rankings.<tag>.jsonl`` (beside it)."""
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{stem}.{tag}.jsonl")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Judgement(ValueError):
    """A submitted judgement that cannot be stored (the message names the field)."""

    def __init__(self, message: str, field: str | None = None, status: int = 400):
        super().__init__(message)
        self.field, self.status = field, status


@dataclass
class Done:
    """What the files say about one (item, annotator)."""

    kind: str                 # "ranking" | "skip"
    positions: dict[int, int] = field(default_factory=dict)  # rankings: candidate index -> tier


class LabelStore:
    """The items, what has been judged, and the one writer of the output files.

    Every public method takes the lock: the web app calls them from its worker threads."""

    def __init__(self, items: list[Item], out: str | Path, overlap: float = 0.0, seed: int = 0,
                 lease_s: float = 1800.0, log: Callable[[str], None] = print):
        if not items:
            raise DataError("no items to label")
        if not 0.0 <= overlap <= 1.0:
            raise ConfigError(f"--overlap {overlap}: must be in [0, 1] (the share of items ranked by two people)")
        self.items = {it.id: it for it in items}
        self.order = [it.id for it in items]
        self.out = Path(out)
        self.paths = {"ranking": self.out, "conversation": sibling(self.out, "demos"),
                      "prompt": sibling(self.out, "skips")}
        self.seed, self.lease_s, self.log = seed, lease_s, log
        n_double = int(round(overlap * len(items)))
        self.double = set(random.Random(seed).sample(self.order, n_double))
        self.done: dict[str, dict[str, Done]] = {i: {} for i in self.order}  # item -> annotator -> Done
        self.counts: dict[str, dict[str, int]] = {}  # annotator -> ranked/skipped/unacceptable/demos
        self.leases: dict[str, dict[str, float]] = {i: {} for i in self.order}  # item -> annotator -> expiry
        self.unknown = 0  # records for items not in this session's item list
        self.demos: set[tuple[str, str]] = set()  # (item, annotator) with a stored demonstration
        self._lock = threading.Lock()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._hold = self._exclusive(self.out.with_name(self.out.name + ".lock"))
        self._files = {}
        try:
            for kind, path in self.paths.items():
                self._resume(path)
                self._files[kind] = open(path, "a", encoding="utf-8")
        except BaseException:
            self.close()
            raise

    # -- start-up
    def _exclusive(self, path: Path):
        f = open(path, "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise ConfigError(f"{self.out}: another `chatforge label` is writing it (lock {path}); "
                              "annotators share one server: open its page instead") from None
        return f

    def _resume(self, path: Path) -> None:
        """Re-read what earlier sessions wrote; a torn last line (killed mid-write) is moved aside."""
        if not path.exists():
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            torn = path.with_name(path.name + ".torn")
            with open(torn, "ab") as f:
                f.write(data[cut:] + b"\n")
            with open(path, "r+b") as f:
                f.truncate(cut)
                os.fsync(f.fileno())
            self.log(f"warning: {path}: an unfinished last line (a crash while writing) was moved to {torn}")
            data = data[:cut]
        # split on "\n" only: json.dumps leaves U+2028, U+0085 ... raw in model text, and
        # str.splitlines() would cut a record there
        for n, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                d = json.loads(raw.decode("utf-8"))
                from_dict(d)
                self._note(d)
            except (json.JSONDecodeError, UnicodeDecodeError, RecordError, KeyError, TypeError, AttributeError) as e:
                raise DataError(f"{path}:{n}: not a record this app wrote ({e}); move the file or fix the line") \
                    from None

    def _note(self, d: dict) -> None:
        """Account for one stored record (at start-up and after each write)."""
        meta = d["meta"]
        iid, who = str(meta["item"]), str(meta["annotator"])
        c = self.counts.setdefault(who, {"ranked": 0, "skipped": 0, "unacceptable": 0, "demonstrations": 0})
        if iid not in self.done:
            self.unknown += 1
            return
        if d["kind"] == "ranking":
            self.done[iid][who] = Done("ranking", rank_positions(d))
            c["ranked"] += 1
            c["unacceptable"] += bool(meta.get("unacceptable"))
        elif d["kind"] == "prompt":
            self.done[iid].setdefault(who, Done("skip"))
            c["skipped"] += 1
        elif (iid, who) not in self.demos:
            self.demos.add((iid, who))
            c["demonstrations"] += 1

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._hold.close()

    # -- assignment
    def need(self, iid: str) -> int:
        return 2 if iid in self.double else 1

    def ranked(self, iid: str) -> int:
        return sum(1 for d in self.done[iid].values() if d.kind == "ranking")

    def shown_order(self, iid: str, annotator: str) -> list[int]:
        """Candidate indices in the order this annotator sees them (the same on every reload)."""
        order = list(range(len(self.items[iid].texts)))
        random.Random(f"{self.seed}:{iid}:{annotator}").shuffle(order)
        return order

    def _open_for(self, iid: str, annotator: str, at: float) -> bool:
        if annotator in self.done[iid]:
            return False
        others = sum(1 for who, t in self.leases[iid].items() if who != annotator and t > at)
        return self.ranked(iid) + others < self.need(iid)

    def next_for(self, annotator: str) -> dict[str, Any]:
        """The item to show: the one this annotator holds, else the first open one (leased)."""
        with self._lock:
            at = time.monotonic()
            held = next((i for i in self.order if self.leases[i].get(annotator, 0) > at
                         and annotator not in self.done[i]), None)
            iid = held or next((i for i in self.order if self._open_for(i, annotator, at)), None)
            state = self._annotator_state(annotator)
            if iid is None:
                return {"item": None, **state}
            self.leases[iid][annotator] = at + self.lease_s
            it = self.items[iid]
            shown = self.shown_order(iid, annotator)
            return {"item": iid, "prompt": it.prompt, "candidates": [it.texts[i] for i in shown], **state}

    def _annotator_state(self, annotator: str) -> dict[str, int]:
        c = self.counts.get(annotator, {})
        todo = sum(1 for i in self.order if annotator not in self.done[i] and self.ranked(i) < self.need(i))
        return {"done": c.get("ranked", 0) + c.get("skipped", 0), "todo": todo, "items": len(self.order)}

    # -- judgements
    def submit(self, body: Any) -> dict[str, Any]:
        """Validate one judgement from the page, write its record(s) (fsynced), and answer."""
        if not isinstance(body, dict):
            raise Judgement("the body must be a JSON object")
        annotator = check_name(body.get("annotator"))
        iid = body.get("item")
        if not isinstance(iid, str) or iid not in self.items:
            raise Judgement(f"unknown item {iid!r}", "item")
        unknown = set(body) - {"annotator", "item", "action", "order", "tiers", "unacceptable", "demonstration",
                               "comment"}
        if unknown:
            raise Judgement(f"unknown field(s): {', '.join(sorted(unknown))}", sorted(unknown)[0])
        action = body.get("action", "rank")
        if action not in ("rank", "skip"):
            raise Judgement(f"action must be 'rank' or 'skip', got {action!r}", "action")
        comment = _text(body, "comment")
        demo = _text(body, "demonstration")
        unacceptable = body.get("unacceptable", False)
        if not isinstance(unacceptable, bool):
            raise Judgement("unacceptable must be true or false", "unacceptable")
        it = self.items[iid]
        with self._lock:
            if annotator in self.done[iid]:  # a retry after a lost answer, or a second tab: the first one stands
                return {"ok": True, "duplicate": True, **self._annotator_state(annotator)}
            shown = self.shown_order(iid, annotator)
            meta = {"annotator": annotator, "source": "human", "time": now_iso(), "item": iid,
                    "candidates": [], "unacceptable": unacceptable, "comment": comment, "shown": shown}
            records: list[Any] = []
            if action == "rank":
                order, tiers = check_order(body.get("order"), body.get("tiers"), len(shown))
                picked = [shown[d] for d in order]
                meta["candidates"] = [dict(it.info[i], index=i) for i in picked]
                records.append(Ranking(it.prompt, [msg("assistant", it.texts[i]) for i in picked], meta,
                                       None if tiers == list(range(len(tiers))) else tiers).validate())
            else:
                meta["candidates"] = [dict(it.info[i], index=i) for i in shown]
                records.append(Prompt(it.prompt, dict(meta, skipped=True)).validate())
            # the demonstration first: a crash between the two lines leaves the item to do, and the page's
            # retry writes the judgement (the demonstration, already stored, is not written twice)
            if demo.strip() and (iid, annotator) not in self.demos:
                records.insert(0, Conversation([*it.prompt, msg("assistant", demo)], dict(meta)).validate())
            for rec in records:
                self._append(rec)
            self.leases[iid].pop(annotator, None)
            return {"ok": True, "duplicate": False, **self._annotator_state(annotator)}

    def _append(self, rec) -> None:
        """One line, whole: O_APPEND + an flock across processes + fsync before we answer."""
        d = to_dict(rec)
        f = self._files[rec.kind]
        line = json.dumps(d, ensure_ascii=False) + "\n"
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
        self._note(d)

    # -- progress
    def progress(self) -> dict[str, Any]:
        """Done / to do per annotator, items complete, and agreement on items ranked twice."""
        with self._lock:
            names = sorted(self.counts)
            annotators = []
            for who in names:
                s = self._annotator_state(who)
                annotators.append({"name": who, **self.counts[who], "todo": s["todo"]})
            complete = sum(1 for i in self.order if self.ranked(i) >= self.need(i))
            pairs: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
            for iid in self.order:
                ranked = sorted((who, d) for who, d in self.done[iid].items() if d.kind == "ranking")
                for x in range(len(ranked)):
                    for y in range(x + 1, len(ranked)):
                        key = (ranked[x][0], ranked[y][0])
                        pairs.setdefault(key, []).append(agreement(ranked[x][1].positions, ranked[y][1].positions))
            rows = [_agreement_row(list(k), v) for k, v in sorted(pairs.items())]
            everything = [x for v in pairs.values() for x in v]
            return {"items": len(self.order), "double": len(self.double), "complete": complete,
                    "todo": len(self.order) - complete, "annotators": annotators, "agreement": rows,
                    "overall": _agreement_row([], everything) if everything else None,
                    "unknown_records": self.unknown}


def _agreement_row(who: list[str], values: list[tuple[float, float | None]]) -> dict[str, Any]:
    taus = [t for _, t in values if t is not None]
    return {"annotators": who, "items": len(values), "pairwise_agreement": sum(a for a, _ in values) / len(values),
            "kendall_tau": sum(taus) / len(taus) if taus else None}


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME.match(name) or name != name.strip():
        raise Judgement("annotator: give a name of 1-40 letters, digits, spaces or . @ + - _", "annotator")
    if name.lower().startswith("ai:"):
        raise Judgement("annotator: names starting with 'ai:' are reserved for AI rankings", "annotator")
    return name


def _text(body: dict, key: str) -> str:
    v = body.get(key, "")
    if v is None:
        return ""
    if not isinstance(v, str) or len(v) > MAX_TEXT:
        raise Judgement(f"{key} must be a string of at most {MAX_TEXT} characters", key)
    return v


def check_order(order: Any, tiers: Any, k: int) -> tuple[list[int], list[int]]:
    """The page's order (shown positions, best first) and tiers, validated; tiers renumbered 0, 1, 2..."""
    if (not isinstance(order, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in order)
            or sorted(order) != list(range(k))):
        raise Judgement(f"order must list each of the {k} answers once (0..{k - 1}), best first", "order")
    if tiers is None:
        return order, list(range(k))
    if (not isinstance(tiers, list) or len(tiers) != k
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tiers)
            or any(b < a for a, b in zip(tiers, tiers[1:]))):
        raise Judgement(f"tiers must be {k} non-decreasing integers >= 0 (equal = tied)", "tiers")
    renumber = {t: n for n, t in enumerate(sorted(set(tiers)))}
    return order, [renumber[t] for t in tiers]


# ---------------------------------------------------------------------------- the web app
STATIC = Path(__file__).parent / "static"


def make_label_app(store: LabelStore, api_key: str | None = None, max_body: int = 1 << 20,
                   head_timeout: float = 10.0):
    """The page at ``/`` and its API: ``GET /api/next?annotator=NAME``, ``POST /api/judge``,
    ``GET /api/progress``, ``GET /health``. The key (when set) guards everything but the page,
    its files and ``/health``; errors are ``{"error": {message, type, param, code}}``."""
    app = FastAPI(title="chatforge label", version="1", docs_url=None, redoc_url=None)

    def refuse(e: Judgement):
        return ApiError(str(e), e.field, e.status)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "label.html", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    def health():
        return {"status": "ok", "auth": api_key is not None, "items": len(store.order)}

    @app.get("/api/next")
    def next_item(annotator: str = ""):
        try:
            return store.next_for(check_name(annotator))
        except Judgement as e:
            raise refuse(e) from None

    @app.post("/api/judge")
    async def judge(request: Request):
        body = await server.read_json(request, max_body, head_timeout)
        try:
            # the fsync waits for the disk: off the event loop, so other annotators are not held up
            return await asyncio.get_running_loop().run_in_executor(None, store.submit, body)
        except Judgement as e:
            raise refuse(e) from None

    @app.get("/api/progress")
    def progress():
        return store.progress()

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    server._add_error_handlers(app)
    if api_key is not None:
        app.add_middleware(server.RequireKey, key=api_key)
    return app


def uvicorn_server(app, head_timeout: float = 10.0):
    """uvicorn with the serving stack's limits (request-head deadline, keep-alive, concurrency)."""
    import uvicorn

    settings = server.ServerSettings("label", request_timeout=60.0, head_timeout=head_timeout)
    return uvicorn.Server(server.uvicorn_config(app, settings, {}))


def serve_label(app, sock, head_timeout: float = 10.0) -> None:
    """Serve in this (main) thread until SIGINT/SIGTERM (graceful, exit 0, as ``chatforge serve``)."""
    import signal

    srv = uvicorn_server(app, head_timeout)
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        srv.run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class RunningLabel:
    """The app on a background thread (tests): ``.url``, ``.close()``."""

    def __init__(self, store: LabelStore, api_key: str | None = None, host: str = "127.0.0.1", port: int = 0):
        self.store = store
        sock = server.bind(host, port)
        self.url = server.base_url(sock)
        self._server = uvicorn_server(make_label_app(store, api_key))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            time.sleep(0.01)
        if not self._server.started:
            raise ChatforgeError(f"the label app on {self.url} did not start")

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join()
        self.store.close()

    def __enter__(self) -> RunningLabel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def describe(items: Iterable[Item]) -> str:
    items = list(items)
    ks = sorted({len(it.texts) for it in items})
    return f"{len(items)} items, K = {'/'.join(map(str, ks))}"
