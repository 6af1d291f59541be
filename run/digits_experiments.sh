#!/usr/bin/env bash
# The digits figures of the README, offline on the CPU: EP vs BPTT on a small RCNN, its
# vector-field version with and without the same update, a longer augmented EP run, EP vs BPTT
# on a two-block ResCNN (and EP with fewer async steps), and the LCACNN with a pretrained,
# fine-tuned and learned dictionary; each with the seeds 0, 1 and 2
# (SEEDS="0" for one), behind one dictionary learnt with seed 0.
# Everything goes to results/digits_experiments (or $OUT); the summary of the runs over the
# seeds (summarize_runs.py: mean +- std per setting) ends the run.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-results/digits_experiments}"
read -r -a SEED_LIST <<< "${SEEDS:-0 1 2}"
COMMON=(--task DIGITS --act my_hard_sig --softmax --loss cel --T1 20 --T2 5 --betas 0.0 0.5
        --thirdphase --optim sgd --mmt 0.9 --device cpu --save --results-dir "$OUT")
RCNN=(--model CNN --kernels 3 3 --strides 1 1 --paddings 1 1 --pools mm --fc 10)
VFCNN=(--model VFCNN "${RCNN[@]:2}")
SMALL=(--channels 16 32 --lrs 0.05 0.03 0.02 --mbs 16 --epochs 15)
# the RCNN 16-32 settings on two residual blocks (7 weight tensors: u->a, a->b, u->b per block,
# then the readout): block 1 at 0.05, block 2 at 0.03, the readout at 0.02; gains of 2 (at the
# default 1 the second block's states stay near 0 and EP's signal with them)
RESCNN=(--model ResCNN --channels 16 32 --fc 10 --scale 2 --lrs 0.05 0.05 0.05 0.03 0.03 0.03
        0.02 --mbs 16 --epochs 15)

run() {  # run NAME ARGS...: one training run with the seed $seed, timed
    local name="$1, seed $seed"; shift
    echo "== $name"
    local start=$SECONDS
    python main_fast.py "${COMMON[@]}" --seed "$seed" "$@" | tail -n 1
    echo "$name: $((SECONDS - start)) s" >> "$OUT/times.txt"
}

mkdir -p "$OUT"
: > "$OUT/times.txt"
echo "== dictionary (16 features of 3x3, stride 1, on 30% of the training images)"
python cifar_dictlearning.py --task DIGITS --out-dir "$OUT/dictionary" --seed 0 \
    --lca_feats 16 --lca_ksize 3 --lca_stride 1 --lca_lambda 0.1 --lambda-every 0 \
    --lca_iters 100 --lca_eta 0.1 --epochs 10 --mbs 32 --subset-fraction 0.3 | tail -n 1
LCACNN=(--model LCACNN --dict-path "$OUT/dictionary/dictionary.pt" --lca_feats 16 --lca_ksize 3
        --lca_stride 1 --lca_lambda 0.1 --lca_iters 100 --lca_eta 0.01 --channels 16 32
        --kernels 3 --strides 1 --paddings 1 --pools im --fc 10 --lrs 0.5 0.2 --mbs 32
        --epochs 8)
for seed in "${SEED_LIST[@]}"; do
    run "RCNN 16-32, EP" "${RCNN[@]}" "${SMALL[@]}" --alg EP
    run "RCNN 16-32, BPTT" "${RCNN[@]}" "${SMALL[@]}" --alg BPTT
    run "VFCNN 16-32, EP" "${VFCNN[@]}" "${SMALL[@]}" --alg EP
    run "VFCNN 16-32, EP, same update" "${VFCNN[@]}" "${SMALL[@]}" --alg EP --same-update
    run "RCNN 32-64, EP, augmented, 30 epochs" "${RCNN[@]}" --channels 32 64 --lrs 0.1 0.05 0.02 \
        --mbs 32 --epochs 30 --data-aug --lr-decay --alg EP
    run "ResCNN 16-32, EP" "${RESCNN[@]}" --alg EP
    run "ResCNN 16-32, BPTT" "${RESCNN[@]}" --alg BPTT
    run "ResCNN 16-32, EP, async 10/3" "${RESCNN[@]}" --alg EP --dynamics async --T1 10 --T2 3
    for mode in pretrained finetune learn; do
        run "LCACNN, $mode" "${LCACNN[@]}" --alg EP --dict_training "$mode"
    done
done

cat "$OUT/times.txt"
echo
python summarize_runs.py "$OUT"
