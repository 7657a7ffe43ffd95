#!/usr/bin/env bash
# The cross-party recall frontier behind RESULTS.md, in priority order; resumable (finished runs are skipped).
# Key points on 250 cases, secondary ones on 100 (COUNT and COUNT_MINOR override); N = 2..6 and five kinds
# of fact are balanced over the cases. Figures and tables: python -m fedattn_vllm.eval plots
#   bash scripts/recall_sweeps.sh [baselines|key|wire|minor|six|question|large|all]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-evaluation/recall}
run() { ${DRY_RUN:+echo} .venv/bin/python -m fedattn_vllm.eval recall --resume --out "$OUT" --count "${COUNT:-250}" "$@"; }
PREFIX_HG1=(--generator-sync-interval 1 --public-prefix)

baselines() { run --mode centralised; run --mode alone; run -H 4; }
key() {  # the generator reads every layer, with the public prefix; others sync at H = 4 or 2; prefix off
  run -H 4 "${PREFIX_HG1[@]}"
  run -H 2 "${PREFIX_HG1[@]}"
  run -H 4 --generator-sync-interval 1
}
wire() {  # the bytes levers: quantised K/V on the wire, and the generator reading every 2nd layer
  for w in int8 int4 k4v2 int2; do run -H 2 "${PREFIX_HG1[@]}" --kv-wire "$w"; done
  for w in k4v2 int8 int4 int2; do run -H 4 --kv-wire "$w"; done  # the paper's mode with every encoding
  run -H 4 --generator-sync-interval 2 --public-prefix --kv-wire int8
}
minor() {  # the paper at other H, nobody but the generator reading, key-norm selection, the prefix alone
  for h in 2 8; do COUNT=${COUNT_MINOR:-100} run -H "$h"; done
  COUNT=${COUNT_MINOR:-100} run --placement explicit --sync-layers "" "${PREFIX_HG1[@]}"
  COUNT=${COUNT_MINOR:-100} run -H 2 "${PREFIX_HG1[@]}" --kv-share-ratio 0.5 --kv-selection key_norm
  COUNT=${COUNT_MINOR:-100} run -H 4 --public-prefix
}
question() {  # question-aware selection (the generators' queries choose the shared tokens) against key norms
  run -H 2 "${PREFIX_HG1[@]}" --kv-wire k4v2 --kv-share-ratio 0.25 --kv-selection question
  COUNT=${COUNT_MINOR:-100} run -H 2 "${PREFIX_HG1[@]}" --kv-wire k4v2 --kv-share-ratio 0.25 --kv-selection key_norm
}
six() {  # N = 6, the hardest N, on 200 of its own cases: centralised against the server's default, and every
  # layer synced with k4v2 (hg1 already publishes every layer: H=1 costs no more uploads, only reads)
  COUNT=${COUNT_SIX:-200} run --mode centralised -N 6
  COUNT=${COUNT_SIX:-200} run -H 2 "${PREFIX_HG1[@]}" --kv-wire k4v2 -N 6
  COUNT=${COUNT_SIX:-200} run -H 1 --public-prefix --kv-wire k4v2 -N 6
  run -H 1 --public-prefix --kv-wire k4v2
}
large() {  # the key points on qwen2.5-coder-1.5b-instruct (3x the CPU time): centralised, the earlier default (H=2),
  # the default (every layer synced), the paper's H=4
  local big=(--model qwen2.5-coder-1.5b-instruct)
  COUNT=${COUNT_LARGE:-100} run "${big[@]}" --mode centralised
  COUNT=${COUNT_LARGE:-100} run "${big[@]}" -H 2 "${PREFIX_HG1[@]}" --kv-wire k4v2
  COUNT=${COUNT_LARGE:-100} run "${big[@]}" -H 1 --public-prefix --kv-wire k4v2
  COUNT=${COUNT_LARGE:-100} run "${big[@]}" -H 4
}
all() { baselines; key; wire; minor; six; question; large; }
"${1:-all}"
