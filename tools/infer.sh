#!/usr/bin/env bash
# Sharded feature extraction over several GPUs, then one merge (like the original infer.sh).
#
#   tools/infer.sh --cfg CFG --weights W --input SRC --output DIR [--shards N] [--gpus 0,1,2,3] [KEY VALUE ...]
#
# The input is cut into N contiguous shards (INFER.TOTAL_NUM N, INFER.CUT_NUM k); each GPU of
# --gpus works through its share of the shards one after another (CUDA_VISIBLE_DEVICES set per
# process). Shard k is written to DIR.shards/shard_000k_of_000N; a shard that is already complete
# for the same model, input and settings is skipped, so rerunning after a failure redoes only
# what is missing. When every shard is complete they are merged into DIR.
# Without GPUs, --gpus "" runs the shards one after another on the CPU.
# Extra KEY VALUE pairs go to every extraction (e.g. INFER.SCALES "[0.7071, 1.0, 1.4142]").
set -euo pipefail

PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."
cfg="" weights="" input="" output="" shards="" gpus="${CUDA_VISIBLE_DEVICES-}"
while [[ $# -gt 0 ]]; do
  if [[ "$1" == --* && "$1" != --help && $# -lt 2 ]]; then
    echo "error: option $1 needs a value (see $0 --help)" >&2; exit 2
  fi
  case "$1" in
    --cfg) cfg=$2; shift 2 ;;
    --weights) weights=$2; shift 2 ;;
    --input) input=$2; shift 2 ;;
    --output) output=$2; shift 2 ;;
    --shards) shards=$2; shift 2 ;;
    --gpus) gpus=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    --*) echo "error: unknown option $1 (see $0 --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ -z "$cfg" || -z "$weights" || -z "$input" || -z "$output" ]]; then
  echo "error: --cfg, --weights, --input and --output are required (see $0 --help)" >&2; exit 2
fi
[[ -f "$weights" ]] || { echo "error: weights file not found: $weights" >&2; exit 2; }
IFS=',' read -r -a gpu_list <<< "$gpus"
workers=${#gpu_list[@]}
(( workers > 0 )) || { gpu_list=(""); workers=1; }
shards=${shards:-$workers}
[[ "$shards" =~ ^[1-9][0-9]*$ ]] || { echo "error: --shards must be a positive integer, got '$shards'" >&2; exit 2; }
output=${output%/}
shard_dir() { printf '%s.shards/shard_%04d_of_%04d' "$output" "$1" "$shards"; }
mkdir -p "$output.shards"

run_worker() {  # worker index w handles shards w+1, w+1+workers, ...
  local w=$1 k
  for (( k = w + 1; k <= shards; k += workers )); do
    CUDA_VISIBLE_DEVICES=${gpu_list[$w]} "$PYTHON" tools/extract_features.py --no-progress --cfg "$cfg" \
      TEST.WEIGHTS "$weights" INFER.INPUT "$input" INFER.OUTPUT "$(shard_dir "$k")" \
      INFER.TOTAL_NUM "$shards" INFER.CUT_NUM "$k" "${@:2}" > "$(shard_dir "$k").log" 2>&1 \
      || { echo "shard $k failed: see $(shard_dir "$k").log" >&2; return 1; }
    echo "shard $k/$shards done"
  done
}

pids=()
for (( w = 0; w < workers; w++ )); do
  run_worker "$w" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
if (( status != 0 )); then
  echo "error: some shards failed; rerun the same command to redo only those" >&2
  exit 1
fi
all=()
for (( k = 1; k <= shards; k++ )); do all+=("$(shard_dir "$k")"); done
"$PYTHON" tools/merge_features.py "${all[@]}" --output "$output"
