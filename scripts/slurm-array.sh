#!/usr/bin/env bash
# Score a large corpus as a SLURM job array of N shards, then merge them in a dependent job.
#
#   bash scripts/slurm-array.sh MODEL DATA OUT [N]
#   bash scripts/slurm-array.sh gpt2 my-corpus.jsonl results/gpt2-corpus 64
#
# Each array task runs `ppl-eval run --shard I/N` into OUT/shard-I: document d goes to shard d mod N,
# the same rule in every task, so no task talks to another or reads the corpus first. A task that is
# pre-empted or fails can simply be requeued (`scontrol requeue JOBID_I`): it resumes from the
# documents it already finished. When every task has succeeded, the merge job writes OUT/all,
# whose summary equals a single run over the whole corpus.
#
# Needs: ppl-eval installed in the environment the jobs see (activate it in ENV_SETUP), and the
# model and data reachable from every node (set HF_HUB_OFFLINE=1 once they are cached).
set -euo pipefail

MODEL=${1:?model}
DATA=${2:?data}
OUT=${3:?output directory}
SHARDS=${4:-16}
ENV_SETUP=${ENV_SETUP:-"source .venv/bin/activate"}
RUN_OPTIONS=${RUN_OPTIONS:-"--quiet"}  # e.g. "--quiet --window 2048 --stride 1024"

mkdir -p "$OUT/logs"

# One GPU per task; --requeue lets SLURM restart a pre-empted task, which then resumes.
array_job=$(sbatch --parsable \
  --job-name=ppl-eval \
  --array="0-$((SHARDS - 1))" \
  --gres=gpu:1 --cpus-per-task=8 --mem=32G --time=24:00:00 \
  --requeue \
  --output="$OUT/logs/shard-%a.log" \
  --wrap="$ENV_SETUP && ppl-eval run --model '$MODEL' --data '$DATA' $RUN_OPTIONS \
          --shard \${SLURM_ARRAY_TASK_ID}/$SHARDS -o \"$OUT/shard-\${SLURM_ARRAY_TASK_ID}\"")

# Runs only if every array task exited 0.
sbatch --parsable \
  --job-name=ppl-eval-merge \
  --dependency="afterok:$array_job" \
  --cpus-per-task=1 --mem=4G --time=1:00:00 \
  --output="$OUT/logs/merge.log" \
  --wrap="$ENV_SETUP && ppl-eval merge '$OUT'/shard-* -o '$OUT/all'"

echo "submitted array job $array_job ($SHARDS shards) and its merge; results in $OUT/all"
