#!/usr/bin/env bash
# The cross-party recall frontier behind RESULTS.md, in priority order; resumable (finished runs are skipped).
# 250 cases per point (COUNT overrides), N = 2..6 and five kinds of fact balanced over them. Figures and
# tables: python -m fedattn_vllm.eval plots
#   bash scripts/recall_sweeps.sh [baselines|generator|wire|paper|selection|all]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-evaluation/recall}
run() { ${DRY_RUN:+echo} .venv/bin/python -m fedattn_vllm.eval recall --resume --out "$OUT" --count "${COUNT:-250}" "$@"; }

baselines() { run --mode centralised; run --mode alone; }
generator() {  # the generator reads every H_g layers; public prefix on/off; the others sync at S or never
  run -H 4 --generator-sync-interval 1 --public-prefix
  run -H 2 --generator-sync-interval 1 --public-prefix
  run -H 4 --generator-sync-interval 1
  run --placement explicit --sync-layers "" --generator-sync-interval 1 --public-prefix
  run -H 4 --generator-sync-interval 2 --public-prefix
  run -H 4 --public-prefix
}
wire() { run -H 4 --generator-sync-interval 1 --public-prefix --kv-wire int8; }
paper() { for h in 4 2 8; do run -H "$h"; done; }  # the paper's semantics (no public prefix)
selection() {
  for r in 0.5 0.25; do run -H 4 --generator-sync-interval 1 --public-prefix --kv-share-ratio "$r" --kv-selection key_norm; done
}
all() { baselines; run -H 4; generator; wire; paper; selection; }
"${1:-all}"
