# Sourced by the run/ scripts that start from a learnt dictionary: sets DICT_PATH (default
# dictionaries/CIFAR10/dictionary.pt) and stops with exit status 2 when there is no file there.
DICT_PATH="${DICT_PATH:-dictionaries/CIFAR10/dictionary.pt}"
if [ ! -f "$DICT_PATH" ]; then
    echo "error: no dictionary at $DICT_PATH; learn one first with run/cifar_dictlearning.sh" >&2
    exit 2
fi
