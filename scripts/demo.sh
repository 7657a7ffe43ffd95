#!/usr/bin/env bash
# The main job: start the OpenAI-compatible server on the embedded default model, answer a
# multi-party request (examples/one_call.py) through it, then stop it. `make serve` keeps it up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PORT=${FEDATTN_DEMO_PORT:-$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOG=$(mktemp -t fedattn-server.XXXXXX.log)
echo "[demo] starting: python -m server --port $PORT (log: $LOG)"
$PY -m server --port "$PORT" --parent-pid $$ >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then break; fi
  if ! kill -0 $SERVER 2>/dev/null; then echo "[demo] the server exited:"; tail -20 "$LOG"; exit 1; fi
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "[demo] server not ready"; tail -20 "$LOG"; exit 1; }
echo "[demo] server ready on http://127.0.0.1:$PORT/v1"
$PY examples/one_call.py --base-url "http://127.0.0.1:$PORT/v1"
