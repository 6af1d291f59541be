#!/usr/bin/env bash
# Vector-field RCNN on CIFAR-10 with --same-update: forward and backward weights get the average
# of their two EP updates, so they align over training (Laborieux et al. 2021).
# Extra flags are appended to the command, e.g.: run/vfcnn_cifar10_same_update.sh --device 1
set -euo pipefail
cd "$(dirname "$0")/.."

python main_fast.py --model VFCNN --task CIFAR10 --data-aug --channels 128 256 512 512 --kernels 3 3 3 3 --pools mmmm --strides 1 1 1 1 --paddings 1 1 1 0 --fc 10 --optim sgd --lrs 0.25 0.15 0.1 0.08 0.05 --wds 3e-4 3e-4 3e-4 3e-4 3e-4 --mmt 0.9 --lr-decay --epochs 120 --act my_hard_sig --todo train --T1 250 --T2 30 --mbs 128 --alg EP --betas 0.0 1.0 --thirdphase --same-update --loss cel --softmax --save "$@"
