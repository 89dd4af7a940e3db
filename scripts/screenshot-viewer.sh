#!/usr/bin/env bash
# Screenshot of apps/view in a real browser: starts the viewer on OUTPUT (an infer output or a
# run directory), opens it in headless Chromium and saves a PNG. Not part of CI.
#
#   scripts/screenshot-viewer.sh OUTPUT [SCREENSHOT.png] [WIDTHxHEIGHT]
#
# Needs Chromium (Debian: `apt-get update && apt-get install -y chromium`). Run from the
# repository root.
set -euo pipefail

output=${1:?usage: scripts/screenshot-viewer.sh OUTPUT [SCREENSHOT.png] [WIDTHxHEIGHT]}
shot=${2:-viewer.png}
size=${3:-1600x900}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z $browser ]]; then
    echo "error: no Chromium found; install it (Debian: apt-get install -y chromium)" >&2
    exit 1
fi
port=$(uv run --no-sync python -c "from post3r_train.viewer import free_port; print(free_port())")
log=$(mktemp)
profile=$(mktemp -d)
uv run --no-sync apps/view "$output" --port "$port" >"$log" 2>&1 &
viewer=$!
cleanup() {
    kill "$viewer" 2>/dev/null || true
    wait "$viewer" 2>/dev/null || true
    rm -rf "$profile" "$log"
}
trap cleanup EXIT
for _ in $(seq 120); do  # wait for the address line (loading torch takes a while)
    grep -q "open http" "$log" && break
    kill -0 "$viewer" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 1
done
grep -q "open http" "$log" || { echo "error: the viewer did not start" >&2; cat "$log" >&2; exit 1; }
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --use-gl=swiftshader --enable-unsafe-swiftshader \
    --user-data-dir="$profile" --window-size="${size/x/,}" --virtual-time-budget=20000 \
    --screenshot="$(realpath -m "$shot")" "http://127.0.0.1:$port/" >/dev/null 2>&1
echo "saved $shot"
