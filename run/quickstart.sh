#!/usr/bin/env bash
# Quick start, offline, a few minutes on 2 CPU cores, on scikit-learn's bundled 8x8 digits:
#   1. learn a 16-feature 3x3 LCA dictionary on 30% of the training images,
#   2. train an RCNN behind that (fixed) LCA layer with EP on the other 70%,
#   3. evaluate the best model again from its run folder.
# Everything goes to results/quickstart (or $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-results/quickstart}"
DICT_DIR="$OUT/dictionary"

echo "== 1/3: learning the LCA dictionary (DIGITS, 16 features of 3x3, stride 1)"
python cifar_dictlearning.py --task DIGITS --out-dir "$DICT_DIR" --seed 0 \
    --lca_feats 16 --lca_ksize 3 --lca_stride 1 --lca_lambda 0.1 --lambda-every 0 \
    --lca_iters 100 --lca_eta 0.1 --epochs 10 --mbs 32 --subset-fraction 0.3

echo "== 2/3: training the LCACNN (pretrained dictionary) with EP"
python main_fast.py --model LCACNN --task DIGITS --dict_training pretrained \
    --dict-path "$DICT_DIR/dictionary.pt" --lca_feats 16 --lca_ksize 3 --lca_stride 1 \
    --lca_lambda 0.1 --lca_iters 100 --channels 16 32 --kernels 3 --strides 1 --paddings 1 \
    --pools im --fc 10 --act my_hard_sig --alg EP --T1 20 --T2 5 --betas 0.0 0.5 --thirdphase \
    --loss cel --softmax --optim sgd --lrs 0.5 0.2 --mmt 0.9 --mbs 32 --epochs 8 --seed 1 \
    --device cpu --save --results-dir "$OUT"
RUN_DIR=$(ls -dt "$OUT"/DIGITS/EP/LCACNN/pretrained/*/run_* | head -n 1)

echo "== 3/3: evaluating the best model of $RUN_DIR"
REPORT=$(python main_fast.py --todo evaluate --load-path "$RUN_DIR")
echo "$REPORT"
TEST_ACC=$(echo "$REPORT" | sed -n 's/.*test_acc \([0-9.]*\).*/\1/p')

echo
echo "test accuracy: $TEST_ACC"
echo "plots: $RUN_DIR/*.png (accuracy, sparsity, reconstructions, ...)"
echo "dictionary: $DICT_DIR/dictionary.png"
