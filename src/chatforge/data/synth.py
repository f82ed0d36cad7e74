"""Self-instruct (Wang et al. 2022) as Stanford Alpaca ran it: seed tasks -> many more.

The loop (:func:`synthesize`), one round at a time:

1. Build ``batch`` few-shot prompts. Each shows ``seed_examples`` tasks drawn from the seed
   file and ``generated_examples`` from the tasks kept so far (the original self-instruct
   mixed 6 human and 2 machine tasks; Alpaca used 3 seeds only), numbered ``1.`` ..,
   and ends with ``K+1. Instruction:``, asking for the rest of a list of ``list_size``
   tasks: instruction, input and output in one generation.
2. Send them (concurrently, cached: :mod:`chatforge.data.openai_client`), then parse each
   reply in order into tasks (:func:`parse_reply`): the ``###``-separated blocks of
   ``N. Instruction: / N. Input: / N. Output:``. A block cut by ``max_tokens`` is dropped.
3. Filter each task (:class:`TaskFilter`, reasons in :data:`REASONS`): the instruction's length
   in words, a blocklist of things a text model cannot do (Alpaca's list: image, graph, file,
   map, draw, plot, go to, video, audio, music, flowchart, diagram ..., plus the same words
   in Malay, and ``Write a program`` openings), an opening that is not a letter or digit,
   an empty or N/A output, :func:`chatforge.data.clean.unfulfillable`, then the ROUGE-L
   filter: a task whose instruction has ROUGE-L F1 above ``similarity`` (0.7) with any
   instruction kept so far -- seeds included -- is a near copy.
4. Stop at ``n`` kept tasks, or after ``max_requests`` requests.

Everything random is drawn from one ``random.Random(seed)`` in a fixed order, and replies
are processed in request order, so the same command against the same cache makes the same
requests: an interrupted run, started again, pays only for what it had not received.

Languages: the prompt's instructions to the model come in English (``en``) or Malay
(``ms``; :data:`HEADERS`), chosen from the seeds (:func:`guess_language`) or by ``lang``;
the field labels stay ``Instruction / Input / Output`` in every language, so parsing does not
depend on the model translating them. ROUGE-L tokens are Unicode words, and single
characters for scripts written without spaces (Chinese, Japanese, Thai), so the filter works
beyond English (Alpaca's ``rouge_score`` tokenizer keeps ``[a-z0-9]`` only).
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from chatforge.errors import ConfigError, DataError

PROMPT_VERSION = "synth-v1"

# -- the prompt --------------------------------------------------------------------------

HEADERS: dict[str, str] = {
    "en": """You are asked to come up with a set of {n} diverse task instructions. They will be given to an AI assistant, and its answers will be checked.

Requirements:
1. Use a different verb in each instruction, to keep them diverse.
2. Vary the wording too: mix questions with commands.
3. Vary the kind of task: open-ended writing, classification, editing, rewriting, extraction, reasoning, advice, and so on.
4. A text-only language model must be able to do the task: do not ask for pictures, audio or video, and do not ask it to act in the world (set a reminder, browse the web).
5. Write the instructions in English, one or two sentences each.
6. Where a task needs an input, write a specific, realistic input of at most 100 words (no placeholders). Where it needs none, write <noinput>.
7. The output is a good answer to the instruction and input, at most 100 words.

List of {n} tasks:
""",
    "ms": """Anda diminta mencipta satu set {n} arahan tugasan yang pelbagai. Arahan ini akan diberikan kepada pembantu AI, dan jawapannya akan disemak.

Syarat:
1. Gunakan kata kerja yang berbeza dalam setiap arahan supaya arahan lebih pelbagai.
2. Pelbagaikan gaya bahasa: campurkan soalan dengan ayat perintah.
3. Pelbagaikan jenis tugasan: penulisan terbuka, pengelasan, penyuntingan, penulisan semula, pengekstrakan, penaakulan, nasihat dan sebagainya.
4. Model bahasa yang hanya menghasilkan teks mesti boleh melaksanakan tugasan itu: jangan minta gambar, audio atau video, dan jangan minta ia bertindak di dunia nyata (menetapkan peringatan, melayari web).
5. Tulis arahan dalam Bahasa Melayu, satu atau dua ayat setiap satu.
6. Jika tugasan memerlukan input, tulis input yang khusus dan realistik, paling banyak 100 patah perkataan (bukan templat kosong). Jika tidak perlu, tulis <noinput>.
7. Output ialah jawapan yang baik kepada arahan dan input, paling banyak 100 patah perkataan.

