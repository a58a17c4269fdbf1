#!/usr/bin/env bash
# Run the `attn bench`es on a GPU machine and write each one's JSON, SVG chart and log under
# OUT (the machine needs the driver, the CUDA 13 libraries, python3 with torch; for the API
# overhead column, Nsight Compute's `ncu`):
#
#   bench-all.sh OUT [SECTION ...]        default sections: prefill decode layer
#
#   prefill            attn bench prefill  -> OUT/prefill.{json,svg,log}
#   backward           attn bench backward -> OUT/backward.{json,svg,log}, then
#                      attn bench backward --layer -> OUT/backward-layer.{json,svg,log}
#                      (not a default section)
#   backward-variants  the kernels' rows again for the other fused kernels, without PyTorch:
#                      ATTN_BWD_SM90_SCHEDULE=2 and =4 (the Hopper kernel's other schedules,
#                      where a head dim has them) -> OUT/backward-s2.{json,svg,log} and
#                      OUT/backward-s4.{...}, and ATTN_DISABLE_SM90=1 (the sm80 kernels)
#                      -> OUT/backward-sm80.{json,svg,log}
#                      (not a default section; compare with the backward section's "ours")
#   decode             attn bench decode   -> OUT/decode.{json,svg,log}
#   layer              attn bench layer, every preset          -> OUT/layer.{json,svg,log}
#   layer:P1[,P2]      only those presets (llama3-8b, llama3.2-1b) -> OUT/layer-P1[-P2].{...}
#   parallel           attn bench parallel (Llama-3-8B at TP = 1 and 2, CP = 2 per exchange,
#                      over NCCL, 32k-128k tokens)                                 -> OUT/parallel.{json,svg,log}
#                      (not a default section; needs 2 GPUs and libnccl.so on
#                      LD_LIBRARY_PATH, else the TP = 2 rows are n/a with a note)
#
# The layer sections run twice: first under ncu with --profile-once (each call once; the
# report in OUT/<name>.ncu-rep, its kernels' device times as CSV in OUT/<name>.ncu.csv, the
# case names in OUT/<name>.manifest, ncu's and attn's output in OUT/<name>.profile.log),
# then the timing run against PyTorch, which reads the CSV and the manifest and reports per
# call the kernel sum and the overhead (call - kernels) / call. Without ncu (NCU=none, or not found) the timing run
# alone runs and the overhead column stays empty.
#
# Environment: ATTN (the attn binary; default bin/attn beside this script, as in
# gpu-bundle/, else target/release/attn), NCU (default: `ncu` on PATH, else
# /usr/local/cuda/bin/ncu), LAYER_ARGS / PREFILL_ARGS / BACKWARD_ARGS / BACKWARD_LAYER_ARGS /
# DECODE_ARGS / PARALLEL_ARGS (extra arguments, word split, e.g. LAYER_ARGS="--cases prefill,decode
# --batches 1,16", PARALLEL_ARGS="--train").
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: bench-all.sh OUT [prefill] [backward] [backward-variants] [decode] [layer[:PRESETS]] [parallel] ...}"
shift
mkdir -p "$out"
if [ -x "$here/bin/attn" ]; then
  attn_default="$here/bin/attn"
else
  attn_default="${CARGO_TARGET_DIR:-$here/../target}/release/attn"
fi
ATTN="${ATTN:-$attn_default}"
NCU="${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}"
read -r -a layer_args <<<"${LAYER_ARGS:-}"
read -r -a prefill_args <<<"${PREFILL_ARGS:-}"
read -r -a decode_args <<<"${DECODE_ARGS:-}"
read -r -a backward_args <<<"${BACKWARD_ARGS:-}"
read -r -a backward_layer_args <<<"${BACKWARD_LAYER_ARGS:-}"
read -r -a parallel_args <<<"${PARALLEL_ARGS:-}"
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(prefill decode layer)
status=0
stamp() { echo "==> [$(date +%T)] $*" >&2; }

