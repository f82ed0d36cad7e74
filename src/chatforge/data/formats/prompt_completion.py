"""``prompt``-keyed formats: gpt4all, KoChatGPT/MYChatGPT SFT, RM rankings, PPO prompts.

* ``gpt4all`` -- ``{"prompt", "response"}`` (+ ``source``, ignored).
* ``kochatgpt-sft`` -- ``{"prompt", "completion", "tokens"}``; ``tokens`` may be spelled
  ``token``, be missing, or both may appear (MYChatGPT) -- it is only a length, ignored.
* ``kochatgpt-rm`` -- ``{"prompt", "completion_0", "completion_1", "completion_2", "ranking"}``
  -> :class:`Ranking`. ``ranking[i]`` is the *rank of completion_i*, 0 = best: KoChatGPT's
  own RM code turns ``ranking`` into pairs with ``chosen = completion_i if ranking[i] <
  ranking[j]``, and its README example ``ranking: [2, 1, 0]`` ranks completion_2 (the
  short correct ChatGPT answer) first and completion_0 (an off-topic text-ada-001 reply)
  last, matching the stated ChatGPT > davinci-003 > ada-001 order. So responses are
  ``sorted(range(K), key=ranking)``. The ranking must be a permutation of 0..K-1 over
  the completions present (no ties, no missing ranks), else the record is an error.
* ``label-candidates`` -- ``chatforge label``'s candidates file, ``{"id", "prompt": text or
  messages, "candidates": [...]}`` -> :class:`Prompt` (the answers are not ranked yet; the
  file is read as prompts, e.g. to sample new candidates for the same items).
* ``ppo-prompts`` -- ``{"prompt"}`` -> :class:`Prompt` (JSON Lines or a JSON array). An
  ``input`` beside it is appended like alpaca's; other keys (a stray completion) are
  ignored since the format is prompts only.
"""

from __future__ import annotations

from typing import Any

from chatforge.data.formats.base import Bad, Format, instruction_prompt, not_this, single_turn, text_field, with_id
from chatforge.data.records import Conversation, Prompt, Ranking, msg

_ANSWER_KEYS = ("completion", "response", "completion_0", "chosen", "output", "outputs")


def _has_prompt(d: Any) -> bool:
    return isinstance(d, dict) and isinstance(d.get("prompt"), str)


def detect_gpt4all(d: Any) -> float:
    return 2.0 if _has_prompt(d) and isinstance(d.get("response"), str) else 0.0


def convert_gpt4all(obj: Any, meta: dict) -> Conversation:
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise not_this(obj, "prompt/response")
    prompt, response = text_field(obj, "prompt"), text_field(obj, "response")
    return Conversation(single_turn(prompt, response), with_id(meta, obj, "id"))


def detect_sft(d: Any) -> float:
    if not (_has_prompt(d) and isinstance(d.get("completion"), str)):
        return 0.0
    return 2.5 if ("tokens" in d or "token" in d) else 2.0


def convert_sft(obj: Any, meta: dict) -> Conversation:
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise not_this(obj, "prompt/completion/tokens")
    prompt, completion = text_field(obj, "prompt"), text_field(obj, "completion")
    return Conversation(single_turn(prompt, completion), with_id(meta, obj, "id"))


def detect_rm(d: Any) -> float:
    return 3.0 if _has_prompt(d) and "completion_0" in d and "completion_1" in d else 0.0


def convert_rm(obj: Any, meta: dict) -> Ranking:
    if not isinstance(obj, dict) or "completion_0" not in obj:
        raise not_this(obj, "prompt/completion_0..2/ranking")
    prompt = text_field(obj, "prompt")
    completions = []
    while f"completion_{len(completions)}" in obj:
        completions.append(text_field(obj, f"completion_{len(completions)}"))
    ranking = obj.get("ranking")
    if ranking is None:
        raise Bad(f"missing 'ranking' ({len(completions)} completions, no order)")
    if not isinstance(ranking, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking):
        raise Bad(f"'ranking' must be a list of integers, got {ranking!r}")
    if not ranking:
        raise Bad("empty 'ranking'")
    if len(ranking) != len(completions):
        raise Bad(f"'ranking' has {len(ranking)} entries for {len(completions)} completions")
    if sorted(ranking) != list(range(len(ranking))):
        raise Bad(f"'ranking' {ranking} is not a permutation of 0..{len(ranking) - 1} (ties or gaps)")
    order = sorted(range(len(completions)), key=ranking.__getitem__)
    responses = [msg("assistant", completions[i]) for i in order]
    return Ranking([msg("user", prompt)], responses, with_id(dict(meta, ranking=ranking), obj, "id"))


def detect_candidates(d: Any) -> float:
    ok = isinstance(d, dict) and isinstance(d.get("prompt"), (str, list)) and isinstance(d.get("candidates"), list)
    return 3.0 if ok else 0.0


def convert_candidates(obj: Any, meta: dict) -> Prompt:
    if not detect_candidates(obj):
        raise not_this(obj, "prompt/candidates")
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise Bad("empty 'prompt'")
        prompt = [msg("user", prompt)]
    return Prompt(prompt, with_id(meta, obj, "id"))


def detect_ppo(d: Any) -> float:
    if not _has_prompt(d) or any(k in d for k in _ANSWER_KEYS[:4]):
        return 0.0
    return 1.0 if len(d) == 1 else 0.8


def convert_ppo(obj: Any, meta: dict) -> Prompt:
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise not_this(obj, "prompt")
    inp = obj.get("input")
    user = instruction_prompt(text_field(obj, "prompt"), inp if isinstance(inp, str) else None)
    if not user:
        raise Bad("empty 'prompt'")
    return Prompt([msg("user", user)], with_id(meta, obj, "id"))


FORMATS = [
    Format("kochatgpt-rm", "ranking", detect_rm, convert_rm,
           "prompt + completion_0..K-1 + ranking (rank of each completion, 0 = best) -> Ranking best->worst"),
    Format("kochatgpt-sft", "conversation", detect_sft, convert_sft, "prompt/completion(/tokens|token)"),
    Format("gpt4all", "conversation", detect_gpt4all, convert_gpt4all, "prompt/response(/source)"),
    Format("label-candidates", "prompt", detect_candidates, convert_candidates,
           "chatforge label candidates: prompt + candidates (not yet ranked) -> Prompt"),
    Format("ppo-prompts", "prompt", detect_ppo, convert_ppo, "{\"prompt\"} records -> Prompt"),
]
