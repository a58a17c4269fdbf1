#!/usr/bin/env bash
# Install NVRTC (the `nvidia-cuda-nvrtc` 13.0.x wheel from PyPI) into <repo>/.tools/nvrtc
# when the machine does not already have libnvrtc, and print the library directory to put on
# LD_LIBRARY_PATH.
#
# Idempotent: a second run finds the installed library and does nothing.
#
# Usage:
#   scripts/install-nvrtc.sh            # prints the lib dir on its last line of stdout
#   export LD_LIBRARY_PATH="$(scripts/install-nvrtc.sh | tail -n1):$LD_LIBRARY_PATH"
#
# Environment:
#   NVRTC_WHEEL=/path/to/nvidia_cuda_nvrtc-13.0.88-*.whl  install from a local wheel (offline)
#   NVRTC_FORCE_LOCAL=1   install into .tools/nvrtc even when a system libnvrtc is found
#   PYTHON=python3        the interpreter whose pip is used
set -euo pipefail

VERSION="13.0.88"
PACKAGE="nvidia-cuda-nvrtc==${VERSION}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${REPO_ROOT}/.tools/nvrtc"
LIB_DIR="${TARGET}/nvidia/cu13/lib"
PYTHON="${PYTHON:-python3}"

log() { echo "install-nvrtc: $*" >&2; }

# 1. Already installed locally?
if [[ -e "${LIB_DIR}/libnvrtc.so.13" && -e "${LIB_DIR}/libnvrtc-builtins.so.13.0" ]]; then
    log "found ${LIB_DIR}/libnvrtc.so.13 (already installed)"
    echo "${LIB_DIR}"
    exit 0
fi

# 2. Already on the system (loader cache or LD_LIBRARY_PATH)?
if [[ "${NVRTC_FORCE_LOCAL:-0}" != "1" ]]; then
    found=""
    if command -v ldconfig >/dev/null 2>&1; then
        found="$(ldconfig -p 2>/dev/null | awk '/libnvrtc\.so\.13 /{print $NF; exit}')"
    fi
    if [[ -z "${found}" ]]; then
        IFS=':' read -r -a dirs <<<"${LD_LIBRARY_PATH:-}"
        for d in "${dirs[@]}" /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
            if [[ -n "${d}" && -e "${d}/libnvrtc.so.13" ]]; then
                found="${d}/libnvrtc.so.13"
                break
            fi
        done
    fi
    if [[ -n "${found}" ]]; then
        log "system NVRTC found at ${found}; nothing to install"
        dirname "${found}"
        exit 0
    fi
fi

# 3. Install the wheel into .tools/nvrtc.
if ! "${PYTHON}" -m pip --version >/dev/null 2>&1; then
    log "error: ${PYTHON} -m pip is not available; install python3-pip (or set PYTHON)"
    exit 1
fi
mkdir -p "${TARGET}"
src="${PACKAGE}"
if [[ -n "${NVRTC_WHEEL:-}" ]]; then
    src="${NVRTC_WHEEL}"
    log "installing ${src} into ${TARGET}"
else
    log "installing ${PACKAGE} from PyPI into ${TARGET} (about 110 MB)"
fi
"${PYTHON}" -m pip install --quiet --no-deps --disable-pip-version-check --root-user-action=ignore \
    --upgrade --target "${TARGET}" "${src}" >&2

if [[ ! -e "${LIB_DIR}/libnvrtc.so.13" ]]; then
    log "error: ${LIB_DIR}/libnvrtc.so.13 missing after install; the wheel layout changed?"
    find "${TARGET}" -name 'libnvrtc*' >&2 || true
    exit 1
fi
log "installed; put ${LIB_DIR} on LD_LIBRARY_PATH"
echo "${LIB_DIR}"
