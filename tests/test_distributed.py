"""Data-parallel runs under torchrun (gloo, two CPU processes) against one process.

Every torchrun is a subprocess bounded by a timeout; one-process references run in this process
through ``main_fast.main``. Two processes must follow the one-process trajectory up to the order
of floating-point sums: final weights and dictionary within a relative 1e-5, the same
accuracies and results.csv rows.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import torchrun

import cifar_dictlearning
import collectives
import main_fast
from experiment import distributed
from lca import LCAConv2D

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5

# 1437 training images in batches of 64: the last one (29) splits 15 / 14
DIGITS_CNN = [
    "--model", "CNN", "--task", "DIGITS", "--channels", "4", "--kernels", "3", "--strides", "1",
    "--paddings", "1", "--pools", "m", "--fc", "10", "--lrs", "0.1", "0.05", "--act",
    "my_hard_sig", "--T1", "5", "--T2", "2", "--betas", "0.0", "0.5", "--thirdphase", "--loss",
    "cel", "--softmax", "--mbs", "64", "--mmt", "0.9", "--seed", "0", "--device", "cpu", "--save",
]  # fmt: skip

# EP trains on the 287 images the dictionary was not learnt on: the last batch (31) splits 16 / 15
DIGITS_LCACNN_FINETUNE = [
    "--model", "LCACNN", "--task", "DIGITS", "--channels", "4", "8", "--kernels", "3",
    "--strides", "1", "--paddings", "1", "--pools", "im", "--fc", "10", "--lrs", "0.1", "0.05",
    "--act", "my_hard_sig", "--T1", "5", "--T2", "2", "--betas", "0.0", "0.5", "--loss", "cel",
    "--softmax", "--mbs", "64", "--mmt", "0.9", "--seed", "0", "--lca_feats", "4",
    "--lca_ksize", "3", "--lca_stride", "1", "--lca_iters", "10", "--lca_lambda", "0.1",
    "--lca_eta", "0.5", "--dict_training", "finetune", "--random-sign", "--device", "cpu",
    "--save",
]  # fmt: skip


def run_folders(results: Path) -> list[Path]:
    return sorted(path for path in results.rglob("run_*") if path.is_dir())


def only_run_dir(results: Path) -> Path:
    folders = run_folders(results)
    assert len(folders) == 1, folders
    return folders[0]


def train_one_process(argv: list[str], results: Path) -> Path:
    assert main_fast.main([*argv, "--results-dir", str(results)]) == 0
    return only_run_dir(results)


def train_two_processes(argv: list[str], results: Path, cwd: Path) -> Path:
    done = torchrun(2, [*argv, "--results-dir", str(results)], cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return only_run_dir(results)


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Final weights (dictionary included) within TOLERANCE; results.csv rows equal: the same
    accuracies, the other metrics within TOLERANCE, only the timings differ."""
    state = torch.load(run_dir / "final_model.pt", weights_only=True)["model_state"]
    expected = torch.load(reference / "final_model.pt", weights_only=True)["model_state"]
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        difference = (state[name] - value).norm() / value.norm().clamp_min(1e-30)
        assert difference <= TOLERANCE, f"{name}: relative difference {difference:.2e}"
    rows, expected_rows = read_rows(run_dir), read_rows(reference)
    assert len(rows) == len(expected_rows) and rows[0].keys() == expected_rows[0].keys()
    for row, expected_row in zip(rows, expected_rows, strict=True):
        for column, value in expected_row.items():
            if column.endswith("_acc") or column in ("epoch", "lr"):
                assert row[column] == value, column
            elif column != "seconds":
                assert float(row[column]) == pytest.approx(float(value), rel=TOLERANCE), column


# --------------------------------------------------------------------------------------------
# Pieces, in this process
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "world"), [(64, 2), (29, 2), (7, 3), (1, 2), (10, 4)])
def test_shard_bounds_cut_like_tensor_split(batch, world):
    expected = [len(part) for part in torch.arange(batch).tensor_split(world)]
    bounds = [distributed.shard_bounds(batch, rank, world) for rank in range(world)]
    assert [stop - start for start, stop in bounds] == expected
    assert bounds[0][0] == 0 and bounds[-1][1] == batch
    assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))


