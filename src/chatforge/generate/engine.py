"""The decoding engine: one loop serves the terminal chat, the HTTP server, PPO rollouts
and evaluation.

``Engine(model, tokenizer).generate(prompts, cfg)`` decodes a batch of token-id prompts of
different lengths with a KV cache. The loop, per step: forward the newest token of every
unfinished sequence -> log-probs of the raw logits (if asked) -> repetition penalty ->
n-gram ban -> temperature / top-k / top-p / min-p -> sample -> per-sequence bookkeeping
(end-of-turn token, stop strings on the decoded text, length). Finished sequences leave
the batch, so they stop costing compute.

Two decoders implement the forward passes (see :mod:`chatforge.generate.decoders`): a
generic one over any ``transformers`` causal LM (PEFT-wrapped too), and a fast one for
Llama-architecture models (SmolLM2) with a pre-allocated KV cache, fused projections and
far less per-token Python. Beam search is delegated to ``transformers.generate``.

Conventions of the returned :class:`Completion`:

* ``token_ids`` are the tokens the model generated, including the end-of-turn token when
  that is why it stopped, and including the token that completed a stop string;
  ``logprobs`` has one entry per token id.
* ``text`` never contains the end-of-turn token, the stop string, or anything after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from chatforge.errors import ChatforgeError, ConfigError
from chatforge.generate.decoders import make_decoder
from chatforge.generate.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    banned_ngram_tokens,
    build_ngram_table,
    record_ngram,
    sample_next,
)
from chatforge.generate.text import TextTracker, find_stop

__all__ = ["Completion", "Engine", "SamplingConfig", "TextStream", "default_eos_ids", "context_length"]

# End-of-turn markers of common chat templates; used when they are special tokens of the vocabulary.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")

DeltaCallback = Callable[[int, str], None]


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str  # "eos" | "stop" | "length"


def default_eos_ids(model, tokenizer, template: str = "auto") -> list[int]:
    """Tokenizer eos + generation-config eos + the chat template's end-of-turn token(s)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update([int(gen_eos)] if isinstance(gen_eos, int) else [int(i) for i in gen_eos])
    try:
        from chatforge.data.templates import end_of_turn_ids

        ids.update(int(i) for i in end_of_turn_ids(tokenizer, template))
    except Exception:  # no usable template: the well-known markers below still apply
        pass
    special = set(getattr(tokenizer, "all_special_tokens", []))
    special.update(str(t) for t in getattr(tokenizer, "added_tokens_encoder", {}))
    vocab = tokenizer.get_vocab()
    for tok in END_OF_TURN_TOKENS:
        if tok in special and tok in vocab:
            ids.add(vocab[tok])
    return sorted(ids)


