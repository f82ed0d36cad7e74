"""Pluggable rewards for PPO / RLOO: one score per (prompt, response).

A reward is named by a spec string (repeat ``--reward`` to combine several)::

    rm:RUN                        a chatforge reward-model run (or saved RM directory)
    fn:MODULE:FUNCTION            a Python function f(prompts, responses, **opts) -> list[float]
    fn:path/to/file.py:FUNCTION   ... from a file
    clf:MODEL:LABEL               a Hugging Face sequence classifier: the logit (or log-prob)
                                  of LABEL (a name from its id2label, or an index)

followed by optional ``?key=value&key=value`` options and an ``@weight`` (default 1)::

    --reward rm:runs/rm --reward "fn:chatforge.train.reward_fns:non_repetition?n=3@0.5"
    --reward "clf:lvwerra/distilbert-imdb:POSITIVE?output=logprob"

The combined score is ``sum_i w_i * score_i``; then, in this order and each optional:
whitening with running mean/std across steps (scores keep a stable scale as the policy
improves), clipping to ``[-clip, clip]``, and the *missing end-of-turn* rule: a response cut
by the length limit gets a fixed reward instead (it would otherwise learn that rambling
past the budget is as good as answering).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import parse_qsl

import torch

from chatforge.errors import ChatforgeError, ConfigError
from chatforge.train.ppo_math import RunningMoments

Messages = list[dict[str, str]]
RewardFn = Callable[[Sequence[Messages], Sequence[str]], Sequence[float]]
KINDS = ("rm", "fn", "clf")


# ---------------------------------------------------------------- spec strings
@dataclass
class RewardSpec:
    kind: str                 # rm | fn | clf
    target: str               # run folder / module:function / model:label
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    text: str = ""            # the spec as written (for logs and errors)

    @property
    def name(self) -> str:
        short = self.target.rstrip("/").split("/")[-1] if self.kind == "rm" else self.target.split(":")[-1]
        return f"{self.kind}_{short}"


def _parse_value(raw: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_reward_spec(spec: str) -> RewardSpec:
    """``kind:target[?k=v&...][@weight]`` -> :class:`RewardSpec` (ConfigError when malformed)."""
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    if not sep or kind not in KINDS or not rest:
        raise ConfigError(f"--reward {spec!r}: expected rm:RUN, fn:MODULE:FUNCTION or clf:MODEL:LABEL")
    weight = 1.0
    head, at, tail = rest.rpartition("@")
    if at:
        try:
            weight = float(tail)
            rest = head
        except ValueError:
            pass  # an '@' inside a path, not a weight
    options: dict[str, Any] = {}
    if "?" in rest:
        rest, query = rest.split("?", 1)
        options = {k: _parse_value(v) for k, v in parse_qsl(query, keep_blank_values=True)}
    if not math.isfinite(weight):
        raise ConfigError(f"--reward {spec!r}: weight must be a finite number")
    if kind in ("fn", "clf") and ":" not in rest:
        what = "MODULE:FUNCTION" if kind == "fn" else "MODEL:LABEL"
        raise ConfigError(f"--reward {spec!r}: {kind} rewards are written {kind}:{what}")
    return RewardSpec(kind, rest, weight, options, text)


# ---------------------------------------------------------------- the three kinds
def load_function(target: str) -> Callable:
    """``package.module:function`` or ``path/to/file.py:function``."""
    mod_name, _, fn_name = target.rpartition(":")
    try:
        if mod_name.endswith(".py") or "/" in mod_name:
            path = Path(mod_name)
            if not path.is_file():
                raise ConfigError(f"reward fn:{target}: no such file {path}")
            name = f"chatforge_reward_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[name] = module
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"reward fn:{target}: cannot import {mod_name!r} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"reward fn:{target}: {mod_name} has no function {fn_name!r}")
    return fn


class FunctionReward:
    """A rule reward: ``fn(prompts, responses, **options)``."""

    def __init__(self, fn: Callable, options: dict[str, Any] | None = None, name: str = "fn"):
        self.fn, self.options, self.name = fn, dict(options or {}), name

    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        out = list(self.fn(list(prompts), list(responses), **self.options))
        if len(out) != len(responses):
            raise ChatforgeError(f"reward {self.name} returned {len(out)} scores for {len(responses)} responses")
        return [float(x) for x in out]


class ModelReward:
    """A chatforge reward model (``chatforge rm`` run), through the one scorer
    (:class:`~chatforge.models.heads.RewardScorer`: its chat template, ``max_len``, bf16
    autocast where fast). ``onto`` (``?share=true``) loads a LoRA reward model as a second
    adapter of the policy's own frozen backbone: no second copy of the weights -- valid only
    when the RM was trained on the same base."""

    def __init__(self, path: str, batch_size: int = 8, onto: Any = None, name: str = "rm"):
        from chatforge.models.heads import load_scorer

        self.scorer = load_scorer(path, batch_size=batch_size, onto=onto)
        self.name = name

    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        return self.scorer.score(prompts, responses)


class ClassifierReward:
    """A Hugging Face sequence classifier as the reward (Mini-ChatGPT: "positive means do
    more like this"): the logit of ``label`` (``output=logit``) or its log-probability
    (``output=logprob``), computed on the response alone (``input=response``) or on
    prompt + response (``input=both``)."""

    def __init__(self, target: str, output: str = "logit", input: str = "response", batch_size: int = 8,
                 max_len: int = 512, name: str = "clf"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model_name, _, label = target.rpartition(":")
        if output not in ("logit", "logprob") or input not in ("response", "both"):
            raise ConfigError(f"reward clf:{target}: output must be logit|logprob and input response|both")
        try:
            self.tok = AutoTokenizer.from_pretrained(model_name)
            self.model = AutoModelForSequenceClassification.from_pretrained(model_name).eval()
        except OSError as e:
            raise ConfigError(f"reward clf:{target}: cannot load classifier {model_name!r} ({e})") from None
        for p in self.model.parameters():
            p.requires_grad_(False)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model.config.pad_token_id = self.tok.pad_token_id
        self.label = self._label_index(label, model_name)
        self.output, self.input, self.batch_size, self.max_len, self.name = output, input, batch_size, max_len, name

    def _label_index(self, label: str, model_name: str) -> int:
        id2label = {int(k): str(v) for k, v in (self.model.config.id2label or {}).items()}
        for i, name in id2label.items():
            if name.lower() == label.lower():
                return i
        if label.lstrip("-").isdigit() and -self.model.config.num_labels <= int(label) < self.model.config.num_labels:
            return int(label) % self.model.config.num_labels
        raise ConfigError(f"reward clf:{model_name}:{label}: no such label; labels are "
                          f"{', '.join(f'{i}={n}' for i, n in sorted(id2label.items()))}")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        from chatforge.train.reward_fns import last_user

        texts = list(responses) if self.input == "response" else \
            [f"{last_user(p)}\n{r}" for p, r in zip(prompts, responses)]
        out: list[float] = []
        for b in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[b:b + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                           max_length=self.max_len)
            logits = self.model(**enc).logits.float()
            if self.output == "logprob":
                logits = torch.log_softmax(logits, -1)
            out.extend(logits[:, self.label].tolist())
        return out


def build_reward(spec: RewardSpec | str, onto: Any = None, batch_size: int = 8) -> Callable[[Sequence[Messages], Sequence[str]], list[float]]:
    """One scorer from one spec."""
    spec = parse_reward_spec(spec) if isinstance(spec, str) else spec
    opts = dict(spec.options)
    if spec.kind == "fn":
        return FunctionReward(load_function(spec.target), opts, name=spec.name)
    if spec.kind == "clf":
        known = {"output", "input", "batch_size", "max_len"}
        if set(opts) - known:
            raise ConfigError(f"reward {spec.text}: unknown options {', '.join(set(opts) - known)} "
                              f"(clf takes {', '.join(sorted(known))})")
        return ClassifierReward(spec.target, output=str(opts.get("output", "logit")),
                                input=str(opts.get("input", "response")),
                                batch_size=int(opts.get("batch_size", batch_size)),
                                max_len=int(opts.get("max_len", 512)), name=spec.name)
    if opts.pop("share", False) is False:
        onto = None
    if opts:
        raise ConfigError(f"reward {spec.text}: unknown options {', '.join(opts)} (rm takes share=true)")
    return ModelReward(spec.target, batch_size=batch_size, onto=onto, name=spec.name)


# ---------------------------------------------------------------- the combination
@dataclass
class RewardOut:
    scores: torch.Tensor              # [B] what the trainer optimises
    raw: torch.Tensor                 # [B] weighted sum before whitening / clipping / penalty
    parts: dict[str, list[float]]     # each component's unweighted scores


class Rewards:
    """Weighted sum of scorers, then optional whitening, clipping, missing-end-of-turn rule."""

    def __init__(self, parts: list[tuple[str, Callable, float]], whiten: bool = False, clip: float = 0.0,
                 missing_eot_reward: float | None = None):
        if not parts:
            raise ConfigError("at least one --reward is needed")
        names = [n for n, _, _ in parts]
        self.parts = [(f"{n}_{i}" if names.count(n) > 1 else n, f, w) for i, (n, f, w) in enumerate(parts)]
        self.whiten, self.clip, self.missing_eot_reward = whiten, clip, missing_eot_reward
        self.moments = RunningMoments()
        # on N processes: all ranks' scores (e.g. ``accelerator.gather``), so every rank whitens
        # with the same running statistics and a checkpoint's (rank 0's) are every rank's
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str],
                 finished: Sequence[bool] | None = None, update_stats: bool = True) -> RewardOut:
        """Scores of a batch; ``update_stats=False`` (evaluation) whitens with the running
        statistics without adding this batch to them."""
        total = torch.zeros(len(responses), dtype=torch.float32)
        parts: dict[str, list[float]] = {}
        for name, fn, w in self.parts:
            s = fn(prompts, responses)
            bad = [i for i, v in enumerate(s) if not math.isfinite(v)]
            if bad:
                raise ChatforgeError(f"reward {name} gave a non-finite score for response {bad[0]}: "
                                     f"{responses[bad[0]][:80]!r}")
            parts[name] = list(s)
            total += w * torch.tensor(s, dtype=torch.float32)
        scores = total.clone()
        if self.whiten:
            seen = self.gather(total) if self.gather is not None and update_stats else total
            mean, std = self.moments.update(seen) if update_stats else (self.moments.mean, self.moments.std)
            scores = (scores - mean) / max(std, 1e-6)
        if self.clip > 0:
            scores = scores.clamp(-self.clip, self.clip)
        if self.missing_eot_reward is not None and finished is not None:
            cut = ~torch.tensor(list(finished), dtype=torch.bool)
            scores = torch.where(cut, torch.full_like(scores, self.missing_eot_reward), scores)
        return RewardOut(scores, total, parts)

    def state_dict(self) -> dict[str, Any]:
        return {"moments": self.moments.state_dict()}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        if "moments" in st:
            self.moments.load_state_dict(st["moments"])


def build_rewards(specs: Sequence[str | RewardSpec | Callable], whiten: bool = False, clip: float = 0.0,
                  missing_eot_reward: float | None = None, onto: Any = None, batch_size: int = 8) -> Rewards:
    """Rewards from spec strings (CLI) or plain callables (Python API, weight 1)."""
    parts: list[tuple[str, Callable, float]] = []
    for s in specs:
        if callable(s) and not isinstance(s, (str, RewardSpec)):
            name = getattr(s, "__name__", "fn")
            parts.append((name, FunctionReward(s, name=name), 1.0))
            continue
        spec = parse_reward_spec(s) if isinstance(s, str) else s
        parts.append((spec.name, build_reward(spec, onto=onto, batch_size=batch_size), spec.weight))
    return Rewards(parts, whiten=whiten, clip=clip, missing_eot_reward=missing_eot_reward)