def test_split_batches_give_each_rank_its_part_and_weight():
    batches = [(torch.arange(7).float(), torch.arange(7)), (torch.arange(3.0), torch.arange(3))]
    parts = []
    for rank in range(2):
        split = distributed.SplitBatches(batches, rank, 2)
        parts.append([(y.tolist(), split.fraction) for _, y in split])
    assert parts[0] == [([0, 1, 2, 3], 4 / 7), ([0, 1], 2 / 3)]
    assert parts[1] == [([4, 5, 6], 3 / 7), ([2], 1 / 3)]


def test_dictionary_terms_of_batch_parts_add_up_to_the_whole_batch_update():
    """The LCA rule applied to the summed terms of two halves equals ``update_weights`` on the
    whole batch (clip, times-active normalisation and renormalisation included)."""
    torch.manual_seed(0)
    whole = LCAConv2D(6, 1, kernel_size=3, stride=1, lambda_=0.1, eta=0.5, lca_iters=5,
                      pad="same", d_update_clip=0.01)  # fmt: skip
    halves = LCAConv2D(6, 1, kernel_size=3, stride=1, lambda_=0.1, eta=0.5, lca_iters=5,
                       pad="same", d_update_clip=0.01)  # fmt: skip
    halves.assign_weight_values(whole.get_weights(), normalize=False)
    acts = torch.relu(torch.randn(10, 6, 8, 8) - 0.5)
    errors = torch.randn(10, 1, 8, 8)
    whole.update_weights(acts, errors)
    first = halves.weight_update_terms(acts[:6], errors[:6])
    second = halves.weight_update_terms(acts[6:], errors[6:])
    halves.apply_weight_update(first[0] + second[0], first[1] + second[1])
    torch.testing.assert_close(halves.weights, whole.weights, rtol=1e-6, atol=1e-7)


def test_without_torchrun_every_hook_is_the_identity():
    loader = [(torch.zeros(2), torch.zeros(2))]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    tensors = [torch.ones(2)]
    assert not distributed.launched() and not distributed.active()
    batches = distributed.split_batches(loader, optimizer)  # the batches, with safe points
    (x, y), (x0, y0) = list(batches)[0], loader[0]
    assert len(list(batches)) == 1 and x.data_ptr() == x0.data_ptr() and y.equal(y0)
    assert batches.fraction == 1.0 and not optimizer._optimizer_step_pre_hooks
    assert distributed.shard_evaluation(loader) is loader
    assert collectives.sum_over_ranks(tensors)[0] is tensors[0]
    assert distributed.sum_totals({"seen": 3}) == {"seen": 3}
    assert distributed.is_main_process()


# --------------------------------------------------------------------------------------------
# Two processes against one
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn_reference(tmp_path_factory) -> Path:
    """Two epochs of the small CNN in one process."""
    return train_one_process(DIGITS_CNN + ["--epochs", "2"], tmp_path_factory.mktemp("one"))


