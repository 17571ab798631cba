#!/usr/bin/env bash
# Builds every plugin in plugins/ into a WebAssembly component and copies each, with its manifest, to
# $PLINTH_CACHE_DIR/plugins/<name>.wasm and <name>.json: Rust crates for wasm32-wasip2, Python apps
# (app.py) with componentize-py, JavaScript modules (app.js) with componentize-js.
#
# With rustup and `rustup target add wasm32-wasip2` this is a plain cargo build. Where rustup has no
# wasm target (offline mirrors), Debian's rustc-web toolchain (1.96, with std sources) builds std for
# the target itself; the packages are installed when missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/../plugins"
cache="${PLINTH_CACHE_DIR:-$HOME/.cache/plinth}"
out="$cache/plugins"
target_dir="$cache/plugins-target"
mkdir -p "$out"

if rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  CARGO_TARGET_DIR="$target_dir/rustup" cargo build -q --release --target wasm32-wasip2
  built="$target_dir/rustup/wasm32-wasip2/release"
else
  if [ ! -x /usr/bin/cargo ] || [ ! -d /usr/lib/wasm32-wasi ] || ! command -v ld.lld-22 >/dev/null 2>&1; then
    packages=(rustc-web cargo-web rust-web-src rust-web-llvm lld-22 wasi-libc)
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "== installing the wasm toolchain: ${packages[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
    else
      echo "No wasm32-wasip2 target: run \`rustup target add wasm32-wasip2\`, or install ${packages[*]} (Debian)." >&2
      exit 1
    fi
  fi
  # Debian's toolchain with its own cargo home and target dir, so it never mixes with the host build.
  env -u RUSTUP_TOOLCHAIN -u CARGO -u RUSTC -u RUSTDOC -u CARGO_TARGET_DIR \
    PATH=/usr/bin:/bin CARGO_HOME="$cache/cargo-web" RUSTC_BOOTSTRAP=1 \
    RUSTFLAGS="-C link-self-contained=no -L native=/usr/lib/wasm32-wasi" \
    /usr/bin/cargo build -q --release -Zbuild-std=std,panic_abort --target wasm32-wasip2 \
    --target-dir "$target_dir/debian"
  built="$target_dir/debian/wasm32-wasip2/release"
fi

for dir in templates/rust examples/* testing/*; do
  [ -f "$dir/Cargo.toml" ] || continue
  manifest="$dir/plugin.json"
  name=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["name"])' "$manifest")
  crate=$(basename "$dir")
  [ "$dir" = templates/rust ] && crate=hello
  cp "$built/${crate//-/_}.wasm" "$out/$name.wasm"
  cp "$manifest" "$out/$name.json"
done

# Python plugins (an app.py beside plugin.json), with componentize-py in its own virtualenv.
venv="$cache/venv-plugins"
if ! "$venv/bin/componentize-py" --version >/dev/null 2>&1; then
  echo "== installing componentize-py into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "componentize-py==0.25.*"
fi
for app in templates/python/app.py examples/*/app.py; do
  dir=$(dirname "$app")
  name=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["name"])' "$dir/plugin.json")
  cp "$dir/plugin.json" "$out/$name.json"
  # Rebuilding takes ~15 s: only when the source or the world changed.
  if [ ! "$out/$name.wasm" -nt "$app" ] || [ ! "$out/$name.wasm" -nt wit/0.1.0/plugin.wit ]; then
    (cd "$dir" && "$venv/bin/componentize-py" -d ../../wit/0.1.0 -w plinth:plugin/plugin@0.1.0 \
      componentize app -o "$out/$name.wasm" >/dev/null)
  fi
done
# JavaScript plugins (an app.js beside plugin.json), with componentize-js (StarlingMonkey) from npm.
componentize_js_version=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["devDependencies"]["@bytecodealliance/componentize-js"])' templates/js/package.json)
node_tools="$cache/node-plugins"
componentize_js="$node_tools/node_modules/.bin/componentize-js"
if [ "$("$componentize_js" --version 2>/dev/null)" != "$componentize_js_version" ]; then
  echo "== installing componentize-js $componentize_js_version into $node_tools"
  mkdir -p "$node_tools"
  npm install --prefix "$node_tools" --no-audit --no-fund --loglevel=error \
    "@bytecodealliance/componentize-js@$componentize_js_version"
fi
for app in templates/js/app.js examples/*/app.js; do
  [ -f "$app" ] || continue
  dir=$(dirname "$app")
  name=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["name"])' "$dir/plugin.json")
  cp "$dir/plugin.json" "$out/$name.json"
  if [ ! "$out/$name.wasm" -nt "$app" ] || [ ! "$out/$name.wasm" -nt wit/0.1.0/plugin.wit ]; then
    "$componentize_js" "$app" --wit wit/0.1.0 --world-name plugin --disable http fetch-event \
      -o "$out/$name.wasm" >/dev/null
  fi
done

echo "plugins built into $out: $(cd "$out" && ls *.wasm | tr '\n' ' ')"
