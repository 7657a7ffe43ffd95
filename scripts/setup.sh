#!/usr/bin/env bash
# Idempotent set-up: a cached venv with the CPU build of vLLM, this checkout installed
# editable into it (linked as .venv), and the default + tiny test models provisioned.
# Re-running is cheap: dependencies are reinstalled only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${FEDATTN_CACHE_DIR:-$HOME/.cache/fedattn-vllm}"
VENV="$CACHE/venv"
PYTHON="${PYTHON:-python3}"
# Pulled in by vLLM as CUDA builds that break `import transformers` on CPU; text models need none.
UNWANTED="torchvision torchaudio torchcodec"

mkdir -p "$CACHE"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv in $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip "setuptools>=77" wheel
fi

stamp="$VENV/.fedattn-deps"  # "<hash of pyproject.toml and this script> <extras>" of the last install
# The extras installed last stay unless FEDATTN_EXTRAS says otherwise: a CUDA venv is never turned back into a CPU one.
EXTRAS="${FEDATTN_EXTRAS:-$(cut -s -d' ' -f2 "$stamp" 2>/dev/null || true)}"
EXTRAS="${EXTRAS:-cpu,dev}"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing dependencies (.[$EXTRAS]); first run takes a few minutes"
  "$VENV/bin/python" -m pip install --quiet --no-build-isolation -e ".[$EXTRAS]"
  "$VENV/bin/python" -m pip uninstall --quiet -y $UNWANTED 2>/dev/null || true
  echo "$want" > "$stamp"
else
  # Same dependencies: only point the editable install at this checkout.
  "$VENV/bin/python" -m pip install --quiet --no-build-isolation --no-deps -e .
fi
ln -sfn "$VENV" .venv

.venv/bin/python -m fedattn_vllm.models provision ${FEDATTN_MODELS:-default tiny-qwen2 tiny-llama} >/dev/null
echo "[setup] ready: .venv -> $VENV; models in $CACHE/models"
