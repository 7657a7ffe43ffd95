#!/usr/bin/env bash
# Every run behind RESULTS.md, in priority order; resumable (finished runs are skipped).
# The defaults are what RESULTS.md ran: the headline on the whole test set (1319, in two shards),
# 300 problems for its key comparisons, 50-100 elsewhere (LIMIT overrides those), FIDELITY_LIMIT
# problems per fidelity sweep. Figures: python -m fedattn_vllm.eval plots
#   bash scripts/eval_sweeps.sh [headline|fidelity|attention|splits|interval|participants|placement|sparse|sparse_local|
#                                crossparty|participants_default|participants_wires|wires|wires_paper|large|grid|all]
# `grid` extends every accuracy point to 300 problems (every run is saved in evaluation/gsm8k, so --resume skips them all).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-evaluation/gsm8k}
FIDELITY_OUT=${FIDELITY_OUT:-evaluation/fidelity}
FIDELITY_LIMIT=${FIDELITY_LIMIT:-20}
ATTENTION_OUT=${ATTENTION_OUT:-evaluation/attention}
run() { ${DRY_RUN:+echo} .venv/bin/python -m fedattn_vllm.eval gsm8k --resume --out "$OUT" "$@"; }  # DRY_RUN=1: list
first_shard() { run "$@" --limit 100; }
second_shard() { run "$@" --offset 100 --limit 200; }
to300() { first_shard "$@" && second_shard "$@"; }  # 300 problems, as the two shards we ran