@pytest.mark.xdist_group("distributed_cnn_reference")
@pytest.mark.slow
def test_two_processes_train_the_cnn_like_one(cnn_reference, tmp_path):
    run_dir = train_two_processes(DIGITS_CNN + ["--epochs", "2"], tmp_path / "results", tmp_path)
    assert_same_run(run_dir, cnn_reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # rank 0 wrote, only there


@pytest.mark.slow
def test_two_processes_train_the_cnn_with_bptt_like_one(tmp_path):
    """BPTT's autograd gradients go through the same all-reduce as EP's estimate."""
    argv = DIGITS_CNN + ["--epochs", "1", "--alg", "BPTT"]
    reference = train_one_process(argv, tmp_path / "one")
    assert_same_run(train_two_processes(argv, tmp_path / "two", tmp_path), reference)


@pytest.mark.xdist_group("distributed_cnn_reference")
@pytest.mark.slow
def test_evaluate_under_torchrun_gives_the_one_process_accuracies(cnn_reference, tmp_path, capsys):
    assert main_fast.main(["--todo", "evaluate", "--load-path", str(cnn_reference)]) == 0
    expected = re.search(r"train_acc \S+ test_acc \S+", capsys.readouterr().out).group(0)
    done = torchrun(2, ["--todo", "evaluate", "--load-path", str(cnn_reference)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"train_acc \S+ test_acc \S+", done.stdout).group(0) == expected
    log = (cnn_reference / "hyperparameters.txt").read_text()
    assert log.count(expected) == 2  # one line per evaluation: only rank 0 appended


@pytest.mark.xdist_group("distributed_cnn_reference")
@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)], ids=["2-then-1", "1-then-2"])
def test_resume_with_another_number_of_processes(cnn_reference, tmp_path, first, then):
    results = tmp_path / "results"
    start = DIGITS_CNN + ["--epochs", "1"]
    if first == 2:
        run_dir = train_two_processes(start, results, tmp_path)
    else:
        run_dir = train_one_process(start, results)
    resume = ["--load-path", str(run_dir), "--epochs", "2"]
    if then == 2:
        done = torchrun(2, resume, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert main_fast.main(resume) == 0
    assert_same_run(run_dir, cnn_reference)


@pytest.mark.slow
def test_two_processes_learn_and_finetune_the_dictionary_like_one(tmp_path):
    """cifar_dictlearning.py, then LCACNN finetune, each with two processes and with one."""
    dictionary = tmp_path / "dict" / "dictionary.pt"
    learn = ["--task", "DIGITS", "--features", "4", "--kernel-size", "3", "--stride", "1",
             "--epochs", "1", "--lca-iters", "10", "--batch-size", "64", "--subset-fraction",
             "0.8", "--eta", "0.5", "--device", "cpu"]  # fmt: skip
    assert cifar_dictlearning.main([*learn, "--out-dir", str(dictionary.parent)]) == 0
    learn_twice = [*learn, "--out-dir", str(tmp_path / "dict2")]
    done = torchrun(2, learn_twice, tmp_path, script=ROOT / "cifar_dictlearning.py")
    assert done.returncode == 0, done.stderr[-3000:]
    learnt, expected = (
        torch.load(folder / "dictionary.pt", weights_only=True)["weights"]
        for folder in (tmp_path / "dict2", dictionary.parent)
    )
    assert (learnt - expected).norm() / expected.norm() <= TOLERANCE
    argv = DIGITS_LCACNN_FINETUNE + ["--epochs", "2", "--dict-path", str(dictionary)]
    reference = train_one_process(argv, tmp_path / "one")
    run_dir = train_two_processes(argv, tmp_path / "two", tmp_path)
    assert_same_run(run_dir, reference)
    moved = read_rows(reference)[-1]["dict_cosine"]
    assert float(moved) < 0.999  # the dictionary did change, so its agreement means something


# --------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "batch", "status"),
    [("raise", 30, "1"), ("interrupt", 30, "130"), ("hang", 10, "69"), ("kill", 30, "69")],
    ids=["raise", "interrupt", "hang", "kill"],
)
def test_a_failing_rank_stops_every_rank(fault, batch, status, tmp_path):
    """Rank 1 raises, is interrupted or is killed (SIGKILL) in the second epoch (23 batches an
    epoch), or stops answering in the first: every rank stops with one message and the same
    non-zero status (a lost process: 69; the killed one's own is -9), within the timeout; only
    rank 0 wrote files, and the checkpoint of the last finished epoch stays. The silent rank
    is waited for 10 s; the others get 60 s, as rank 1 waits in a collective while rank 0 saves
    the first epoch, which a busy machine can stretch past 10 s."""
    timeout = "10" if fault == "hang" else "60"
    argv = DIGITS_CNN + ["--epochs", "3", "--results-dir", str(tmp_path / "results"),
                         "--dist-timeout", timeout]  # fmt: skip
    env = {"FAULT": fault, "FAULT_RANK": "1", "FAULT_BATCH": str(batch)}
    done = torchrun(2, argv, tmp_path, script=ROOT / "tests" / "torchrun_fault.py", env=env)
    assert done.returncode != 0
    reports = re.findall(r"^error \(rank (\d) of 2\): (.*)$", done.stderr, re.MULTILINE)
    assert len(reports) == 1, done.stderr[-3000:]
    failed_rank, message = reports[0]
    if fault == "raise":
        assert (failed_rank, message) == ("1", "RuntimeError: injected failure")
    elif fault == "interrupt":
        assert (failed_rank, message) == ("1", "interrupted")
    else:  # rank 0 lost rank 1: it waited for the silent one until --dist-timeout
        assert failed_rank == "0" and message.startswith("lost another process of the run")
        # gloo words a killed peer differently from one version and moment to the next; a
        # silent one always ends in its timeout
        assert fault == "kill" or "Timed out" in message
    statuses = re.findall(r"exitcode\s*: (-?\d+)", done.stderr)
    assert statuses and set(statuses) == {status, *(["-9"] if fault == "kill" else [])}, statuses
    run_dir = only_run_dir(tmp_path / "results")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    epochs_done = (batch - 1) // 23
    if epochs_done:
        checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        assert checkpoint["epoch"] == epochs_done and len(read_rows(run_dir)) == epochs_done
    else:
        assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "results.csv").exists()


