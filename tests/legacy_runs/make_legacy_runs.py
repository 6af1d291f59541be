"""Writes the run folders in this folder: tiny digits runs saved by an older checkout of
main_fast.py, whose records hold ``args`` and ``model_config`` rather than one typed
configuration. The tests read them back (resume, evaluate, robustness) through the one
translation of ``experiment/records.py``. The saved ``.pt`` files are kept as text, in one
``records.json`` per run (tensors as dtype, shape and base64 bytes); the tests write them back
with ``torch.save`` (``tests/helpers.write_legacy_runs``).

    python tests/legacy_runs/make_legacy_runs.py CHECKOUT

CHECKOUT is a checkout of the older code (e.g. ``git worktree add /tmp/old c03db34``). Each run
keeps ``checkpoint.pt``, ``model.pt``, ``final_model.pt`` (in ``records.json``), ``results.csv`` and
``hyperparameters.txt`` (and the LCA run its ``reconstructions.png``, which a finished LCA
run has); the other figures are dropped to keep the files small.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RECORDS = ("checkpoint.pt", "model.pt", "final_model.pt")
KEPT = ("results.csv", "hyperparameters.txt")
COMMON = ["--task", "DIGITS", "--act", "my_hard_sig", "--T1", "4", "--T2", "2", "--betas", "0.0",
          "0.5", "--mbs", "512", "--epochs", "1", "--seed", "0", "--device", "cpu", "--save",
          "--optim", "sgd", "--mmt", "0.9"]  # fmt: skip
CONV = ["--channels", "2", "--kernels", "3", "--strides", "1", "--paddings", "1", "--pools", "m",
        "--fc", "10", "--lrs", "0.05", "0.05"]  # fmt: skip
RUNS = {
    "cnn_ep": ["--model", "CNN", *CONV, "--alg", "EP", "--loss", "cel", "--softmax"],
    "vfcnn": ["--model", "VFCNN", *CONV, "--alg", "EP", "--same-update"],
    "mlp_bptt": ["--model", "MLP", "--archi", "64", "8", "10", "--lrs", "0.05", "0.05",
                 "--alg", "BPTT"],
    "lcacnn_learn_async": ["--model", "LCACNN", "--lca_feats", "2", "--lca_ksize", "3",
                        "--lca_stride", "2", "--lca_iters", "5", "--lca_lambda", "0.1",
                        "--channels", "2", "2", "--kernels", "3", "--strides", "1", "--paddings",
                        "1", "--pools", "im", "--fc", "10", "--lrs", "0.05", "0.05",
                        "--dict_training", "learn", "--dynamics", "async", "--tol", "1e-3"],
}  # fmt: skip


def encode(value):
    """A loaded record as JSON: tensors as dtype, shape and raw bytes in base64, tuples and
    dicts (whose keys may be numbers) in tagged forms (``tests/helpers.decode_record``)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        return {"tensor": base64.b64encode(raw).decode(), "dtype": str(tensor.dtype)[6:],
                "shape": list(tensor.shape)}  # fmt: skip
    if isinstance(value, tuple):
        return {"tuple": [encode(item) for item in value]}
    if isinstance(value, list):
        return [encode(item) for item in value]
    if isinstance(value, dict):
        return {"items": [[encode(key), encode(item)] for key, item in value.items()]}
    return value


def main() -> int:
    checkout = Path(sys.argv[1]).resolve()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in RUNS.items():
            results = Path(tmp) / name
            command = [sys.executable, "main_fast.py", *COMMON, *flags, "--results-dir",
                       str(results)]  # fmt: skip
            subprocess.run(command, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL)
            (run_dir,) = results.glob("*/*/*/*/*/run_*")
            target = HERE / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            for filename in (*KEPT, "reconstructions.png"):  # the LCA run's last figure
                if (run_dir / filename).is_file():
                    shutil.copy(run_dir / filename, target / filename)
            records = {name: encode(torch.load(run_dir / name, weights_only=True))
                       for name in RECORDS}  # fmt: skip
            (target / "records.json").write_text(json.dumps(records))
            print(f"{name}: {sum(f.stat().st_size for f in target.iterdir())} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
