#!/usr/bin/env bash
# Every run behind RESULTS.md, in priority order; resumable (finished runs are skipped).
# HEADLINE_LIMIT / LIMIT set the problems per accuracy run (the full test set is 1319); OFFSET
# shards a run; FIDELITY_LIMIT the problems per fidelity sweep. Figures: python -m fedattn_vllm.eval plots
#   bash scripts/eval_sweeps.sh [headline|fidelity|splits|interval|participants|placement|sparse|all]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-evaluation/gsm8k}
FIDELITY_OUT=${FIDELITY_OUT:-evaluation/fidelity}
FIDELITY_LIMIT=${FIDELITY_LIMIT:-20}
HEADLINE_LIMIT=${HEADLINE_LIMIT:-300}
LIMIT=${LIMIT:-100}
OFFSET=${OFFSET:-0}
run() { .venv/bin/python -m fedattn_vllm.eval gsm8k --resume --out "$OUT" --offset "$OFFSET" "$@"; }

headline() {  # centralised baseline and the default FedAttn point (4 shots, TokEx)
  run -N 1 -H 1 --limit "$HEADLINE_LIMIT"
  run -N 4 -H 4 --limit "$HEADLINE_LIMIT"
}
fidelity() {  # teacher-forced deviation / agreement / KL vs centralised, on the reference oracle
  for s in interval participants participants_tokag placement sparse split combined; do
    [ -f "$FIDELITY_OUT/$s.json" ] || .venv/bin/python -m fedattn_vllm.eval fidelity "$s" \
      --limit "$FIDELITY_LIMIT" --offset "$OFFSET" --out "$FIDELITY_OUT"
  done
}
splits() { for s in TokAg SemAg SemEx; do run -N 4 -H 4 --split "$s" --limit "$LIMIT"; done; }
interval() { for h in 2 8 24; do run -N 4 -H "$h" --limit "$LIMIT"; done; }
participants() { for n in 1 2 4 6; do run -N "$n" -H 4 --shots 8 --limit "$LIMIT"; done; }
placement() { for p in front_half back_half increasing decreasing; do run -N 4 -H 4 --placement "$p" --limit "$LIMIT"; done; }
sparse() {
  for r in 0.5 0.2; do
    for sel in random key_norm; do run -N 4 -H 4 --kv-share-ratio "$r" --kv-selection "$sel" --limit "$LIMIT"; done
  done
}

case "${1:-all}" in
  all) headline; fidelity; interval; splits; placement; sparse; participants ;;
  headline|fidelity|splits|interval|participants|placement|sparse) "$1" ;;
  *) echo "unknown phase: $1" >&2; exit 2 ;;
esac
