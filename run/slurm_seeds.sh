#!/usr/bin/env bash
# One seed per task of a SLURM job array, each task in a run folder of its own that survives
# preemption and requeueing:
#
#   sbatch --array=0-2 run/slurm_seeds.sh RUNS_DIR python main_fast.py --model CNN ... --epochs 35
#
# Task i trains with --seed i (plus $SEED_OFFSET, default 0) in RUNS_DIR/seed_<seed>, with
# `--save --load-path RUNS_DIR/seed_<seed>` appended: the first start creates the run, every
# later start of the task (after a preemption or the time limit) resumes it from its last
# checkpoint, and a start after the last epoch exits 0 at once (docs/runs.md). SLURM sends
# SIGTERM to this script at a preemption and, with --signal=B:TERM@120, two minutes before the
# time limit; the script passes it on to the run, which saves its weights and exits 143, and
# then asks SLURM to requeue the task (scontrol requeue) and exits 143. Add #SBATCH lines for
# your cluster (partition, --gres=gpu:1, --time) or give them to sbatch. When every task has
# finished: python summarize_runs.py RUNS_DIR (mean +- std over the seeds, docs/runs.md).
#
# Without SLURM, one task runs by hand: SLURM_ARRAY_TASK_ID=1 bash run/slurm_seeds.sh RUNS ...
#SBATCH --job-name=ep-seeds
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%A_%a.out
set -uo pipefail

usage() {
    echo "usage: sbatch --array=0-2 run/slurm_seeds.sh RUNS_DIR COMMAND [ARG ...]" >&2
    exit 2
}
(($# >= 2)) || usage
runs_dir=$1
shift
if [[ ! ${SLURM_ARRAY_TASK_ID:-} =~ ^[0-9]+$ ]]; then
    echo "error: SLURM_ARRAY_TASK_ID is '${SLURM_ARRAY_TASK_ID:-}', not an array index:" \
        "submit with sbatch --array=0-2, or set it to run one task by hand" >&2
    exit 2
fi
for arg; do
    case $arg in
    --seed | --seed=* | --load-path | --load-path=* | --load_path | --load_path=*)
        echo "error: the command gives $arg; leave it out (each task sets --seed and" \
            "--load-path RUNS_DIR/seed_<seed>)" >&2
        exit 2
        ;;
    esac
done

seed=$((${SEED_OFFSET:-0} + SLURM_ARRAY_TASK_ID))
run_dir="$runs_dir/seed_$seed"
mkdir -p "$runs_dir" || exit 74
echo "task $SLURM_ARRAY_TASK_ID: seed $seed in $run_dir"

"$@" --seed "$seed" --save --load-path "$run_dir" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM
trap 'kill -INT "$child" 2>/dev/null' INT
while :; do  # a trapped signal ends `wait` early: wait again until the run has exited
    wait "$child"
    status=$?
    kill -0 "$child" 2>/dev/null || break
done

if ((status == 143)) && [[ -n ${SLURM_JOB_ID:-} ]]; then
    job="${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_$SLURM_ARRAY_TASK_ID"
    echo "stopped by SIGTERM: requeueing $job, which resumes from $run_dir"
    scontrol requeue "$job" || echo "warning: scontrol requeue $job failed; resubmit it" >&2
fi
exit "$status"
