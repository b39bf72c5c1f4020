#!/usr/bin/env bash
# Everything CI checks, in the order CI checks it: install test needs, format, lints, build, tests.
# Needs ../shared/fixtures beside the checkout (or SWITCHYARD_FIXTURES).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all --check
# One build, with the CUDA backend compiled in (its libraries load at run time, so no toolkit or
# GPU is needed); every test runs on the CPU backend.
FEATURES=(--features switchyard/cuda)
cargo clippy --workspace --all-targets --locked "${FEATURES[@]}" -- -D warnings
# The cluster tests in tests/ run the real binary, which `cargo test` alone does not build.
cargo build --workspace --all-targets --locked "${FEATURES[@]}"
cargo test --workspace --locked "${FEATURES[@]}"
# The OpenAI-compatible API, through the official client and raw HTTP, against real servers.
"${SWITCHYARD_PYENV:-target/pyenv}/bin/python" -m pytest -q tests/python