headline() {  # centralised, the default FedAttn point (4 shots, TokEx), and the question alone (0-shot)
  for nh in "1 1" "4 4"; do
    read -r n h <<< "$nh"
    run -N "$n" -H "$h" --limit 300 && run -N "$n" -H "$h" --offset 300 --limit 1019
  done
  run -N 1 -H 1 --shots 0 --limit 300
}
fidelity() {  # teacher-forced deviation / agreement / KL vs centralised, on the reference oracle
  for s in interval participants participants_tokag placement sparse split combined; do
    [ -f "$FIDELITY_OUT/$s.json" ] || .venv/bin/python -m fedattn_vllm.eval fidelity "$s" \
      --limit "$FIDELITY_LIMIT" --out "$FIDELITY_OUT"
  done
}
attention() {  # where the generator's attention goes, per layer
  [ -f "$ATTENTION_OUT/combined.json" ] || .venv/bin/python -m fedattn_vllm.eval attention combined --limit 10 \
    --out "$ATTENTION_OUT"
}
splits() { for s in TokAg SemAg SemEx; do run -N 4 -H 4 --split "$s" --limit "${LIMIT:-50}"; done; }
interval() { for h in 2 8 24; do run -N 4 -H "$h" --limit "${LIMIT:-100}"; done; }
participants() { for n in 1 2 4 6; do run -N "$n" -H 4 --shots 8 --limit "${LIMIT:-60}"; done; }
placement() {
  for p in front_half increasing decreasing; do run -N 4 -H 4 --placement "$p" --limit "${LIMIT:-100}"; done
  to300 -N 4 -H 4 --placement back_half
}
sparse() {
  for sel in random key_norm; do
    to300 -N 4 -H 4 --kv-share-ratio 0.5 --kv-selection "$sel"
    run -N 4 -H 4 --kv-share-ratio 0.2 --kv-selection "$sel" --limit "${LIMIT:-100}"
  done
  run -N 4 -H 4 --kv-share-ratio 0.5 --publisher-dense --limit "${LIMIT:-100}"
}
sparse_local() {  # the paper's sparse local computation ablation, on the engine: own tokens kept at every layer, in
  # the default mode (every layer synced, k4v2): at the paper's H=4 this model sits at the floor either way (lk0.9: 0/100)
  for ratio in 0.9 0.7 0.5 0.3 0.1; do
    run -N 4 -H 1 --kv-wire k4v2 --local-keep-ratio "$ratio" --limit "${LIMIT:-100}"
  done
  # the largest keys kept (key norm) rather than random ones: the attention sink's key is among them
  for ratio in 0.9 0.7 0.5 0.3; do
    run -N 4 -H 1 --kv-wire k4v2 --local-keep-ratio "$ratio" --kv-selection key_norm --limit "${LIMIT:-100}"
  done
}
crossparty() {  # the cross-party recall modes on GSM8K: the generator reads every layer, exact and 4/2-bit K/V
  for wire in native k4v2; do to300 -N 4 -H 2 --generator-sync-interval 1 --kv-wire "$wire"; done
  # the earlier default (H=2) on the rest of the test set, in shards of 200 (one batch of 1019 does not
  # fit beside anything else: every reading generator holds a second copy of its prompt's K/V)
  for offset in 300 500 700 900 1100; do
    run -N 4 -H 2 --generator-sync-interval 1 --kv-wire k4v2 --offset "$offset" --limit "$(( offset == 1100 ? 219 : 200 ))"
  done
  # everyone reading every layer with 4/2-bit K/V (the mode that meets the recall targets at every N; the server's
  # default since), in shards, to the whole test set
  for offset in 0 100 200; do run -N 4 -H 1 --kv-wire k4v2 --offset "$offset" --limit 100; done
  for offset in 300 500 700 900 1100; do
    run -N 4 -H 1 --kv-wire k4v2 --offset "$offset" --limit "$(( offset == 1100 ? 219 : 200 ))"
  done
}
participants_default() {  # N = 2..6 in the default mode (every layer synced, k4v2), the 4-shot prompt split N ways
  # (N=4 is the crossparty shard o0; centralised is the headline's N=1)
  for n in 2 6 3 5; do run -N "$n" -H 1 --kv-wire k4v2 --limit "${LIMIT:-100}"; done
}
participants_wires() {  # N = 2..6 with every layer synced and every other encoding (k4v2: participants_default), the
  # extremes of N first, so a partial run leaves whole rows
  for n in 2 6 3 5 4; do
    for wire in native int2 int8 int4; do run -N "$n" -H 1 --kv-wire "$wire" --limit "${LIMIT:-100}"; done
  done
}
wires() {  # every K/V encoding on the wire in the recall mode (H=2, the generator reading every layer), 300 problems
  # each as the crossparty shards: native and k4v2 are there; int8, int4 and int2 here (RESULTS.md's wire table)
  for wire in int8 int4 int2; do to300 -N 4 -H 2 --generator-sync-interval 1 --kv-wire "$wire"; done
}
wires_paper() {  # every K/V encoding in the paper's mode (H=4, no prefix); exact K/V there is the headline's N=4 H=4
  for wire in int8 k4v2 int4 int2; do run -N 4 -H 4 --kv-wire "$wire" --limit "${LIMIT:-100}"; done
}
large() {  # the key points on qwen2.5-coder-1.5b-instruct (3x the CPU time) in shards of 100, every point's shard
  # before any point's next: centralised, the default (every layer synced, k4v2), the paper's H=4
  local big=(--model qwen2.5-coder-1.5b-instruct)
  for offset in 0 100 200; do
    for point in "-N 1 -H 1" "-N 4 -H 1 --kv-wire k4v2" "-N 4 -H 4"; do
      # shellcheck disable=SC2086  # the point's words are separate arguments
      run "${big[@]}" $point --offset "$offset" --limit 100
    done
  done
}
grid() {  # the rest of the issue's accuracy grid, every point to 300 problems (shards extend the runs above)
  for h in 2 8 24; do run -N 4 -H "$h" --offset 100 --limit 200; done
  for h in 3 6 12; do to300 -N 4 -H "$h"; done
  for s in TokAg SemAg SemEx; do run -N 4 -H 4 --split "$s" --offset 50 --limit 250; done
  for n in 1 2 4 6; do run -N "$n" -H 4 --shots 8 --offset 60 --limit 240; done
  for n in 3 5; do to300 -N "$n" -H 4 --shots 8; done
  for p in front_half increasing decreasing; do run -N 4 -H 4 --placement "$p" --offset 100 --limit 200; done
  for sel in random key_norm; do
    second_shard -N 4 -H 4 --kv-share-ratio 0.2 --kv-selection "$sel"
    first_shard -N 4 -H 4 --kv-share-ratio 0.8 --kv-selection "$sel"
  done
  second_shard -N 4 -H 4 --kv-share-ratio 0.5 --publisher-dense
  for sel in random key_norm; do second_shard -N 4 -H 4 --kv-share-ratio 0.8 --kv-selection "$sel"; done
  # Below, every point's first shard runs before any second one, so a partial run leaves whole curves.
  for shard in first_shard second_shard; do
    for r in 0.3 0.1; do for sel in random key_norm; do "$shard" -N 4 -H 4 --kv-share-ratio "$r" --kv-selection "$sel"; done; done
  done
  for shard in first_shard second_shard; do  # the largest block last: every H for the other splits
    for s in TokAg SemAg SemEx; do for h in 2 3 6 8 12 24; do "$shard" -N 4 -H "$h" --split "$s"; done; done
  done
}

case "${1:-all}" in
  all) headline; fidelity; attention; interval; splits; placement; sparse; sparse_local; participants; crossparty
       participants_default; participants_wires; wires; wires_paper; large; grid ;;
  headline|fidelity|attention|splits|interval|participants|placement|sparse|sparse_local|crossparty|participants_default|\
  participants_wires|wires|wires_paper|large|grid)
    "$1" ;;
  *) echo "unknown phase: $1" >&2; exit 2 ;;
esac
