#!/usr/bin/env bash
# The seed's CIFAR-10 commands with the recommended fast settings: asynchronous (odd/even) steps,
# and phases that stop as soon as max |s_t - s_(t-1)| < 1e-4, the seed's T1 = 250 and T2 = 50
# kept as caps (see the README, "Fewer steps"). results.csv then holds the steps each phase took.
# Usage: run/cifar10_fast.sh rcnn|pretrained|finetune|learn [extra flags, e.g. --device 1]
# TOL=1e-3 loosens the tolerance; extra flags come last and win (e.g. --T1 100 --T2 25).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
    rcnn) script=run/rcnn_cifar10.sh ;;
    pretrained | finetune | learn) script="run/lcacnn_$1.sh" ;;
    *)
        echo "usage: run/cifar10_fast.sh rcnn|pretrained|finetune|learn [extra flags]" >&2
        exit 2
        ;;
esac
shift
exec bash "$script" --dynamics async --tol "${TOL:-1e-4}" "$@"
