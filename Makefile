# fedattn-vllm: `make demo` runs the main job, `make test` runs every test (what CI runs).
# Both set up first (idempotent, cached under $FEDATTN_CACHE_DIR or ~/.cache/fedattn-vllm).
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY ?= error

.PHONY: setup demo test test-fast
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m fedattn_vllm.demo

test: setup
	$(PY) -m pytest -m "slow or not slow"

test-fast: setup
	$(PY) -m pytest
