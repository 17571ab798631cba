# The two commands a new user needs: `make run` and `make test`. See README.md.
# Build outputs live outside the checkout so fresh clones (and CI) reuse them.
CARGO_TARGET_DIR ?= $(HOME)/.cache/plinth/target
export CARGO_TARGET_DIR

.PHONY: run test lint bench openapi setup infra

## Start the platform in embedded mode (SQLite + in-process cache) on http://127.0.0.1:8080.
run: setup
	cargo run --release -p plinth-server --bin plinth -- serve

## Run the whole suite: unit tests, then the end-to-end tests on SQLite + memory, and again on
## Postgres + Redis when PLINTH_TEST_DATABASE_URL and PLINTH_TEST_REDIS_URL are set.
test: setup
	scripts/test.sh

## Validate infra/ (Helm chart, Dockerfile, compose file, Grafana dashboard) without a cluster.
infra:
	scripts/validate-infra.sh

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

## Benchmarks: metering overhead and ledger throughput (and Postgres + Redis with the variables
## above); inference throughput against ONNX Runtime in-process and a FastAPI baseline.
bench: setup
	scripts/bench-setup.sh
	cargo bench -p plinth-tests

## Regenerate the committed OpenAPI document after changing a route.
openapi:
	cargo run -q -p plinth-server --bin plinth -- openapi --output openapi/openapi.json

setup:
	@scripts/setup.sh
