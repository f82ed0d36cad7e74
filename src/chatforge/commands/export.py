"""``chatforge export``: write a trained model as a standalone Hugging Face directory.

    chatforge export RUN --merge-lora -o DIR [--dtype auto|fp32|bf16|fp16] [--overwrite]

``RUN`` is a run folder (its final model, else its newest checkpoint), a checkpoint, an
adapter or a model directory. ``--merge-lora`` folds a LoRA adapter into its base so DIR
loads with plain ``transformers`` (no peft); a full fine-tuning run is copied. DIR holds
the weights, the tokenizer with its chat template and the generation config.
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a run's model as a standalone HF directory (merging LoRA)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN", help="run folder, checkpoint, adapter or model directory")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--merge-lora", action="store_true",
                   help="merge a LoRA adapter into its base (default: copy the adapter as it is)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weight dtype of the export (auto = as trained)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from chatforge.models.export import export_model
    from chatforge.models.load import resolve

    kind = resolve(args.run).kind
    out = export_model(args.run, args.out, merge_lora=args.merge_lora, dtype=args.dtype, overwrite=args.overwrite)
    what = {"adapter": "merged model" if args.merge_lora else "adapter"}.get(kind, "model")
    print(f"exported {what}: {out}")
    return 0