Senarai {n} tugasan:
""",
}

# Words Malay uses far more than English (and the reverse): enough to tell the seeds apart.
_MS_WORDS = frozenset("yang dan untuk dengan ini itu adalah dalam tidak anda ialah kepada berikut satu "
                      "daripada boleh atau bagi apakah cipta tulis berikan senaraikan terangkan".split())
_EN_WORDS = frozenset("the and of to is in for that with this are you what which following write".split())


@dataclass
class Task:
    """One instruction / input / output triple (``input`` "" = none) and its provenance."""

    instruction: str
    input: str
    output: str
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def read_seed_tasks(path: str | Path) -> list[Task]:
    """Seed tasks from Alpaca's ``seed_tasks.jsonl`` shape (``instruction`` + ``instances``;
    the first instance is used) or alpaca records (``instruction``/``input``/``output``).

    A bad line is a :class:`DataError` naming ``file:line``: seeds are few and hand-made,
    so one wrong is worth stopping for.
    """
    from chatforge.data.io import ReadError, iter_items

    tasks: list[Task] = []
    for item in iter_items(path):
        if isinstance(item, ReadError):
            raise DataError(f"{item.where()}: {item.reason}")
        line, index, obj = item
        where = f"{path}:{line}" + (f" [item {index}]" if index is not None else "")
        if not isinstance(obj, dict) or not isinstance(obj.get("instruction"), str):
            raise DataError(f"{where}: a seed task needs an 'instruction' string")
        if "instances" in obj:
            inst = obj["instances"]
            if not isinstance(inst, list) or not inst or not isinstance(inst[0], dict):
                raise DataError(f"{where}: 'instances' must be a non-empty list of {{input, output}}")
            inp, out = inst[0].get("input", ""), inst[0].get("output")
        else:
            inp, out = obj.get("input", ""), obj.get("output")
        if not isinstance(out, str) or not isinstance(inp, (str, type(None))):
            raise DataError(f"{where}: a seed task needs an 'output' string (and 'input' a string)")
        if not obj["instruction"].strip():
            raise DataError(f"{where}: empty instruction")
        tasks.append(Task(obj["instruction"].strip(), _noinput(inp or ""), out.strip(),
                          str(obj.get("id", f"seed-{len(tasks)}")), {"source": str(path), "line": line}))
    if not tasks:
        raise DataError(f"{path}: no seed tasks")
    return tasks


def guess_language(tasks: Iterable[Task]) -> str:
    """``ms`` or ``en``, from common words of the instructions (other languages: ``en``,
    whose header asks for English -- give ``lang`` or a prompt file for them)."""
    words = Counter(w for t in tasks for w in rouge_tokens(t.instruction))
    ms = sum(words[w] for w in _MS_WORDS)
    en = sum(words[w] for w in _EN_WORDS)
    return "ms" if ms > en else "en"


def _noinput(s: str) -> str:
    s = s.strip()
    return "" if s.lower().strip("<>. ") in ("noinput", "no input", "") else s


def encode_prompt(examples: list[Task], header: str, list_size: int) -> str:
    """The few-shot prompt: header, ``examples`` as tasks 1..K, then ``K+1. Instruction:``."""
    parts = [header.format(n=list_size)]
    for i, t in enumerate(examples, 1):
        parts.append(f"###\n{i}. Instruction: {t.instruction}\n{i}. Input:\n{t.input or '<noinput>'}\n"
                     f"{i}. Output:\n{t.output}\n")
    parts.append(f"###\n{len(examples) + 1}. Instruction:")
    return "".join(parts)


# -- parsing a reply ---------------------------------------------------------------------

_BLOCK = re.compile(r"^\s*(\d+)\s*\.\s*Instruction\s*:(.*?)\n\s*\1\s*\.\s*Input\s*:(.*?)\n\s*\1\s*\.\s*Output\s*:(.*)$",
                    re.DOTALL | re.IGNORECASE)
_STARTS_NUMBERED = re.compile(r"^\s*(?:###\s*)?\d+\s*\.\s*Instruction\s*:", re.IGNORECASE)


@dataclass
class Parsed:
    """A block of a reply: a task, or why none could be read from it (``reason``)."""

    task: Task | None
    reason: str | None = None
    text: str = ""


def parse_reply(text: str, first_number: int, finish_reason: str | None) -> list[Parsed]:
    """Tasks from a reply that continues the prompt after ``{first_number}. Instruction:``.

    The reply may repeat that label (chat models often do) or not (completion models never
    do). Blocks are split at ``###``; the last one is ``truncated`` when the reply ended by
    length; a block without the three numbered labels is ``unparseable``. Blank blocks (a
    trailing ``###``) are no task and not counted.
    """
    body = text if _STARTS_NUMBERED.match(text) else f"{first_number}. Instruction:{text}"
    blocks = body.split("###")
    out: list[Parsed] = []
    last = max((i for i, b in enumerate(blocks) if b.strip()), default=-1)
    for i, block in enumerate(blocks):
        if not block.strip():
            continue
        if i == last and finish_reason == "length":
            out.append(Parsed(None, "truncated", block.strip()))
            continue
        m = _BLOCK.match(block)
        if m is None:
            out.append(Parsed(None, "unparseable", block.strip()))
            continue
        out.append(Parsed(Task(" ".join(m.group(2).split()), _noinput(m.group(3)), m.group(4).strip()),
                          text=block.strip()))
    return out


# -- ROUGE-L ---------------------------------------------------------------------------

_WORD = re.compile(r"\w+", re.UNICODE)
_NO_SPACE_SCRIPT = re.compile("[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased Unicode words; characters of scripts written without spaces one token each."""
    out: list[str] = []
    for w in _WORD.findall(text.lower()):
        if _NO_SPACE_SCRIPT.search(w):
            out.extend(_split_script(w))
        else:
            out.append(w)
    return out


def _split_script(w: str) -> list[str]:
    out, run = [], ""
    for ch in w:
        if _NO_SPACE_SCRIPT.match(ch):
            if run:
                out.append(run)
                run = ""
            out.append(ch)
        else:
            run += ch
    return out + ([run] if run else [])


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyro).

    Bit i of ``v`` is 0 where row ``a[:i+1]`` gained a match; each token of ``b`` updates all
    of ``a``'s positions at once in Python's big integers: O(len(b)) big-int operations,
    against O(len(a) * len(b)) steps of the textbook table.
    """
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, t in enumerate(a):
        masks[t] = masks.get(t, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for t in b:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(candidate: list[str], reference: list[str]) -> float:
    """ROUGE-L F1 (``rouge_score``'s ``fmeasure``): 2PR / (P + R) over the LCS."""
    lcs = lcs_length(reference, candidate)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


class SimilarityIndex:
    """Every instruction kept so far, tokenised once; :meth:`most_similar` scans them all."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.tokens: list[list[str]] = []

    def add(self, text: str) -> None:
        self.texts.append(text)
        self.tokens.append(rouge_tokens(text))

    def most_similar(self, text: str) -> tuple[float, str | None]:
        toks = rouge_tokens(text)
        best, best_text = 0.0, None
        for ref, t in zip(self.tokens, self.texts):
            s = rouge_l(toks, ref)
            if s > best:
                best, best_text = s, t
        return best, best_text


# -- the filters -----------------------------------------------------------------------

BLOCKLIST: dict[str, tuple[str, ...]] = {
    "en": ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
           "plot", "go to", "video", "audio", "music", "flowchart", "diagram"),
    "ms": ("gambar", "imej", "graf", "fail", "peta", "lukis", "lukiskan", "plot", "pergi ke", "video", "audio",
           "muzik", "lagu", "carta alir", "rajah", "foto", "gambarajah"),
}
PROGRAM_OPENINGS = ("write a program", "tulis program", "tulis satu program", "tuliskan program")
REASONS = ("unparseable", "truncated", "length", "empty_output", "blocklist", "bad_start", "unfulfillable", "similar")


@dataclass
class TaskFilter:
    """The checks a generated task must pass; :meth:`check` returns a reason from :data:`REASONS`
    (with a detail) or None. ``blocklist`` words match as whole words, any case."""

    min_words: int = 4
    max_words: int = 150
    similarity: float = 0.7
    blocklist: tuple[str, ...] = BLOCKLIST["en"]  # the seeds' language's list: "fail" is English too

    def __post_init__(self) -> None:
        if self.min_words < 1 or self.max_words < self.min_words:
            raise ConfigError(f"need 1 <= --min-words <= --max-words, got {self.min_words}, {self.max_words}")
        if not 0 < self.similarity <= 1:
            raise ConfigError(f"--similarity must be in (0, 1], got {self.similarity}")
        words = sorted({w.lower() for w in self.blocklist if w.strip()}, key=len, reverse=True)
        self._block = re.compile(r"(?<!\w)(" + "|".join(re.escape(w) for w in words) + r")(?!\w)",
                                 re.IGNORECASE) if words else None

    def check(self, task: Task, index: SimilarityIndex) -> tuple[str, str] | None:
        """``(reason, detail)`` for a task that fails, None for one to keep (it is not added)."""
        from chatforge.data.clean import is_na, unfulfillable

        inst = task.instruction
        n = len(rouge_tokens(inst))
        if n < self.min_words or n > self.max_words:
            return "length", f"{n} words (allowed {self.min_words}..{self.max_words})"
        if not task.output.strip() or is_na(task.output.strip()):
            return "empty_output", repr(task.output[:40])
        if self._block is not None:
            m = self._block.search(inst)
            if m:
                return "blocklist", m.group(1).lower()
        if inst.lower().startswith(PROGRAM_OPENINGS):
            return "blocklist", "write a program"
        if not inst[0].isalnum() or inst[0] in string.punctuation:
            return "bad_start", repr(inst[0])
        if unfulfillable(inst):
            return "unfulfillable", "asks for something a text model cannot do"
        score, like = index.most_similar(inst)
        if score > self.similarity:
            return "similar", f"ROUGE-L {score:.2f} with {like!r}"
        return None


# -- the loop --------------------------------------------------------------------------


@dataclass
class SynthConfig:
    n: int
    model: str
    seed: int = 0
    endpoint: str = "completions"  # "completions" (Alpaca's raw continuation) or "chat"
    batch: int = 4  # requests per round
    max_requests: int | None = None  # default: enough for n at 1 kept task a request, at least 8
    seed_examples: int = 2
    generated_examples: int = 1
    list_size: int = 20
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    lang: str | None = None  # None: guessed from the seeds
    header: str | None = None  # a custom prompt header (with {n}); None: HEADERS[lang]

    def __post_init__(self) -> None:
        checks = [("-n", self.n >= 1, ">= 1"), ("--batch", self.batch >= 1, ">= 1"),
                  ("--seed-examples", self.seed_examples >= 1, ">= 1"),
                  ("--generated-examples", self.generated_examples >= 0, ">= 0"),
                  ("--list-size", self.list_size > self.seed_examples + self.generated_examples,
                   "more than the examples shown"),
                  ("--temperature", 0 <= self.temperature <= 2, "in [0, 2]"), ("--top-p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("--max-tokens", self.max_tokens >= 16, ">= 16"),
                  ("--endpoint", self.endpoint in ("completions", "chat"), "completions or chat")]
        for name, ok, what in checks:
            if not ok:
                raise ConfigError(f"{name} must be {what}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ConfigError("--max-requests must be >= 1")
        if self.lang is not None and self.header is None and self.lang not in HEADERS:
            raise ConfigError(f"--lang {self.lang}: built-in prompts are {', '.join(HEADERS)}; "
                              "give --prompt-file for another language")


@dataclass
class SynthResult:
    kept: list[Task]
    rejected: list[dict[str, Any]]  # {"reason", "detail", "instruction"/"text", "request", "round"}
    requests: int
    failed_requests: list[str]
    stopped: str  # why the loop ended
    lang: str

    def counts(self) -> dict[str, int]:
        c = Counter(r["reason"] for r in self.rejected)
        return {r: c[r] for r in (*REASONS, "request_failed") if c[r]}


def request_body(cfg: SynthConfig, prompt: str, request_no: int) -> tuple[str, dict]:
    """``(path, body)`` of one generation request; ``seed`` makes a server that honours it
    sample the same tasks again, and keeps the cache key stable."""
    stop = [f"{cfg.list_size + 1}. Instruction", f"\n{cfg.list_size + 1}."]
    common = {"model": cfg.model, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
              "stop": stop, "seed": cfg.seed * 1_000_003 + request_no}
    if cfg.endpoint == "chat":
        return "/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}
    return "/completions", {**common, "prompt": prompt}


def synthesize(seeds: list[Task], cfg: SynthConfig, flt: TaskFilter, send: Callable[[str, list[dict]], list],
               on_kept: Callable[[Task], None] | None = None, stamp: Callable[[], str] | None = None) -> SynthResult:
    """Run the loop (module docstring). ``send(path, bodies)`` returns, per body, a reply with
    ``text``, ``finish_reason`` and ``key`` -- or an exception with ``reason`` (a request that
    kept failing: counted as ``request_failed``, the loop goes on)."""
    lang = cfg.lang or guess_language(seeds)
    header = cfg.header or HEADERS[lang]
    max_requests = cfg.max_requests or max(8, cfg.n)
    rng = random.Random(cfg.seed)
    index = SimilarityIndex()
    for t in seeds:
        index.add(t.instruction)
    kept: list[Task] = []
    rejected: list[dict[str, Any]] = []
    failed: list[str] = []
    sent = rounds = 0
    stopped = f"reached n={cfg.n}"
    while len(kept) < cfg.n:
        if sent >= max_requests:
            stopped = f"max_requests={max_requests} sent"
            break
        size = min(cfg.batch, max_requests - sent)
        plans = [_examples(rng, seeds, kept, cfg) for _ in range(size)]
        calls = [request_body(cfg, encode_prompt(ex, header, cfg.list_size), sent + j) for j, ex in enumerate(plans)]
        path = calls[0][0]
        replies = send(path, [b for _, b in calls])
        for j, (examples, reply) in enumerate(zip(plans, replies)):
            req = sent + j
            if not hasattr(reply, "text"):
                failed.append(getattr(reply, "reason", str(reply)))
                rejected.append({"reason": "request_failed", "detail": failed[-1], "request": req, "round": rounds})
                continue
            for k, parsed in enumerate(parse_reply(reply.text, len(examples) + 1, reply.finish_reason)):
                if len(kept) >= cfg.n:
                    break
                where = {"request": req, "round": rounds, "block": k, "key": reply.key}
                if parsed.task is None:
                    rejected.append({"reason": parsed.reason, "detail": "", "text": parsed.text[:500], **where})
                    continue
                why = flt.check(parsed.task, index)
                if why is not None:
                    rejected.append({"reason": why[0], "detail": why[1], "instruction": parsed.task.instruction,
                                     "input": parsed.task.input, "output": parsed.task.output, **where})
                    continue
                t = parsed.task
                score, like = index.most_similar(t.instruction)
                t.id = f"synth-{len(kept)}"
                t.meta = {"generator": "chatforge data synth", "prompt_version": PROMPT_VERSION, "model": cfg.model,
                          "endpoint": path, "lang": lang, "temperature": cfg.temperature, "top_p": cfg.top_p,
                          "seed": cfg.seed, "examples": [e.id for e in examples], "most_similar": like,
                          "rouge_l": round(score, 4), **where}
                if stamp is not None:
                    t.meta["time"] = stamp()
                index.add(t.instruction)
                kept.append(t)
                if on_kept is not None:
                    on_kept(t)
        sent += size
        rounds += 1
    return SynthResult(kept, rejected, sent, failed, stopped, lang)


def first_request(seeds: list[Task], cfg: SynthConfig, lang: str) -> tuple[str, dict]:
    """The loop's first request, exactly (for ``--dry-run``)."""
    examples = _examples(random.Random(cfg.seed), seeds, [], cfg)
    return request_body(cfg, encode_prompt(examples, cfg.header or HEADERS[lang], cfg.list_size), 0)


def _examples(rng: random.Random, seeds: list[Task], kept: list[Task], cfg: SynthConfig) -> list[Task]:
    """The in-context tasks of one prompt: generated ones once there are enough, seeds for the rest."""
    n_gen = min(cfg.generated_examples, len(kept))
    n_seed = min(len(seeds), cfg.seed_examples + cfg.generated_examples - n_gen)
    picked = rng.sample(seeds, n_seed) + (rng.sample(kept, n_gen) if n_gen else [])
    rng.shuffle(picked)
    return picked


def to_alpaca(t: Task) -> dict[str, Any]:
    return {"instruction": t.instruction, "input": t.input, "output": t.output, "id": t.id, "meta": t.meta}


def to_conversation(t: Task):
    from chatforge.data.records import Conversation, msg

    user = t.instruction if not t.input else f"{t.instruction}\n\n{t.input}"
    return Conversation([msg("user", user), msg("assistant", t.output)], dict(t.meta, id=t.id))
