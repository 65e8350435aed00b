# hasten's two set-up commands. Both run install/bootstrap.sh first (idempotent, cached outside the clone).
#   make demo   2-process training run through `hasten launch` (CPU, or GPUs where present), then installs
#               the Jupyter kernel and runs notebooks/quickstart.ipynb through it
#   make test   formatting, lints, docs, then every test (Rust, its doc examples, then the kernel's
#               Jupyter tests)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
ENV = source "$$(./install/bootstrap.sh)"

.PHONY: demo test build

build:
	@$(ENV); cargo build --workspace --bins --examples

demo:
	@$(ENV); cargo build --quiet -p hasten_launch --bin hasten && cargo build --quiet -p hasten-examples --example train_demo; \
	procs=2; gpus=$$(find /proc/driver/nvidia/gpus -mindepth 1 -maxdepth 1 2>/dev/null | wc -l || true); \
	if [ "$$gpus" -ge 2 ]; then device=""; else device="--cpu"; fi; \
	echo "hasten launch --num_processes $$procs $$device train_demo"; \
	"$$CARGO_TARGET_DIR/debug/hasten" launch --num_processes $$procs $$device --main_process_port 0 "$$CARGO_TARGET_DIR/debug/examples/train_demo"; \
	cargo build --quiet -p hasten-kernel; \
	"$$CARGO_TARGET_DIR/debug/hasten-kernel" install --user; \
	"$$CARGO_TARGET_DIR/debug/hasten-kernel" warm; \
	"$$HASTEN_PYTHON" notebooks/run.py notebooks/quickstart.ipynb

test:
	@$(ENV); set -x; \
	cargo fmt --all --check; \
	cargo clippy --workspace --all-targets --locked -- -D warnings; \
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet; \
	cargo build --workspace --bins --examples --locked; \
	cargo nextest run --workspace --locked --no-fail-fast; \
	cargo test --workspace --doc --locked --quiet; \
	"$$CARGO_TARGET_DIR/debug/hasten-kernel" warm; \
	"$$HASTEN_PYTHON" -m pytest tests/kernel -q
