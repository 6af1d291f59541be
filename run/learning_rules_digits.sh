#!/usr/bin/env bash
# The learning-rules tables of docs/learning_rules.md: the digits RCNN 16-32 at the README's
# digits settings (15 epochs, batch 16, T1 20, T2 5, lrs 0.05 0.03 0.02, my_hard_sig, SGD
# momentum 0.9), trained by every rule. Table 1: MSE on the output units (no readout), where
# every rule applies. Table 2: the softmax readout (cross-entropy), for the rules that allow it.
# One run at a time; SEEDS="0 1 2" for three seeds (default 0), TABLES="mse" for the first
# table only. A run already finished (its final_model.pt written) is kept, so the script picks
# up where an interrupted one stopped. Everything goes to results/learning_rules_digits (or
# $OUT); a summary table (mean +- std over seeds) ends the run.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-results/learning_rules_digits}"
SEEDS="${SEEDS:-0}"
TABLES="${TABLES:-mse softmax}"
COMMON=(--task DIGITS --model CNN --channels 16 32 --kernels 3 3 --strides 1 1 --paddings 1 1
        --pools mm --fc 10 --act my_hard_sig --T1 20 --T2 5 --optim sgd --mmt 0.9
        --lrs 0.05 0.03 0.02 --mbs 16 --epochs 15 --device cpu --save)
MSE=(--loss mse)
SOFTMAX=(--loss cel --softmax)

run() {  # run TABLE LABEL SEED ARGS...: one training run into $OUT/TABLE/LABEL/seed_SEED
    local table=$1 label=$2 seed=$3; shift 3
    local dir="$OUT/$table/$label/seed_$seed"
    if [ -n "$(find "$dir" -name final_model.pt 2>/dev/null)" ]; then
        echo "== $table, $label, seed $seed: done before"
        return
    fi
    rm -rf "$dir"  # an interrupted run's folder: it starts again
    echo "== $table, $label, seed $seed"
    python main_fast.py "${COMMON[@]}" --seed "$seed" --results-dir "$dir" "$@" | tail -n 1
}

mkdir -p "$OUT"
for table in $TABLES; do
    for seed in $SEEDS; do
        if [ "$table" = mse ]; then LOSS=("${MSE[@]}"); else LOSS=("${SOFTMAX[@]}"); fi
        run "$table" "EP one-sided" "$seed" "${LOSS[@]}" --alg EP --betas 0.0 0.5
        run "$table" "EP random sign" "$seed" "${LOSS[@]}" --alg EP --betas 0.0 0.5 --random-sign
        run "$table" "EP symmetric" "$seed" "${LOSS[@]}" --alg EP --betas 0.0 0.5 --thirdphase
        run "$table" "BPTT" "$seed" "${LOSS[@]}" --alg BPTT
        run "$table" "RBP" "$seed" "${LOSS[@]}" --alg RBP
        if [ "$table" = mse ]; then
            run "$table" "CL" "$seed" "${LOSS[@]}" --alg CL
            run "$table" "CpL eta 0.5" "$seed" "${LOSS[@]}" --alg CpL --cpl-eta 0.5
        fi
    done
done

echo
python - "$OUT" <<'PY'
import statistics
import sys
from pathlib import Path

from experiment import runs

root = Path(sys.argv[1])
for table in ("mse", "softmax"):
    if not (root / table).is_dir():
        continue
    print(f"\n{table}: rule | best test acc. | final test acc. | time per run (s) | seeds")
    for rule_dir in sorted(p for p in (root / table).iterdir() if p.is_dir()):
        best, final, seconds = [], [], []
        for run_dir in runs.find_runs(rule_dir):
            rows = runs.read_results(run_dir)
            best.append(100 * max(row["test_acc"] for row in rows))
            final.append(100 * rows[-1]["test_acc"])
            seconds.append(sum(row["seconds"] for row in rows))

        def show(values, digits=1):
            if len(values) == 1:
                return f"{values[0]:.{digits}f}"
            return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"

        print(f"{rule_dir.name} | {show(best)}% | {show(final)}% | {show(seconds, 0)} | {len(best)}")
PY
