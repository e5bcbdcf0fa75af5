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
# Paths are relative to the current folder, as for the Python tools. A mistake or a write fault
# (read-only or full disk, a file where a folder should be) is one `error:` line on stderr, exit 2.
set -euo pipefail

PYTHON=${PYTHON:-python}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's package, without changing folder

die() { echo "error: $*" >&2; exit 2; }
cause() {  # "mkdir: cannot create directory 'x': No space left on device" -> "no space left on device"
  local text=${1%$'\n'}
  text=${text##*$'\n'}
  text=${text##*: }
  echo "${text,,}"
}

cfg="" weights="" input="" output="" shards="" gpus="${CUDA_VISIBLE_DEVICES-}"
while [[ $# -gt 0 ]]; do
  if [[ "$1" == --* && "$1" != --help && $# -lt 2 ]]; then
    die "option $1 needs a value (see $0 --help)"
  fi
  case "$1" in
    --cfg) cfg=$2; shift 2 ;;
    --weights) weights=$2; shift 2 ;;
    --input) input=$2; shift 2 ;;
    --output) output=$2; shift 2 ;;
    --shards) shards=$2; shift 2 ;;
    --gpus) gpus=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    --*) die "unknown option $1 (see $0 --help)" ;;
    *) break ;;
  esac
done
if [[ -z "$cfg" || -z "$weights" || -z "$input" || -z "$output" ]]; then
  die "--cfg, --weights, --input and --output are required (see $0 --help)"
fi
[[ -f "$weights" ]] || die "weights file not found: $weights"
IFS=',' read -r -a gpu_list <<< "$gpus"
workers=${#gpu_list[@]}
(( workers > 0 )) || { gpu_list=(""); workers=1; }
shards=${shards:-$workers}
[[ "$shards" =~ ^[1-9][0-9]*$ ]] || die "--shards must be a positive integer, got '$shards'"
output=${output%/}
[[ -n "$output" ]] || die "--output / is not a store folder; give a folder path"
shard_dir() { printf '%s.shards/shard_%04d_of_%04d' "$output" "$1" "$shards"; }

# The destination, checked before any work: the store and its .shards folder must be folders,
# and the first existing folder above them must be one.
for path in "$output" "$output.shards"; do
  if [[ -e "$path" && ! -d "$path" ]]; then die "--output: $path exists and is not a folder; choose another --output"; fi
done
above=$(dirname -- "$output")
while [[ ! -e "$above" && ! -L "$above" ]]; do above=$(dirname -- "$above"); done
[[ -d "$above" ]] || die "parent folder $above of --output $output is not a folder; choose another --output"
if ! msg=$(mkdir -p -- "$output.shards" 2>&1); then
  die "cannot create shard folder $output.shards: $(cause "$msg")"
fi
state=$(mktemp -d "${TMPDIR:-/tmp}/infer_sh.XXXXXX" 2>/dev/null) \
  || die "cannot create a temporary folder in ${TMPDIR:-/tmp} (set TMPDIR to a writable folder)"
trap 'rm -rf -- "$state"' EXIT

run_worker() {  # worker index w handles shards w+1, w+1+workers, ...; a failure is noted in $state/<k>
  local w=$1 k log msg rc
  for (( k = w + 1; k <= shards; k += workers )); do
    log="$(shard_dir "$k").log"
    if ! msg=$( { : > "$log"; } 2>&1 ); then
      printf '2\ncannot write shard log %s: %s\n' "$log" "$(cause "$msg")" > "$state/$k"; return 1
    fi
    rc=0
    CUDA_VISIBLE_DEVICES=${gpu_list[$w]} "$PYTHON" "$repo/tools/extract_features.py" --no-progress --cfg "$cfg" \
      TEST.WEIGHTS "$weights" INFER.INPUT "$input" INFER.OUTPUT "$(shard_dir "$k")" \
      INFER.TOTAL_NUM "$shards" INFER.CUT_NUM "$k" "${@:2}" > "$log" 2>&1 || rc=$?
    if (( rc != 0 )); then
      msg=$(grep '^error: ' "$log" 2>/dev/null | tail -n 1 || true)
      msg=${msg#error: }
      printf '%s\n%s (log: %s)\n' "$rc" "${msg:-exited with status $rc}" "$log" > "$state/$k"
      return 1
    fi
    echo "shard $k/$shards done"
  done
}

pids=()
for (( w = 0; w < workers; w++ )); do
  run_worker "$w" "$@" &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
if (( failed )); then
  first="" count=0 status=2
  for (( k = 1; k <= shards; k++ )); do
    [[ -f "$state/$k" ]] || continue
    { read -r rc; read -r msg; } < "$state/$k"
    (( rc == 2 )) || status=1  # a crash (a bug) keeps its own status
    count=$(( count + 1 ))
    [[ -n "$first" ]] || first="shard $k/$shards failed: $msg"
  done
  (( count < 2 )) || first+=" (and $(( count - 1 )) more)"
  echo "error: ${first:-a shard failed}; rerun the same command to redo only the missing shards" >&2
  exit "$status"
fi
all=()
for (( k = 1; k <= shards; k++ )); do all+=("$(shard_dir "$k")"); done
"$PYTHON" "$repo/tools/merge_features.py" "${all[@]}" --output "$output"
