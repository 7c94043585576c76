# The few commands everyone runs. The README names the same ones.
.PHONY: build run test test-cluster test-deps lint fmt bench generate fuzz images

build:
	cargo build --release --workspace --bins

# Standalone proxy with the built-in mock model: API 127.0.0.1:8080, admin 127.0.0.1:9090.
run:
	cargo run --release -p modelgate-dataplane -- --config examples/standalone.yaml --log-format text

test:
	bash scripts/test.sh

# The chart's pods on a single-node cluster with a real kubelet (after `make test` in CI).
test-cluster:
	bash scripts/test-cluster.sh

test-deps:
	bash scripts/test-deps.sh

# Both container images FROM scratch (static binaries), as archives in target/images/.
images:
	bash scripts/images.sh

generate:
	cargo run -q -p modelgate-crds --bin crdgen

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --all-features -- -D warnings

fmt:
	cargo fmt --all

# Proxy overhead against nginx and going direct; see docs/benchmarks.md.
bench:
	bash scripts/bench.sh

# Each fuzz target for 10 minutes on its seeds (nightly toolchain; installs cargo-fuzz once).
fuzz:
	bash scripts/fuzz.sh 600