def context_length(model, tokenizer=None) -> int:
    """How many tokens (prompt + reply) the model can attend to."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n > 0:
            return n
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < 1_000_000 else 2048


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off while decoding; the caller's train/eval state is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _Row:
    """One sequence being decoded."""

    def __init__(self, index: int, prompt: list[int], max_new: int, tokenizer, stops: list[str], live_text: bool):
        self.index = index
        self.prompt = prompt
        self.max_new = max_new
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.text = TextTracker(tokenizer, stops) if live_text else None
        self.finish_reason: str | None = None
        self.seq: list[int] = []  # prompt + reply, only kept for the n-gram ban
        self.ngrams: dict[tuple[int, ...], set[int]] = {}

    def add(self, token: int, is_eos: bool, logprob: float | None) -> str:
        """Record one sampled token; return the text it makes safe to show."""
        self.ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        delta = ""
        if is_eos:
            self.finish_reason = "eos"
        elif self.text is not None:
            delta = self.text.add(token)
            if self.text.stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.ids) >= self.max_new:
            self.finish_reason = "length"
        if self.finish_reason is not None and self.text is not None:
            delta += self.text.finish()
        return delta

    def completion(self, tokenizer, stops: list[str], want_logprobs: bool) -> Completion:
        if self.text is not None:
            text = self.text.text
        else:  # decoded once at the end (no streaming, no stop strings)
            body = self.ids[:-1] if self.finish_reason == "eos" else self.ids
            text = tokenizer.decode(body)
        return Completion(list(self.ids), text, list(self.logprobs) if want_logprobs else None,
                          self.finish_reason or "length")


class TextStream:
    """Iterator of UTF-8-safe text deltas of one completion; ``.completion`` once exhausted."""

    def __init__(self, events: Iterator[tuple[int, str]], rows: list[_Row], finalize: Callable[[], list[Completion]]):
        self._events = events
        self._finalize = finalize
        self.completion: Completion | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._events)[1]
        except StopIteration:
            if self.completion is None:
                self.completion = self._finalize()[0]
            raise

    def close(self) -> None:
        """Stop generating (e.g. on Ctrl-C); ``.completion`` then holds what was generated."""
        self._events.close()
        if self.completion is None:
            self.completion = self._finalize()[0]


class Engine:
    """KV-cache decoding over a causal LM loaded by :func:`chatforge.models.load.load`.

    ``fast``: "auto" uses the fast Llama decoder when the model is a Llama-architecture model
    (plain or with LoRA adapters), True requires it, False always uses the generic decoder.
    ``template``: the chat template of :meth:`chat` (see :func:`chatforge.data.templates.get_template`).
    """

    def __init__(self, model, tokenizer, eos_token_ids: list[int] | None = None, fast: bool | str = "auto",
                 template: str = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.eos_token_ids = (sorted(set(eos_token_ids)) if eos_token_ids is not None
                              else default_eos_ids(model, tokenizer, template))
        if not self.eos_token_ids:
            raise ConfigError("the tokenizer has no eos token: pass eos_token_ids to Engine")
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_ids[0]
        self.max_context = context_length(model, tokenizer)
        self.device = next(model.parameters()).device
        self.decoder = make_decoder(model, fast=fast)

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: list[list[int]], cfg: SamplingConfig | None = None,
                 on_delta: DeltaCallback | None = None) -> list[Completion]:
        """Decode every prompt; ``on_delta(i, text)`` receives prompt i's text as it grows."""
        cfg = (cfg or SamplingConfig()).validate()
        if not prompts:
            return []
        if cfg.num_beams > 1:
            comps = self._beam_search(prompts, cfg)
            if on_delta is not None:
                for i, c in enumerate(comps):
                    if c.text:
                        on_delta(i, c.text)
            return comps
        rows = self._rows(prompts, cfg, live_text=bool(cfg.stop) or on_delta is not None)
        for i, delta in self._decode(rows, cfg):
            if on_delta is not None:
                on_delta(i, delta)
        return [r.completion(self.tokenizer, cfg.stop, cfg.logprobs) for r in rows]

    def stream(self, prompt: list[int], cfg: SamplingConfig | None = None) -> TextStream:
        """Text deltas of one completion as they are generated (beam search: one delta at the end)."""
        cfg = (cfg or SamplingConfig()).validate()
        if cfg.num_beams > 1:
            comps: list[Completion] = []

            def beams() -> Iterator[tuple[int, str]]:
                comps.extend(self._beam_search([prompt], cfg))
                if comps[0].text:
                    yield 0, comps[0].text

            return TextStream(beams(), [], lambda: comps)
        rows = self._rows([prompt], cfg, live_text=True)
        return TextStream(self._decode(rows, cfg), rows,
                          lambda: [r.completion(self.tokenizer, cfg.stop, cfg.logprobs) for r in rows])

    def chat(self, conversations: list[list[dict]], cfg: SamplingConfig | None = None,
             on_delta: DeltaCallback | None = None) -> list[Completion]:
        """Reply to each conversation (OpenAI-style ``messages``) via the chat template; the
        template's stop strings (e.g. the next user header) are added to ``cfg.stop``."""
        cfg = self.chat_config(cfg or SamplingConfig())
        return self.generate([self.encode_chat(c) for c in conversations], cfg, on_delta)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids of ``messages`` ending with the generation prompt (as training renders them)."""
        from chatforge.data.tokenize import encode_prompt

        return encode_prompt(self.tokenizer, messages, self.template)

    def chat_config(self, cfg: SamplingConfig) -> SamplingConfig:
        """``cfg`` plus the template's stop strings (end of turn written as text, next user header)."""
        from chatforge.data.templates import stop_strings

        extra = [s for s in stop_strings(self.tokenizer, self.template) if s not in cfg.stop]
        return cfg.replace(stop=[*cfg.stop, *extra]) if extra else cfg

    @torch.inference_mode()
    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        """Log-probs of ``completions`` given ``prompts`` by one teacher-forced forward pass each."""
        out = []
        with eval_mode(self.model):
            for p, c in zip(prompts, completions):
                if not c:
                    out.append([])
                    continue
                ids = torch.tensor([p + c], device=self.device)
                logits = self.model(input_ids=ids).logits[0, len(p) - 1:-1].float()
                lp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(p):, None])[:, 0]
                out.append(lp.tolist())
        return out

    # ------------------------------------------------------------------ the loop
    def _rows(self, prompts: list[list[int]], cfg: SamplingConfig, live_text: bool) -> list[_Row]:
        rows = []
        for i, p in enumerate(prompts):
            p = [int(t) for t in p]
            if not p:
                raise ChatforgeError(f"prompt {i} is empty: at least one token is needed")
            room = self.max_context - len(p)
            if room < 1:
                raise ChatforgeError(f"prompt {i} has {len(p)} tokens: the model's context is {self.max_context}")
            rows.append(_Row(i, p, min(cfg.max_new_tokens, room), self.tokenizer, cfg.stop, live_text))
        return rows

    def _decode(self, rows: list[_Row], cfg: SamplingConfig) -> Iterator[tuple[int, str]]:
        """The decoding loop, as a generator of ``(row index, text delta)`` (deltas only when
        rows track live text). Closing it early leaves every row with what it had so far.
        Tensor work runs in ``inference_mode`` blocks that never span a ``yield``, so the
        caller's code between two deltas runs in its own grad mode."""
        dev = self.device
        gen = torch.Generator(device=dev)
        if cfg.seed is not None:
            gen.manual_seed(cfg.seed)
        else:
            gen.seed()
        eos = set(self.eos_token_ids)
        n = cfg.no_repeat_ngram_size
        if n:
            for r in rows:
                r.seq = list(r.prompt)
                r.ngrams = build_ngram_table(r.seq, n)
        active = list(rows)
        with eval_mode(self.model):
            with torch.inference_mode():
                logits = self.decoder.prefill([r.prompt for r in rows], self.pad_token_id,
                                              max(r.max_new for r in rows))
                seen = None
                if cfg.repetition_penalty != 1.0:
                    seen = torch.zeros(logits.shape, dtype=torch.bool, device=dev)
                    for j, r in enumerate(rows):
                        seen[j, r.prompt] = True
            while True:
                with torch.inference_mode():
                    raw = logits.float()
                    logits = raw
                    if seen is not None:
                        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
                    if n:
                        logits = logits.clone() if logits is raw else logits  # raw stays unmodified
                        for j, r in enumerate(active):
                            banned = banned_ngram_tokens(r.seq, n, r.ngrams)
                            if banned:
                                logits[j, list(banned)] = float("-inf")
                    nxt = sample_next(logits, cfg, gen)
                    lps = torch.log_softmax(raw, -1).gather(-1, nxt[:, None])[:, 0].tolist() if cfg.logprobs else None
                    toks = nxt.tolist()
                    if seen is not None:
                        seen[torch.arange(len(toks), device=dev), nxt] = True
                keep, deltas = [], []
                for j, (r, t) in enumerate(zip(active, toks)):
                    delta = r.add(t, t in eos, lps[j] if lps is not None else None)
                    if n:
                        r.seq.append(t)
                        record_ngram(r.seq, n, r.ngrams)
                    if r.finish_reason is None:
                        keep.append(j)
                    if delta:
                        deltas.append((r.index, delta))
                yield from deltas
                if not keep:
                    return
                with torch.inference_mode():
                    if len(keep) < len(active):
                        idx = torch.tensor(keep, device=dev)
                        self.decoder.keep(idx)
                        active = [active[j] for j in keep]
                        nxt = nxt[idx]
                        if seen is not None:
                            seen = seen[idx]
                    logits = self.decoder.step(nxt)

    # ------------------------------------------------------------------ beam search
    @torch.inference_mode()
    def _beam_search(self, prompts: list[list[int]], cfg: SamplingConfig) -> list[Completion]:
        """Delegated to ``transformers.generate``; stop strings are applied to the result."""
        rows = self._rows(prompts, cfg, live_text=False)
        comps = []
        with eval_mode(self.model):
            for r in rows:  # one prompt at a time: no padding subtleties, beams are the batch
                ids = torch.tensor([r.prompt], device=self.device)
                out = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_new,
                    num_beams=cfg.num_beams, length_penalty=cfg.length_penalty, early_stopping=True,
                    do_sample=False, repetition_penalty=cfg.repetition_penalty,
                    no_repeat_ngram_size=cfg.no_repeat_ngram_size or None,
                    eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id,
                )
                gen = out[0, len(r.prompt):].tolist()
                reason = "length"
                for k, t in enumerate(gen):
                    if t in self.eos_token_ids:
                        gen, reason = gen[:k + 1], "eos"
                        break
                body = gen[:-1] if reason == "eos" else gen
                text = self.tokenizer.decode(body)
                cut = find_stop(text, cfg.stop)
                if cut != -1:
                    text, reason = text[:cut], "stop"
                comps.append(Completion(gen, text, None, reason))
        if cfg.logprobs:
            for c, lp in zip(comps, self.score([r.prompt for r in rows], [c.token_ids for c in comps])):
                c.logprobs = lp
        return comps
