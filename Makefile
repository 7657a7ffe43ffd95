# fedattn-vllm: `make demo` runs the main job (the server on the default model answering a
# multi-party request), `make test` runs every test (what CI runs); `make serve` keeps the server up.
# Both set up first (idempotent, cached under $FEDATTN_CACHE_DIR or ~/.cache/fedattn-vllm).
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY ?= error

.PHONY: setup demo serve test test-fast
setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

serve: setup
	$(PY) -m server

test: setup
	$(PY) -m pytest -m "slow or not slow"

test-fast: setup
	$(PY) -m pytest
