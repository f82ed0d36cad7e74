# The two commands of the README's first screen. Each one sets itself up first.
.PHONY: setup demo test bench
setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/chatforge pipeline recipes/demo.yaml

test: setup
	.venv/bin/python -m pytest -q tests

bench: setup
	.venv/bin/python -m pip install -q --no-deps "trl==1.16.0"  # --no-deps: never let TRL move torch/transformers
	.venv/bin/python bench/generate.py
