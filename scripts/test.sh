#!/usr/bin/env bash
# The whole test suite. Unit tests and the end-to-end suite on SQLite + in-process cache always; the
# end-to-end suite again on Postgres + Redis when PLINTH_TEST_DATABASE_URL and PLINTH_TEST_REDIS_URL are
# set (each test then creates its own schema in that database and its own Redis key prefix).
set -euo pipefail
cd "$(dirname "$0")/.."

production_mode=("${PLINTH_TEST_DATABASE_URL:-}" "${PLINTH_TEST_REDIS_URL:-}")

# NVIDIA's Triton HTTP client, used unchanged by a test to prove protocol compatibility.
clients="${PLINTH_CACHE_DIR:-$HOME/.cache/plinth}/venv-clients"
if ! "$clients/bin/python" -c 'import tritonclient.http' 2>/dev/null; then
  echo "== installing tritonclient[http] into $clients"
  rm -rf "$clients"
  python3 -m venv "$clients"
  "$clients/bin/pip" install -q "tritonclient[http]==2.73.*"
fi
export PLINTH_TEST_PYTHON="$clients/bin/python"

# The plugins the end-to-end tests publish, built as WebAssembly components.
"$(dirname "$0")/build-plugins.sh"

echo "== unit tests and end-to-end tests: SQLite + in-process cache"
env -u PLINTH_TEST_DATABASE_URL -u PLINTH_TEST_REDIS_URL cargo test --workspace --locked

if [ -n "${production_mode[0]}" ] && [ -n "${production_mode[1]}" ]; then
  echo "== end-to-end tests: Postgres + Redis"
  # The chaos test starts the `plinth` binary itself: make sure it is the current one.
  cargo build --locked -p plinth-server --bin plinth
  cargo test --locked -p plinth-tests --test integration
else
  echo "== Postgres + Redis skipped: set PLINTH_TEST_DATABASE_URL and PLINTH_TEST_REDIS_URL to run them"
fi
