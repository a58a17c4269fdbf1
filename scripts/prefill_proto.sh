#!/usr/bin/env bash
# Run scripts/prefill_proto.py once per CUBIN (a faulting kernel cannot poison the others'
# context). Usage: scripts/prefill_proto.sh CUBIN_DIR OUT_DIR [extra args]
dir=$1; out=$2; shift 2
mkdir -p "$out"
for f in "$dir"/*.cubin; do
  k=$(basename "$f" .cubin)
  python3 "$(dirname "$0")/prefill_proto.py" "$dir" --filter "$k" --exact "$@" > "$out/$k.log" 2>&1
  echo "== $k rc=$?"; grep -E "FAIL|TIME|Error|error" "$out/$k.log" | head -8
done
