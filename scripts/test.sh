#!/usr/bin/env bash
# The whole test suite. Unit tests and the end-to-end suite on SQLite + in-process cache always; the
# end-to-end suite again on Postgres + Redis when PLINTH_TEST_DATABASE_URL and PLINTH_TEST_REDIS_URL are
# set (each test then creates its own schema in that database and its own Redis key prefix).
set -euo pipefail
cd "$(dirname "$0")/.."

production_mode=("${PLINTH_TEST_DATABASE_URL:-}" "${PLINTH_TEST_REDIS_URL:-}")

# NVIDIA's Triton HTTP client, used unchanged by a test to prove protocol compatibility;
# Schemathesis, which a test points at a running server with the committed OpenAPI document; and moto's
# S3-compatible server, the object storage the replica tests share.
clients="${PLINTH_CACHE_DIR:-$HOME/.cache/plinth}/venv-clients"
if ! "$clients/bin/python" -c 'import tritonclient.http, schemathesis, moto.server' 2>/dev/null; then
  echo "== installing tritonclient[http], schemathesis and moto into $clients"
  rm -rf "$clients"
  python3 -m venv "$clients"
  "$clients/bin/pip" install -q "tritonclient[http]==2.73.*" "schemathesis==4.32.*" "moto[server]==5.2.5"
fi
export PLINTH_TEST_PYTHON="$clients/bin/python"

# Models the end-to-end tests upload as hostile tenants would (tests/fixtures/make_models.py).
cache="${PLINTH_CACHE_DIR:-$HOME/.cache/plinth}"
fixtures="$cache/test-models"
venv="$cache/venv-models"
stamp=$(sha256sum tests/fixtures/make_models.py | cut -d' ' -f1)
if [ "$(cat "$fixtures/.inputs" 2>/dev/null)" != "$stamp" ]; then
  if ! "$venv/bin/python" -c 'import onnx, numpy, sentencepiece' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "onnx==1.23.2" "numpy>=2,<3" "sentencepiece==0.2.*" "protobuf>=5"
  fi
  "$venv/bin/python" tests/fixtures/make_models.py "$fixtures"
  echo "$stamp" > "$fixtures/.inputs"
fi

# The portal's browser tests: Debian's Chromium (browsers cannot be downloaded here) driven by
# playwright-core, with axe-core, from the npm registry at the versions tests/portal/package-lock.json pins.
if ! command -v "${CHROMIUM:-/usr/bin/chromium}" >/dev/null; then
  if [ "$(id -u)" = 0 ] || command -v sudo >/dev/null; then
    echo "== installing Debian's chromium for the portal's browser tests"
    as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "the portal's browser tests need Chromium: apt-get install chromium" >&2
    exit 1
  fi
fi
portal_stamp=$(sha256sum tests/portal/package-lock.json | cut -d' ' -f1)
if [ "$(cat tests/portal/node_modules/.inputs 2>/dev/null)" != "$portal_stamp" ]; then
  (cd tests/portal && npm ci --no-audit --no-fund --loglevel=error)
  echo "$portal_stamp" > tests/portal/node_modules/.inputs
fi

# The plugins the end-to-end tests publish, built as WebAssembly components.
"$(dirname "$0")/build-plugins.sh"

echo "== unit tests and end-to-end tests: SQLite + in-process cache"
env -u PLINTH_TEST_DATABASE_URL -u PLINTH_TEST_REDIS_URL cargo test --workspace --locked

if [ -n "${production_mode[0]}" ] && [ -n "${production_mode[1]}" ]; then
  echo "== end-to-end tests: Postgres + Redis"
  # The chaos test starts the `plinth` binary, the command line's test `plinth-cli`: make sure both
  # are current.
  cargo build --locked -p plinth-server --bin plinth
  cargo build --locked -p plinth-cli
  cargo test --locked -p plinth-tests --test integration
else
  echo "== Postgres + Redis skipped: set PLINTH_TEST_DATABASE_URL and PLINTH_TEST_REDIS_URL to run them"
fi
