#!/usr/bin/env bash
# Hopfield-ResNet13 on CIFAR-10 (Elayedam & Srinivasan 2025) with the anchor's settings: centered
# EP (beta 0.1), 120 free / 50 nudged steps, batch 128, 300 epochs, SGD with Nesterov momentum
# 0.9, rate 3e-2 for every tensor, weight decay 2.5e-4, cosine over the 300 epochs to 2e-6,
# relu6, the anchor's gains in this project's synapse order (docs/models.md), flip + RandAugment
# (3 operations) + crop. The deviations from the anchor are listed in docs/models.md.
# Extra flags are appended to the command, e.g.: run/rescnn_cifar10.sh --device 1 --data-dir DIR
set -euo pipefail
cd "$(dirname "$0")/.."

GAINS=(0.6 0.6 0.7  0.6 0.6 0.7  0.6 0.6 0.7  0.6 0.6 0.7  0.8)
python main_fast.py --model ResCNN --task CIFAR10 --channels 128 256 512 512 --fc 10 \
    --act relu6 --loss mse --scale "${GAINS[@]}" --data-aug --randaugment 3 \
    --optim sgd --lrs 0.03 --wds 2.5e-4 --mmt 0.9 --nesterov \
    --lr-decay --lr-decay-epochs 300 --lr-min 2e-6 --epochs 300 \
    --alg EP --T1 120 --T2 50 --betas 0.0 0.1 --thirdphase --dynamics async --mbs 128 \
    --save "$@"
