#!/usr/bin/env bash
# A script of run/ (rcnn_cifar10.sh, lcacnn_*.sh, cifar_dictlearning.sh) data-parallel over two
# machines, one process per GPU. Run the same command on both; HOST:PORT is a free port on the
# first machine that the second can reach:
#   ENDPOINT=HOST:PORT run/torchrun_two_nodes.sh run/rcnn_cifar10.sh [extra flags]
# GPUS=N processes per machine (default: one per GPU); RDZV_ID names the job (same on both).
# Both machines need the dataset at --data-dir; rank 0 (on one of them) writes the run folder.
# The script's `python X.py ...` line is started by torchrun (an exported shell function).
set -euo pipefail
if [ $# -lt 1 ] || [ -z "${ENDPOINT:-}" ]; then
    echo "usage: ENDPOINT=HOST:PORT $0 run/SCRIPT.sh [flags]" >&2
    exit 2
fi
export GPUS="${GPUS:-$(nvidia-smi --list-gpus | wc -l)}" ENDPOINT RDZV_ID="${RDZV_ID:-ep-rcnn}"
python() {
    torchrun --nnodes 2 --nproc_per_node "$GPUS" --rdzv-backend c10d \
        --rdzv-endpoint "$ENDPOINT" --rdzv-id "$RDZV_ID" "$@"
}
export -f python
exec bash "$@"
