#!/usr/bin/env bash
# The two submissions in one: N shard tasks, then the merge once all of them succeeded.
#   experiments/slurm/submit.sh SPEC N [RESULTS]
# RESULTS defaults to results/<name> (the spec's `name`); extra sbatch options can be given
# in SBATCH_* environment variables (e.g. SBATCH_PARTITION, SBATCH_TIMELIMIT).
set -euo pipefail
SPEC=${1:?usage: submit.sh SPEC N [RESULTS]}
N=${2:?usage: submit.sh SPEC N [RESULTS]}
NAME=$(sed -n 's/^name *= *"\(.*\)".*/\1/p' "$SPEC" | head -n 1)
RESULTS=${3:-results/$NAME}
HERE=$(cd "$(dirname "$0")" && pwd)
jid=$(sbatch --parsable --array=0-$((N - 1)) "$HERE/shards.sbatch" "$SPEC")
mid=$(sbatch --parsable --dependency=afterok:"$jid" "$HERE/merge.sbatch" "$RESULTS")
echo "shards: job $jid (array 0-$((N - 1))); merge: job $mid, after all shards succeed -> $RESULTS"
