#!/usr/bin/env bash
# A script of run/ (rcnn_cifar10.sh, lcacnn_*.sh, cifar_dictlearning.sh) data-parallel over the
# GPUs of this machine, one process per GPU:
#   run/torchrun_one_node.sh run/rcnn_cifar10.sh [extra flags]
# GPUS=N uses N processes (default: one per GPU). --mbs stays the global batch, split over them.
# The script's `python X.py ...` line is started by torchrun (an exported shell function).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 run/SCRIPT.sh [flags]" >&2; exit 2; }
export GPUS="${GPUS:-$(nvidia-smi --list-gpus | wc -l)}"
python() { torchrun --standalone --nproc_per_node "$GPUS" "$@"; }
export -f python
exec bash "$@"
