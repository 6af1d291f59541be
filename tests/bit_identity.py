"""Bit-identity check, run by hand (pytest does not collect it): a restructuring must leave every
saved run as it was. It runs a fixed set of short digits runs in two checkouts and compares what
they saved.

    python tests/bit_identity.py --base main          # this tree against a git revision
    python tests/bit_identity.py run TREE OUT         # the runs of checkout TREE, into OUT
    python tests/bit_identity.py compare OUT_A OUT_B  # two folders written by ``run``

The runs use the README's digits flags at ``--epochs 2``: CNN EP with ``--data-aug --lr-decay``,
LCACNN ``finetune`` and ``pretrained``, VFCNN ``--same-update``, CNN BPTT, CNN
``--dynamics async --tol 1e-4``, CNN EP ``--random-sign`` (one-sided), ResCNN EP on ``--loss mse``,
and a 2-epoch dictionary (which the LCACNN runs start from).
Every process runs one torch thread, so both trees sum in the same order.

Two outputs are identical when they hold the same files (run folders matched by their place,
not their date or number) and
- every tensor in every ``.pt`` file is equal under ``torch.equal`` (same dtype, shape, values),
  found by the same key path; the non-tensor parts of a file are not compared, since a
  restructuring may rename what describes a run without changing the run; the saved states of
  Python's and numpy's global generators, which dictionary learning never seeds, differ between
  any two runs and are left out;
- ``results.csv`` and ``dictlearning.csv`` are equal row by row without their seconds columns.
Figures and text files are not compared (their bytes carry matplotlib's and the path's details).
Exit status: 0 when every run is identical, 1 otherwise; one line per run is printed.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 900  # seconds any one command may take

COMMON = ["--task", "DIGITS", "--act", "my_hard_sig", "--softmax", "--loss", "cel", "--T1", "20",
          "--T2", "5", "--betas", "0.0", "0.5", "--thirdphase", "--optim", "sgd", "--mmt", "0.9",
          "--seed", "0", "--device", "cpu", "--save", "--epochs", "2"]  # fmt: skip
RCNN = ["--model", "CNN", "--kernels", "3", "3", "--strides", "1", "1", "--paddings", "1", "1",
        "--pools", "mm", "--fc", "10", "--channels", "16", "32", "--lrs", "0.05", "0.03", "0.02",
        "--mbs", "16"]  # fmt: skip
VFCNN = ["--model", "VFCNN", *RCNN[2:]]
# a ResCNN on the output units' MSE (no softmax readout, linear output layer): its own flags
RESCNN = ["--model", "ResCNN", "--task", "DIGITS", "--channels", "4", "6", "--fc", "10", "--act",
          "relu6", "--loss", "mse", "--lrs", "0.02", "--T1", "6", "--T2", "3", "--betas", "0",
          "0.2", "--thirdphase", "--mbs", "64", "--optim", "sgd", "--mmt", "0.9", "--seed", "0",
          "--device", "cpu", "--save", "--epochs", "2"]  # fmt: skip
DICTIONARY = ["--task", "DIGITS", "--seed", "0", "--lca_feats", "16", "--lca_ksize", "3",
              "--lca_stride", "1", "--lca_lambda", "0.1", "--lambda-every", "0", "--lca_iters",
              "100", "--lca_eta", "0.1", "--epochs", "2", "--mbs", "32", "--subset-fraction",
              "0.3"]  # fmt: skip
LCACNN = ["--model", "LCACNN", "--lca_feats", "16", "--lca_ksize", "3", "--lca_stride", "1",
          "--lca_lambda", "0.1", "--lca_iters", "100", "--lca_eta", "0.01", "--channels", "16",
          "32", "--kernels", "3", "--strides", "1", "--paddings", "1", "--pools", "im", "--fc",
          "10", "--lrs", "0.5", "0.2", "--mbs", "32"]  # fmt: skip

# name -> flags of main_fast.py (the dictionary's path is added to the LCACNN runs)
TRAINING_RUNS = {
    "cnn_ep_aug_decay": [*COMMON, *RCNN, "--alg", "EP", "--data-aug", "--lr-decay"],
    "lcacnn_finetune": [*COMMON, *LCACNN, "--alg", "EP", "--dict_training", "finetune"],
    "lcacnn_pretrained": [*COMMON, *LCACNN, "--alg", "EP", "--dict_training", "pretrained"],
    "vfcnn_same_update": [*COMMON, *VFCNN, "--alg", "EP", "--same-update"],
    "cnn_bptt": [*COMMON, *RCNN, "--alg", "BPTT"],
    "cnn_async_tol": [*COMMON, *RCNN, "--alg", "EP", "--dynamics", "async", "--tol", "1e-4"],
    "cnn_ep_random_sign": [
        *[f for f in COMMON if f != "--thirdphase"],
        *RCNN,
        "--alg",
        "EP",
        "--random-sign",
    ],
    "rescnn_mse": [*RESCNN, "--alg", "EP"],
}
CSV_FILES = ("results.csv", "dictlearning.csv")
SECONDS_COLUMNS = {"seconds"}  # wall time, which no two runs share
# Python's and numpy's global generators, which dictionary learning saves but never seeds: they
# differ between two runs of the same tree, and nothing the run computes draws from them
UNSEEDED_STATES = re.compile(r"^/rng_state/global/(python|numpy)/")


def run_all(tree: Path, out: Path) -> None:
    """Run the dictionary and every training run with ``tree``'s scripts, into ``out/<name>``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = out.resolve()
    dictionary_dir = out / "dictionary"
    commands = {
        "dictionary": ["cifar_dictlearning.py", *DICTIONARY, "--out-dir", str(dictionary_dir)]
    }
    for name, flags in TRAINING_RUNS.items():
        extra = ["--dict-path", str(dictionary_dir / "dictionary.pt")] if "LCACNN" in flags else []
        commands[name] = ["main_fast.py", *flags, *extra, "--results-dir", str(out / name)]
    for name, command in commands.items():
        print(f"running {name} in {tree}", flush=True)
        done = subprocess.run(
            [sys.executable, *command], cwd=tree, env=env, timeout=TIMEOUT, text=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        if done.returncode != 0:
            sys.exit(f"{name} failed with status {done.returncode}: {done.stderr.strip()[-2000:]}")


def saved_files(folder: Path) -> dict[str, Path]:
    """The ``.pt`` and CSV files under ``folder``, keyed by their relative path with the date and
    ``run_<N>`` folders replaced, so two trees written on other days or numbers match."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and (path.suffix == ".pt" or path.name in CSV_FILES):
            parts = path.relative_to(folder).parts
            key = "/".join(
                "RUN" if re.fullmatch(r"run_\d+|\d{4}-\d{2}-\d{2}", part) else part
                for part in parts
            )
            files[key] = path
    return files


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a loaded object, keyed by its path of dict keys and list indices."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    found = {}
    for key, value in items:
        found.update(tensors(value, f"{prefix}/{key}"))
    return found


def compare_pt(path_a: Path, path_b: Path) -> list[str]:
    """The differences between the tensors of two ``.pt`` files (empty when identical)."""
    a = tensors(torch.load(path_a, map_location="cpu", weights_only=True))
    b = tensors(torch.load(path_b, map_location="cpu", weights_only=True))
    problems = [f"tensor {key} only in one tree" for key in sorted(set(a) ^ set(b))]
    for key in sorted(key for key in set(a) & set(b) if not UNSEEDED_STATES.match(key)):
        if a[key].dtype != b[key].dtype or not torch.equal(a[key], b[key]):
            problems.append(f"tensor {key} differs")
    return problems


def read_rows(path: Path) -> list[dict]:
    """A CSV's rows without its seconds columns."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items() if k not in SECONDS_COLUMNS} for row in rows]


def compare_outputs(out_a: Path, out_b: Path) -> bool:
    """Print one line per run and return whether every run is identical."""
    all_equal = True
    runs = sorted(
        {p.name for p in out_a.iterdir() if p.is_dir()}
        | {p.name for p in out_b.iterdir() if p.is_dir()}
    )
    for run in runs:
        files_a, files_b = saved_files(out_a / run), saved_files(out_b / run)
        problems = [f"{key} only in one tree" for key in sorted(set(files_a) ^ set(files_b))]
        if not files_a and not files_b:
            problems.append("no saved file")
        for key in sorted(set(files_a) & set(files_b)):
            if key.endswith(".pt"):
                problems += [f"{key}: {p}" for p in compare_pt(files_a[key], files_b[key])]
            elif read_rows(files_a[key]) != read_rows(files_b[key]):
                problems.append(f"{key}: rows differ")
        verdict = "identical" if not problems else "DIFFERENT"
        print(f"{run:<20} {verdict} ({len(files_a)} files)")
        for problem in problems[:10]:
            print(f"    {problem}")
        all_equal &= not problems
    return all_equal


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", help="a git revision to compare this tree with")
    parser.add_argument("--keep", help="keep the outputs in this folder (default: a temp folder)")
    parser.add_argument("command", nargs="*", help="run TREE OUT | compare OUT_A OUT_B")
    args = parser.parse_args()
    if args.command[:1] == ["run"] and len(args.command) == 3:
        run_all(Path(args.command[1]), Path(args.command[2]))
        return 0
    if args.command[:1] == ["compare"] and len(args.command) == 3:
        return 0 if compare_outputs(Path(args.command[1]), Path(args.command[2])) else 1
    if args.base is None or args.command:
        parser.error("give --base REV, or run TREE OUT, or compare OUT_A OUT_B")
    work = Path(args.keep or tempfile.mkdtemp(prefix="bit_identity_"))
    work.mkdir(parents=True, exist_ok=True)
    base_tree = work / "base_tree"
    if not base_tree.exists():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base_tree), args.base], cwd=ROOT, check=True
        )
    try:
        run_all(base_tree, work / "base")
        run_all(ROOT, work / "this")
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False
        )
    print(f"outputs in {work}")
    return 0 if compare_outputs(work / "base", work / "this") else 1


if __name__ == "__main__":
    sys.exit(main())
