#!/usr/bin/env bash
# The main job, from a fresh machine: make sure NVRTC is there (installed from PyPI into
# .tools/ when missing; no GPU needed), then build and run the quickstart example, which runs
# a layer on the GPU when one is present and otherwise on the CPU reference backend, and says
# which.
set -euo pipefail
cd "$(dirname "$0")/.."
if nvrtc_dir=$(scripts/install-nvrtc.sh); then
  export LD_LIBRARY_PATH="${nvrtc_dir}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
  echo "quickstart: NVRTC could not be installed; kernels will not be compiled" >&2
fi
exec cargo run --release --example quickstart "$@"
