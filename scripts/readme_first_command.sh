#!/usr/bin/env bash
# Run the README's first command (the first ```sh block under "Two commands for a fresh machine")
# as written, wait until the server it starts answers /v1/health, then stop it. Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=$(awk '/^## Two commands/{s=1} s&&/^```sh$/{getline; print; exit}' README.md)
[ -n "$cmd" ] || { echo "README: no first command found" >&2; exit 1; }
echo "README's first command: $cmd"
data=$(mktemp -d)
log="$data/serve.log"
LOREG_HOME="$data/home" setsid bash -c "$cmd" >"$log" 2>&1 &
pid=$!
stop() { kill -TERM -- "-$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$data"; }
trap stop EXIT
deadline=$((SECONDS + 900))
until python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v1/health', timeout=2)" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "the README's first command exited before its server answered:" >&2; tail -n 40 "$log" >&2; exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then echo "no answer on /v1/health within 900 s" >&2; tail -n 40 "$log" >&2; exit 1; fi
    sleep 1
done
echo "the README's first command serves: /v1/health answered"
