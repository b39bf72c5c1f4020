#!/usr/bin/env bash
# Everything CI checks, in the order CI checks it: install test needs, format, lints, build, tests.
# Needs ../shared/fixtures beside the checkout (or SWITCHYARD_FIXTURES).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The cluster tests in tests/ run the real binary, which `cargo test` alone does not build.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked
# The OpenAI-compatible API, through the official client and raw HTTP, against real servers.
"${SWITCHYARD_PYENV:-target/pyenv}/bin/python" -m pytest -q tests/python
