#!/usr/bin/env bash
# The main job, end to end: set up, serve configs/agg.yaml, ask it two questions with curl
# (non-streaming, then streaming), stop it. Port: $PORT (default 8000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh serve
PORT="${PORT:-8000}"
URL="http://127.0.0.1:$PORT"
LOG="$(mktemp -t servegrid-demo.XXXXXX.log)"

.venv/bin/servegrid serve -f configs/agg.yaml --Frontend.port="$PORT" >"$LOG" 2>&1 &
SERVE_PID=$!
stop() {
  kill -TERM "$SERVE_PID" 2>/dev/null || true
  wait "$SERVE_PID" 2>/dev/null || true
  echo "demo: servegrid stopped (log: $LOG)"
}
trap stop EXIT

echo "demo: waiting for $URL/health (the first run builds the tiny model)"
for _ in $(seq 1 120); do
  if curl -sf "$URL/health" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$SERVE_PID" 2>/dev/null; then echo "demo: servegrid exited:"; cat "$LOG"; exit 1; fi
  sleep 0.5
done
curl -sf "$URL/health" >/dev/null || { echo "demo: not healthy after 60s:"; cat "$LOG"; exit 1; }

echo; echo "\$ curl $URL/v1/models"
curl -s "$URL/v1/models"; echo

BODY='{"model": "servegrid/tiny-chat",
       "messages": [{"role": "user", "content": "In the heart of Eldoria, an ancient land of boundless magic, lies a forgotten city. Describe your explorer."}],
       "stream": false, "max_tokens": 30}'
echo; echo "\$ curl $URL/v1/chat/completions  (non-streaming)"
curl -s "$URL/v1/chat/completions" -H "Content-Type: application/json" -d "$BODY"; echo

echo; echo "\$ curl $URL/v1/chat/completions  (streaming)"
curl -sN "$URL/v1/chat/completions" -H "Content-Type: application/json" \
  -d "${BODY/\"stream\": false/\"stream\": true}"; echo
