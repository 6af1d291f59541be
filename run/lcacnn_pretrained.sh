#!/usr/bin/env bash
# RCNN behind an LCA layer whose pretrained dictionary stays fixed (seed README).
# Extra flags are appended to the command, e.g.: run/lcacnn_pretrained.sh --device 1 --data-dir DIR
# The dictionary comes from run/cifar_dictlearning.sh; DICT_PATH points elsewhere if needed.
set -euo pipefail
cd "$(dirname "$0")/.."

source run/need_dictionary.sh

python main_fast.py --model LCACNN --task CIFAR10 --data-aug --channels 64 256 512 --kernels 3 3 3 --pools immmm --strides 1 1 1 1 --paddings 1 1 1 1 --fc 10 --optim sgd --lrs 0.25 0.15 0.1 0.08 --wds 3e-4 3e-4 3e-4 3e-4 3e-4 --mmt 0.9 --lr-decay --epochs 120 --act my_hard_sig --todo train --T1 250 --T2 50 --mbs 128 --alg EP --betas 0.0 0.5 --scale 0.5 --thirdphase --loss cel --softmax --save --seed 2 --lca_feats 64 --lca_lambda 0.25 --lca_tau 100 --lca_eta 0.05 --lca_iters 600 --lca_stride 2 --lca_ksize 9 --dict_training pretrained --dict-path "$DICT_PATH" "$@"
