#!/bin/bash
# Build MANIFEST on N Slurm array tasks, then merge:  pipelines/slurm/submit.sh MANIFEST OUT_ROOT N [flags...]
set -euo pipefail
manifest=$1; root=$2; n=$3; shift 3
here=$(cd "$(dirname "$0")" && pwd)
array=$(sbatch --parsable --array=0-$((n - 1)) "$here/build_array.sbatch" "$manifest" "$root" "$@")
sbatch --dependency=afterok:"$array" "$here/merge.sbatch" "$root" "$root/final"
echo "submitted build array $array ($n tasks); the merged build will be in $root/final"
