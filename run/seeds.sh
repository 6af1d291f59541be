#!/usr/bin/env bash
# The same command once per seed, one after the other, on this machine:
#
#   bash run/seeds.sh 0 1 2 -- python main_fast.py --model CNN --task DIGITS ... --save
#
# Each run gets `--seed S` appended, unless the command gives --seed itself; `{seed}` in any
# argument is replaced by the seed (e.g. `--load-path runs/cnn_seed{seed}`, one folder each).
# A seed whose run fails is reported and the next one runs; Ctrl-C or SIGTERM (status 130 /
# 143) stops here. Exits 0 when every seed succeeded, else with the first failure's status.
# Then: python summarize_runs.py RESULTS_DIR (mean +- std over the seeds).
set -uo pipefail

usage() {
    echo "usage: bash run/seeds.sh SEED [SEED ...] -- COMMAND [ARG ...]" >&2
    exit 2
}

seeds=()
while (($#)) && [[ $1 != -- ]]; do
    [[ $1 =~ ^[0-9]+$ ]] || { echo "error: seed '$1' is not a non-negative integer" >&2; usage; }
    seeds+=("$1")
    shift
done
(($# >= 2)) && ((${#seeds[@]})) || usage
shift  # the --
command=("$@")

gives_seed=0
for arg in "${command[@]}"; do
    [[ $arg == --seed || $arg == --seed=* ]] && gives_seed=1
done

first_failure=0
for seed in "${seeds[@]}"; do
    argv=("${command[@]//\{seed\}/$seed}")
    ((gives_seed)) || argv+=(--seed "$seed")
    echo "== seed $seed: ${argv[*]}"
    "${argv[@]}"
    status=$?
    if ((status == 130 || status == 143)); then
        echo "seed $seed stopped (status $status); seeds after it not run" >&2
        exit "$status"
    fi
    if ((status != 0)); then
        echo "seed $seed failed with status $status" >&2
        ((first_failure)) || first_failure=$status
    fi
done
exit "$first_failure"
