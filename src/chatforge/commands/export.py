"""``chatforge export``: write a trained model as a standalone Hugging Face directory and/or a GGUF file.

    chatforge export RUN --merge-lora -o DIR [--dtype auto|fp32|bf16|fp16] [--overwrite]
    chatforge export RUN --gguf OUT.gguf [--gguf-dtype f32|f16|bf16|q8_0] [--overwrite]

``RUN`` is a run folder (its final model, else its newest checkpoint), a checkpoint, an
adapter or a model directory. ``--merge-lora`` folds a LoRA adapter into its base so DIR
loads with plain ``transformers`` (no peft); a full fine-tuning run is copied. DIR holds
the weights, the tokenizer with its chat template, the generation config and a model card
(``README.md``: base model, data, stages and their settings, the run's evaluation table).
``--gguf`` writes one GGUF file for llama.cpp / Ollama / LM Studio (LoRA always merged;
Llama, Mistral and Qwen2 models with a byte-level BPE tokenizer) and an Ollama ``Modelfile``
beside it; ``--dtype`` with ``--gguf`` alone means the GGUF dtype.
"""

from __future__ import annotations

GGUF_DTYPES = ["f32", "f16", "bf16", "q8_0"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a run's model as a standalone HF directory and/or a GGUF file",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN", help="run folder, checkpoint, adapter or model directory")
    p.add_argument("-o", "--out", metavar="DIR", help="output directory (Hugging Face format + README.md model card)")
    p.add_argument("--gguf", metavar="OUT.gguf", help="also (or only) write a GGUF file and an Ollama Modelfile")
    p.add_argument("--merge-lora", action="store_true",
                   help="merge a LoRA adapter into its base (default: copy the adapter as it is)")
    p.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16", "fp16", *GGUF_DTYPES],
                   help="weight dtype of the HF export (auto = as trained); with --gguf alone, the GGUF's")
    p.add_argument("--gguf-dtype", default=None, choices=GGUF_DTYPES,
                   help="GGUF weight type (default f16; q8_0 = 8-bit blocks, about half of f16)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR / the GGUF / Modelfile if they exist")
    p.set_defaults(func=run)


def _dtypes(args) -> tuple[str, str]:
    """(HF dtype, GGUF dtype) from --dtype / --gguf-dtype; a mismatch is a one-line error."""
    from chatforge.errors import ConfigError

    hf_names, gguf_names = {"auto", "fp32", "bf16", "fp16"}, set(GGUF_DTYPES)
    hf, gg = "auto", args.gguf_dtype or "f16"
    if args.dtype is not None:
        if args.out and args.dtype in hf_names:
            hf = args.dtype
        elif not args.out and args.gguf and args.dtype in gguf_names | {"fp32", "fp16"}:
            gg = args.gguf_dtype or {"fp32": "f32", "fp16": "f16"}.get(args.dtype, args.dtype)
        else:
            want = "auto, fp32, bf16, fp16 (the HF export; --gguf-dtype for the GGUF)" if args.out else "f32, f16, bf16, q8_0"
            raise ConfigError(f"--dtype {args.dtype}: expected one of {want}")
    return hf, gg


def run(args) -> int:
    from chatforge.errors import ConfigError

    if not args.out and not args.gguf:
        raise ConfigError("give -o DIR (Hugging Face folder), --gguf OUT.gguf, or both")
    hf_dtype, gguf_dtype = _dtypes(args)
    from chatforge.eval.card import model_card
    from chatforge.models.load import resolve

    kind = resolve(args.run).kind
    if args.out:
        from chatforge.models.export import export_model

        card = model_card(args.run) if kind != "tiny" else None
        out = export_model(args.run, args.out, merge_lora=args.merge_lora, dtype=hf_dtype, overwrite=args.overwrite,
                           extra_files={"README.md": card} if card else None)
        what = {"adapter": "merged model" if args.merge_lora else "adapter"}.get(kind, "model")
        print(f"exported {what}: {out}" + (" (model card: README.md)" if card else ""))
    if args.gguf:
        _export_gguf(args, kind, gguf_dtype)
    return 0


def _export_gguf(args, kind: str, dtype: str) -> None:
    from pathlib import Path

    from chatforge.chat.session import run_sampling_defaults
    from chatforge.eval.card import card_meta
    from chatforge.models.export import export_gguf

    meta = card_meta(args.run) if kind != "tiny" else {"name": "tiny"}
    sampling = run_sampling_defaults(args.run) or {}
    sampling.pop("source", None)
    sampling.pop("max_tokens", None)
    s, mf = export_gguf(args.run, args.gguf, dtype=dtype, overwrite=args.overwrite, meta=meta, sampling=sampling)
    note = f"; {len(s.fallbacks)} tensor(s) with rows not a multiple of 32 kept f16" if s.fallbacks else ""
    print(f"exported GGUF ({s.arch}, {s.dtype}, {s.tensors} tensors, {s.bytes / 2**20:.1f} MiB{note}): {s.path}")
    print(f"  Ollama Modelfile: {mf} (template, stop {', '.join(s.stop_tokens)}, defaults)")
    g = Path(args.gguf)
    print("  run it:")
    print(f"    llama.cpp:  llama-cli -m {g} -cnv             (chat in the terminal, the file's chat template)")
    print(f"                llama-server -m {g} --port 8080   (OpenAI-compatible API and web chat)")
    print(f"    Ollama:     cd {g.parent} && ollama create {g.stem} -f Modelfile && ollama run {g.stem}")
    print("    LM Studio:  import the .gguf file (My Models -> import)")