for s in "${sections[@]}"; do
  start=$SECONDS
  case "$s" in
    prefill)
      stamp "attn bench prefill"
      "$ATTN" bench prefill --sdpa-script "$here/bench_sdpa.py" --json "$out/prefill.json" \
        "${prefill_args[@]}" 2>&1 | tee "$out/prefill.log" || status=1
      ;;
    backward)
      stamp "attn bench backward"
      "$ATTN" bench backward --sdpa-script "$here/bench_sdpa.py" --json "$out/backward.json" \
        "${backward_args[@]}" 2>&1 | tee "$out/backward.log" || status=1
      stamp "attn bench backward --layer"
      "$ATTN" bench backward --layer --torch-script "$here/bench_layer.py" \
        --json "$out/backward-layer.json" "${backward_layer_args[@]}" 2>&1 |
        tee "$out/backward-layer.log" || status=1
      ;;
    backward-variants)
      for sched in 2 4; do
        stamp "attn bench backward, sm90 schedule $sched"
        ATTN_BWD_SM90_SCHEDULE=$sched "$ATTN" bench backward --sdpa-script none \
          --json "$out/backward-s$sched.json" "${backward_args[@]}" 2>&1 |
          tee "$out/backward-s$sched.log" || status=1
      done
      stamp "attn bench backward, sm80 kernels"
      ATTN_DISABLE_SM90=1 "$ATTN" bench backward --sdpa-script none \
        --json "$out/backward-sm80.json" "${backward_args[@]}" 2>&1 |
        tee "$out/backward-sm80.log" || status=1
      ;;
    decode)
      stamp "attn bench decode"
      "$ATTN" bench decode --sdpa-script "$here/bench_sdpa.py" --json "$out/decode.json" \
        "${decode_args[@]}" 2>&1 | tee "$out/decode.log" || status=1
      ;;
    layer | layer:*)
      presets="${s#layer}"
      presets="${presets#:}"
      if [ -n "$presets" ]; then
        name="layer-${presets//,/-}"
        preset_args=(--presets "$presets")
      else
        name="layer"
        preset_args=()
      fi
      ncu_args=()
      if [ "$NCU" != "none" ] && [ -x "$NCU" ]; then
        stamp "ncu: attn bench layer --profile-once ($name)"
        rm -f "$out/$name.ncu.csv" "$out/$name.manifest" "$out/$name.ncu-rep"
        if "$NCU" --export "$out/$name" --force-overwrite --metrics gpu__time_duration.sum \
          --cache-control none --clock-control none --profile-from-start off \
          "$ATTN" bench layer "${preset_args[@]}" --profile-once "$out/$name.manifest" \
          "${layer_args[@]}" >"$out/$name.profile.log" 2>&1 &&
          "$NCU" --import "$out/$name.ncu-rep" --csv >"$out/$name.ncu.csv" 2>>"$out/$name.profile.log"; then
          ncu_args=(--ncu-csv "$out/$name.ncu.csv" --ncu-manifest "$out/$name.manifest")
        else
          echo "ncu profile failed (see $out/$name.profile.log); timing without kernel sums" >&2
          tail -5 "$out/$name.profile.log" >&2
          status=1
        fi
        stamp "ncu pass done in $((SECONDS - start)) s"
      else
        echo "no ncu ($NCU): timing without kernel sums" >&2
      fi
      stamp "attn bench layer ($name)"
      "$ATTN" bench layer "${preset_args[@]}" --torch-script "$here/bench_layer.py" \
        --json "$out/$name.json" "${ncu_args[@]}" "${layer_args[@]}" 2>&1 | tee "$out/$name.log" || status=1
      ;;
    parallel)
      stamp "attn bench parallel"
      "$ATTN" bench parallel --json "$out/parallel.json" "${parallel_args[@]}" 2>&1 |
        tee "$out/parallel.log" || status=1
      ;;
    *)
      echo "unknown section $s (prefill, backward, backward-variants, decode, layer, layer:PRESETS, parallel)" >&2
      status=1
      continue
      ;;
  esac
  stamp "$s done in $((SECONDS - start)) s"
done
ls -la "$out" >&2
exit $status
