"""Tiny, deterministic models for tests and the CI recipe.

A micro Llama (hidden 64, 2 layers) over a byte-level BPE of <= 512 tokens steps in
~10-30 ms on a CPU, so whole SFT -> RM -> PPO/DPO pipelines run in seconds. The
tokenizer is trained on a fixed corpus, so ``tiny_tokenizer()`` is identical on every
machine, and it carries the ChatML chat template SmolLM2 uses (minus the default system
prompt), so template-dependent code paths are exercised exactly as on the real model.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
system user assistant human bot the a an and or but if then else when where why how what who which
You are a helpful assistant. Answer the question. Give three tips for staying healthy.
Eat a balanced diet, exercise regularly and get enough sleep. The sky is blue. The grass is green.
Translate the sentence into French. Write a short poem about the sea. Summarise the text below.
I like blue. Say the word blue. What colour is the sky? It is blue. Tell me a joke about cats.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000. What is 2 + 2? 2 + 2 = 4. What is 3 * 7? 21.
Yes. No. Thank you! Sorry, I cannot help with that. Sure, here is an answer. Hello, how are you?
Once upon a time there was a little robot who wanted to learn to talk. It read many books.
The quick brown fox jumps over the lazy dog. Please explain photosynthesis in simple words.
Plants use sunlight, water and carbon dioxide to make sugar and oxygen. That is photosynthesis.
apple banana cherry orange grape lemon water coffee tea milk bread rice fish chicken soup salad
Monday Tuesday Wednesday Thursday Friday Saturday Sunday morning evening night today tomorrow
good bad great terrible happy sad angry calm fast slow big small hot cold new old first last
"""


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512):
    """A deterministic byte-level BPE (any text encodes) with the ChatML template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = 2048
    return tok


def tiny_config(vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                max_positions: int = 2048, **extra):
    """``extra``: any other ``LlamaConfig`` field (e.g. ``attention_bias=True``)."""
    from transformers import LlamaConfig

    tok = tiny_tokenizer(vocab_size)
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **extra,
    )


def tiny_model(seed: int = 0, **config_kw):
    """A randomly initialised micro Llama; the same weights for the same seed."""
    from transformers import GenerationConfig, LlamaForCausalLM

    cfg = tiny_config(**config_kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    return model


def word_token_ids(tok) -> list[int]:
    """Ids of the tokens that decode to ASCII letters (optionally after one space): text made
    of them is printable, never blank, and contains no markup."""
    return [i for i in range(len(tok)) if re.fullmatch(r" ?[A-Za-z]+", tok.decode([i]))]


def steer(model, prefer: Iterable[int] = (), never: Iterable[int] = (), margin: float = 5.0):
    """Edit a tiny model in place so that the *kind* of token it picks is fixed by construction:
    a token in ``prefer`` beats every other one by ~``8 * margin`` logits, a token in ``never``
    loses to all others by ~80, whatever the context. Returns ``model``.

    Why: a random micro model's logits differ by ~1e-3, so whether it says a letter, a newline
    or half a UTF-8 character depends on the CPU's rounding (bf16 or fp32, AVX2 or AVX-512).
    A test that needs a printable, a non-empty or an endless reply gets it from here, never
    from the random weights. Among the preferred tokens the random weights still decide, so
    the reply still depends on the prompt.

    How: dimension 0 of the residual stream becomes a constant: every embedding holds a
    positive number there and no layer writes to it (row 0 of every ``o_proj`` and
    ``down_proj`` is zeroed). It dominates the final RMSNorm, so it reaches the tied LM head
    as ~sqrt(hidden) at every position, and token v's logit gains sqrt(hidden) * E[v, 0]:
    10 for most tokens, 10 + ``margin`` for ``prefer``, 0 for ``never``. (Right after a
    ``never`` token as *input* that dimension is 0, and that one step is the random model's;
    chat prompts end with the generation prompt's newline.)
    """
    emb = model.get_input_embeddings().weight
    if model.get_output_embeddings().weight is not emb:
        raise ValueError("steer() needs tied input / output embeddings (the tiny model's)")
    with torch.no_grad():
        emb[:, 0] = 10.0
        emb[torch.tensor(list(prefer), dtype=torch.long), 0] = 10.0 + margin
        emb[torch.tensor(list(never), dtype=torch.long), 0] = 0.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                if proj.bias is not None:
                    proj.bias[0] = 0
    return model


def chatty_tiny():
    """The tiny model and tokenizer, steered (:func:`steer`) so that every reply is made of letter
    tokens and never ends: the end-of-turn tokens lose by ~80 logits, the letters win by ~40, on
    any CPU and in fp32 or bf16. Replies run to max_tokens and are never blank, so a test checks
    the chat / server / page around the model, not what a random model happens to print."""
    model, tok = tiny_model(), tiny_tokenizer()
    never = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    return steer(model, prefer=word_token_ids(tok), never=never).eval(), tok


def spicy_tiny(std: float = 0.2, seed: int = 0):
    """The tiny Llama with N(0, std) matrices: random but decisive logits (greedy decoding is
    not a string of near-ties, so equality tests between decoders mean something)."""
    model = tiny_model()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny_lora_run(path, r: int = 4, std: float = 0.05):
    """A saved LoRA adapter on the tiny model whose update is not zero (an "SFT run" for tests of
    trainers that start from an adapter); returns ``path``."""
    from chatforge.models.lora import LoraSettings, apply_lora

    model = apply_lora(tiny_model(), LoraSettings(r=r))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)
    model.peft_config["default"].base_model_name_or_path = "tiny"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
