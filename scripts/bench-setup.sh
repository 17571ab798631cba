#!/usr/bin/env bash
# The Python baseline for `make bench`: FastAPI + onnxruntime in its own virtualenv.
set -euo pipefail
venv="${PLINTH_CACHE_DIR:-$HOME/.cache/plinth}/venv-bench"
if ! "$venv/bin/python" -c 'import fastapi, uvicorn, onnxruntime, tokenizers' 2>/dev/null; then
  echo "== installing the FastAPI baseline into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q fastapi uvicorn "onnxruntime==1.31.1" tokenizers numpy
fi
