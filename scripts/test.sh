#!/usr/bin/env bash
# Install the test dependencies into .venv-test and run the whole suite.
# The suite has its own environment, so it never disturbs the registry that the README's first
# command installed into .venv (and may still be running from there).
# It starts the real services it uses itself: a throwaway Postgres 15 cluster (initdb/pg_ctl on
# PATH; run as the `postgres` user when root) and moto's S3 server on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-test/bin/python ]; then
    "$PY" -m venv .venv-test
fi
. .venv-test/bin/activate
python -m pip install -q --upgrade pip
# torch before the test extra, pinned: this machine's package index serves 2.13.0 as a CPU wheel,
# while an unpinned or open-ended torch would resolve to a multi-GB CUDA build. Elsewhere take the
# CPU build from PyTorch's CPU wheel index (see the README).
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# vLLM pins an exact torch, so it cannot sit in the test extra: its wheel alone, without its GPU
# dependencies, is what the LoRA-resolver tests need (vllm.lora.resolver, vllm.plugins import with these)
python -m pip install -q --no-deps "vllm==0.34.0" msgspec packaging
# the web interface's browser tests drive Debian's Chromium through Playwright (Playwright's own
# browser download needs the internet); installed here when missing and this script runs as root
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "tests/web need Chromium: run 'sudo apt-get install -y chromium' (Debian/Ubuntu) first" >&2
    fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest -p no:cacheprovider "$@"
