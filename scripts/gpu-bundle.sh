#!/usr/bin/env bash
# Build the GPU test binaries and the `attn` binary (with its bench) here, into gpu-bundle/
# (git-ignored, at most 64 MiB), with a runner that executes them on a machine that has a
# GPU, the driver and CUDA 13 libraries but no cargo.
#
#   scripts/gpu-bundle.sh [TEST_NAME_REGEX]     default: ^gpu_  (tests/gpu_*.rs)
#   # then, on the GPU machine, from the repo root:
#   gpu-bundle/run.sh [extra test args]         every bundled test with --include-ignored
#
# Integration tests that are bundled are the ones whose file name matches the regex; the
# library unit tests of attention-runtime are always included. See CONTRIBUTING.md.
set -euo pipefail
cd "$(dirname "$0")/.."
pattern="${1:-^gpu_}"
out=gpu-bundle
rm -rf "$out"
mkdir -p "$out/bin"

echo "==> building test binaries (profile gpu)" >&2
# Packages whose tests are built: the runtime and the root package (its gpu_backend_seam runs a
# generated struct on both backends). GPU_BUNDLE_PACKAGES="-p a -p b" to change; --workspace
# builds every crate's tests, which is slow on a small machine.
packages="${GPU_BUNDLE_PACKAGES:--p attention-runtime -p attention}"
# shellcheck disable=SC2086
cargo test $packages --profile gpu --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, re, sys
pat = re.compile(sys.argv[1])
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    name = m["target"]["name"]; kind = m["target"]["kind"][0]
    if (kind == "test" and pat.search(name)) or (kind == "lib" and name == "attention_runtime"):
        print(name, m["executable"])
' "$pattern" | while read -r name exe; do
    cp "$exe" "$out/bin/test-$name"
  done

echo "==> building attn (profile gpu)" >&2
# The binary needs attention-runtime's `cli` feature (the test build above has it on too,
# through the crate's dev-dependency on itself, so the library is not rebuilt).
cargo build -p attention-runtime --profile gpu --features cli --bin attn --quiet
cp "${CARGO_TARGET_DIR:-target}/gpu/attn" "$out/bin/attn"
if [ "${GPU_BUNDLE_EXAMPLES:-1}" = "1" ]; then
  echo "==> building the quickstart and generate examples (profile gpu)" >&2
  cargo build --profile gpu --example quickstart --example generate --quiet
  cp "${CARGO_TARGET_DIR:-target}/gpu/examples/quickstart" "${CARGO_TARGET_DIR:-target}/gpu/examples/generate" "$out/bin/"
fi
cp scripts/bench_sdpa.py scripts/bench_layer.py scripts/bench-all.sh "$out/"
# all-MiniLM-L6-v2's attention tensors (14 MB; the whole model is 87 MB) for gpu_minilm.rs.
if minilm_dir=$(scripts/install-minilm.sh | tail -n1); then
  python3 scripts/minilm_golden.py attention-only --model-dir "$minilm_dir" --out "$out/minilm" >&2
else
  echo "gpu-bundle: all-MiniLM-L6-v2 could not be installed; gpu_minilm will fail" >&2
fi

cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Run every bundled test binary with --include-ignored (GPU tests included). Extra arguments
# go to each test binary (e.g. a name filter, --nocapture).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export ATTN_REPO_ROOT="${ATTN_REPO_ROOT:-$(dirname "$here")}"
export ATTN_BIN="${ATTN_BIN:-$here/bin/attn}"
status=0
for t in "$here"/bin/test-*; do
  echo "==> $(basename "$t")"
  "$t" --include-ignored --test-threads=1 "$@" || status=1
done
exit $status
RUN
chmod +x "$out/run.sh"
du -sh "$out" >&2
ls "$out/bin" >&2
# The device tool carries at most 64 MiB with the working tree: ship the bundle compressed
# (carry gpu-bundle-pack, then `tar xzf gpu-bundle-pack/gb.tgz` there; see CONTRIBUTING.md).
mkdir -p gpu-bundle-pack
tar czf gpu-bundle-pack/gb.tgz "$out"
size=$(du -sm gpu-bundle-pack/gb.tgz | cut -f1)
echo "gpu-bundle-pack/gb.tgz: ${size} MiB" >&2
if [ "$size" -gt 52 ]; then
  echo "gpu-bundle-pack/gb.tgz is ${size} MiB: with the working tree it would pass the 64 MiB transfer limit" >&2
  exit 1
fi
