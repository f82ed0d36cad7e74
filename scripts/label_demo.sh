#!/usr/bin/env bash
# Rank answers yourself: 4 SmolLM2 samples for each of the first 20 demo prompts, in the browser.
#   bash scripts/label_demo.sh [OUT_DIR]        # then open http://127.0.0.1:8008/
# The first start samples the 80 candidates (measured on a shared 2-core AMD EPYC at load 9: 16
# answers of <= 128 tokens per 6 min; an idle machine is much faster) and saves them to
# OUT_DIR/rankings.candidates.jsonl; later starts reuse them and continue where you stopped.
# Afterwards:  chatforge rm --model smollm2 --data OUT_DIR/rankings.jsonl --out runs/rm-human --loss kwise
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/label-demo}"
py=".venv/bin/python"; [ -x "$py" ] || py=python
exec "$py" -m chatforge label src/chatforge/data/demo/prompts.jsonl --model smollm2 --k 4 \
  --limit 20 --max-tokens 96 --out "$out/rankings.jsonl" --port "${PORT:-8008}"
