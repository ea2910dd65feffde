#!/usr/bin/env bash
# Install the test dependencies into .venv and run the whole suite.
# The suite starts the real services it uses itself: a throwaway Postgres 15 cluster
# (initdb/pg_ctl on PATH; run as the `postgres` user when root) and moto's S3 server on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# the pinned CPU wheel first: an unpinned torch would pull a multi-GB CUDA build
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest -p no:cacheprovider "$@"