def project_frames(stderr: str) -> list[str]:
    """The files of this project named in the tracebacks of ``stderr`` (torchrun's own, of
    its launcher, name only torch's and Python's)."""
    return [name for name in re.findall(r'File "(.*?)"', stderr) if name.startswith(str(ROOT))]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "fault_rank", "moment", "in_save"),
    [("sigterm-launcher", "1", "30", ""), ("sigterm", "1", "30", ""), ("sigterm", "0", "2", "1")],
    ids=["to torchrun", "to rank 1", "to rank 0 in its saves"],
)
def test_sigterm_under_torchrun_saves_rank_0s_weights_and_every_rank_exits_143(
    fault, fault_rank, moment, in_save, tmp_path, capsys
):
    """SIGTERM to torchrun or to rank 1 in the second epoch (batch 30), or to rank 0 while it
    draws the first epoch's second figure: rank 0 saves interrupted.pt with epoch 1, every rank
    exits 143 without a traceback, and the run resumes (here with one process)."""
    argv = DIGITS_CNN + ["--epochs", "3", "--results-dir", str(tmp_path / "results"),
                         "--dist-timeout", "60"]  # fmt: skip
    env = {"FAULT": fault, "FAULT_RANK": fault_rank, "FAULT_BATCH": moment,
           "FAULT_IN_SAVE": in_save}  # fmt: skip
    done = torchrun(2, argv, tmp_path, script=ROOT / "tests" / "torchrun_fault.py", env=env)
    assert done.returncode == 1, done.stderr[-3000:]  # torchrun's own (docs/torchrun.md)
    assert "terminated (SIGTERM); current weights saved to" in done.stderr, done.stderr[-3000:]
    assert project_frames(done.stderr) == [] and "Exception ignored" not in done.stderr
    if fault != "sigterm-launcher":  # stopped by a signal of its own, torchrun lists none
        statuses = re.findall(r"^\s*exitcode\s*: (-?\d+)", done.stderr, re.MULTILINE)
        assert statuses == ["143", "143"], done.stderr[-1500:]  # the summary's, one a rank
    run_dir = only_run_dir(tmp_path / "results")
    assert torch.load(run_dir / "interrupted.pt", weights_only=True)["epoch"] == 1
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
    if fault == "sigterm-launcher":
        assert main_fast.main(["--load-path", str(run_dir), "--epochs", "3"]) == 0
        assert [row["epoch"] for row in read_rows(run_dir)] == ["1", "2", "3"]


@pytest.mark.parametrize(
    ("script", "env", "expected"),
    [
        ("torchrun_one_node.sh", {}, "--standalone --nproc_per_node 2 main_fast.py --model CNN"),
        ("torchrun_two_nodes.sh", {"ENDPOINT": "node0:29500"},
         "--nnodes 2 --nproc_per_node 2 --rdzv-backend c10d --rdzv-endpoint node0:29500 "
         "--rdzv-id ep-rcnn main_fast.py --model CNN"),
    ],
    ids=["one-node", "two-nodes"],
)  # fmt: skip
def test_run_scripts_start_the_seed_command_under_torchrun(script, env, expected, tmp_path):
    """A stand-in torchrun on PATH echoes what run/torchrun_*.sh hands it."""
    fake = tmp_path / "torchrun"
    fake.write_text('#!/bin/sh\necho "torchrun $*"\n')
    fake.chmod(0o755)
    environment = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "GPUS": "2", **env}
    command = ["bash", str(ROOT / "run" / script), str(ROOT / "run" / "rcnn_cifar10.sh"), "--x"]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"torchrun {expected}") and done.stdout.endswith("--x\n")
