#!/usr/bin/env bash
# Pretrain the LCA dictionary as in the original run: 64 features of 3x9x9 at stride 2 on a
# random half of CIFAR-10 (its indices are saved so EP training can use the other half),
# lambda 0.2 raised by 0.1 every 35 // 7 = 5 epochs, 600 LCA iterations, tau 100, eta 0.01,
# batches of 200, 35 epochs. Writes ./dictionaries/CIFAR10/{dictionary.pt, subset_indices.pt,
# dictlearning.csv, dictionary.png, dictlearning_curves.png, dictlearning_state.pt}. Run again after
# an interruption to continue from the last finished epoch (add --fresh to start over).
# Extra arguments are passed on, e.g.: run/cifar_dictlearning.sh --device cuda:1 --data-dir /data
set -euo pipefail
cd "$(dirname "$0")/.."

python cifar_dictlearning.py \
    --task CIFAR10 \
    --data-dir ./data \
    --out-dir ./dictionaries/CIFAR10 \
    --seed 0 \
    --lca_feats 64 \
    --lca_ksize 9 \
    --lca_stride 2 \
    --lca_lambda 0.2 \
    --lambda-increment 0.1 \
    --lambda-every 5 \
    --lca_iters 600 \
    --lca_tau 100 \
    --lca_eta 1e-2 \
    --mbs 200 \
    --epochs 35 \
    --subset-fraction 0.5 \
    "$@"
