"""--tensorboard on the scripts, read back with TensorBoard's own EventAccumulator: one point per
epoch and tag at the epoch's last batch, equal to results.csv; a stopped and resumed run keeps
one point per step; an LCACNN finetune logs its dictionary; dictionary learning and robustness
log their CSVs' values; a failing log costs no checkpoint; without the flag nothing is written
and TensorBoard is not imported; under torchrun two processes write one event stream (rank 0's),
whose epoch tags equal results.csv's values."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DIGITS_CNN_BATCHED, LCACNN, ROOT, load, only_run_dir, read_csv, torchrun
from tensorboard.backend.event_processing import event_accumulator as ea

import cifar_dictlearning
import main_fast
import robustness
import utils_ep_fast
from experiment import entry, storage
from robust_eval.evaluation import ROBUSTNESS_CSV

BATCHES = 6  # DIGITS_CNN_BATCHED: 1437 training images in batches of 256
RATES = (0.1, 0.1)  # its --lrs
# results.csv column -> tag, written out here rather than taken from the code
CSV_TAGS = {"train_acc": "train/acc", "test_acc": "test/acc", "lr": "lr/group0",
            "seconds": "time/epoch_seconds"}  # fmt: skip
ETA_MIN, T_MAX = 1e-5, 100  # utils_ep_fast.make_scheduler's cosine decay


def events(folder: Path) -> ea.EventAccumulator:
    """Every event of the TensorBoard run in ``folder``."""
    sizes = {ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.IMAGES: 0, ea.TENSORS: 0}
    accumulator = ea.EventAccumulator(str(folder), size_guidance=sizes)
    accumulator.Reload()
    return accumulator


def curve(log: ea.EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in log.Scalars(tag)]


def f32(value) -> float:
    return float(torch.tensor(float(value), dtype=torch.float32))


def train(argv: list[str], results: Path) -> Path:
    assert main_fast.main([*argv, "--device", "cpu", "--results-dir", str(results)]) == 0
    return only_run_dir(results)


def cosine_rate(rate: float, epoch: int) -> float:
    """The rate of epoch ``epoch`` (from 1) under cosine decay, in closed form."""
    return ETA_MIN + (rate - ETA_MIN) * (1 + math.cos(math.pi * (epoch - 1) / T_MAX)) / 2


def check_epoch_tags(run_dir: Path, epochs: int) -> ea.EventAccumulator:
    """results.csv's values at steps B, 2B, ..., one point each; the losses and group rates
    alongside; running means at every second batch, the last of an epoch equal to its mean."""
    log = events(run_dir / "tb")
    rows = read_csv(run_dir)
    steps = [BATCHES * epoch for epoch in range(1, epochs + 1)]
    for column, tag in CSV_TAGS.items():
        assert curve(log, tag) == [
            (s, f32(row[column])) for s, row in zip(steps, rows, strict=True)
        ], tag
    for tag in ("train/loss", "test/loss", "lr/group1"):
        assert [step for step, _ in curve(log, tag)] == steps, tag
    for epoch, (_, rate) in enumerate(curve(log, "lr/group1"), start=1):
        assert rate == pytest.approx(cosine_rate(RATES[1], epoch), rel=1e-6)
    running = curve(log, "train/running_acc")
    assert [step for step, _ in running] == list(range(2, BATCHES * epochs + 1, 2))
    assert [value for step, value in running if step in steps] == [
        f32(row["train_acc"]) for row in rows
    ]
    for tag in ("free_fixed_point/layer1", "free_fixed_point/layer2"):
        assert [event.step for event in log.Histograms(tag)] == steps
    assert [event.step for event in log.Images("settling")] == steps
    best = curve(events(run_dir / "tb" / "hparams"), "hparams/best_test_acc")
    assert best[-1] == (steps[-1], f32(max(float(row["test_acc"]) for row in rows)))
    return log


TB_RUN = [*DIGITS_CNN_BATCHED, "--lr-decay", "--epochs", "3", "--save", "--tensorboard",
          "--log-every", "2"]  # fmt: skip


def test_three_epochs_give_three_points_per_tag_equal_to_results_csv(tmp_path):
    run_dir = train(TB_RUN, tmp_path)
    log = check_epoch_tags(run_dir, 3)
    # the test loss of the last epoch, computed here from the final model: 0.5 |s_out - 1_y|^2
    record = load(run_dir / "final_model.pt")
    model = main_fast.records.restore_model(record, torch.device("cpu"))
    model.set_dynamics("sync")
    train_set, test_set = main_fast.data_loading.build_datasets("DIGITS", "./data")
    x = torch.stack([test_set[i][0] for i in range(len(test_set))])
    y = torch.tensor([test_set[i][1] for i in range(len(test_set))])
    with torch.no_grad():
        out = model(x, y, model.init_neurons(x), 3)[-1]
    expected = 0.5 * (out - torch.nn.functional.one_hot(y, 10).to(out)).pow(2).sum(1).mean()
    assert curve(log, "test/loss")[-1][1] == pytest.approx(expected.item(), rel=1e-5)


def test_stopped_in_epoch_three_and_resumed_keeps_one_point_per_step(tmp_path, monkeypatch):
    """A SIGTERM after batch 3 of epoch 3 (running means of epoch 3 already written), then a
    resume: the purge drops epoch 3's first events and every tag has one point per step."""
    real_train_batch = utils_ep_fast.train_batch
    calls = []

    def train_batch(*args, **kwargs):
        done = real_train_batch(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2 * BATCHES + 3:
            entry.request_stop(signal.SIGTERM)
        return done

    monkeypatch.setattr(utils_ep_fast, "train_batch", train_batch)
    argv = [*TB_RUN, "--device", "cpu", "--results-dir", str(tmp_path)]
    assert main_fast.main(argv) == 143
    run_dir = only_run_dir(tmp_path)
    stopped = events(run_dir / "tb")
    assert [step for step, _ in curve(stopped, "train/running_acc")][-1] == 2 * BATCHES + 2
    assert [step for step, _ in curve(stopped, "train/acc")] == [BATCHES, 2 * BATCHES]
    monkeypatch.setattr(utils_ep_fast, "train_batch", real_train_batch)
    assert main_fast.main(["--load-path", str(run_dir), "--epochs", "3"]) == 0  # flags saved
    check_epoch_tags(run_dir, 3)


def test_lcacnn_finetune_logs_its_dictionary_and_dictionary_learning_its_csv(tmp_path):
    out_dir = tmp_path / "dict"
    learn = ["--task", "DIGITS", "--features", "4", "--kernel-size", "3", "--stride", "1",
             "--epochs", "2", "--lca-iters", "5", "--batch-size", "256", "--subset-fraction",
             "0.8", "--device", "cpu", "--out-dir", str(out_dir), "--tensorboard"]  # fmt: skip
    assert cifar_dictlearning.main(learn) == 0
    learnt = events(out_dir / "tb")
    rows = storage.read_csv_rows(out_dir / cifar_dictlearning.CSV_FILE)
    for column in ("recon_error", "l1_sparsity", "frac_active", "total_energy", "lambda"):
        expected = [(row["epoch"], f32(row[column])) for row in rows]
        assert curve(learnt, f"dictlearning/{column}") == expected, column
    assert [event.step for event in learnt.Images("lca/dictionary")] == [1, 2]

    argv = [*LCACNN, "--dict_training", "finetune", "--dict-path", str(out_dir), "--mbs", "96",
            "--epochs", "1", "--save", "--tensorboard"]  # fmt: skip
    run_dir = train(argv, tmp_path / "results")
    log = events(run_dir / "tb")
    batches = math.ceil((1437 - round(0.8 * 1437)) / 96)
    assert [event.step for event in log.Images("lca/dictionary")] == [0, batches]
    assert [event.step for event in log.Images("lca/reconstructions")] == [batches]
    image = log.Images("lca/dictionary")[-1]
    assert (image.width, image.height) == (2 * 3 + 3, 2 * 3 + 3)  # 2x2 features of 3x3, padded
    (row,) = read_csv(run_dir)
    lca_tags = {"lca_frac_active": "lca/frac_active", "lca_recon_error": "lca/recon_error",
                "dict_cosine": "lca/dict_cosine"}  # fmt: skip
    for column, tag in lca_tags.items():
        assert curve(log, tag) == [(batches, f32(row[column]))], tag
    assert [event.step for event in log.Histograms("free_fixed_point/lca_code")] == [batches]


def test_robustness_logs_one_tag_per_setting_at_step_t1(tmp_path):
    argv = [*DIGITS_CNN_BATCHED, "--epochs", "1", "--save"]
    run_dir = train(argv, tmp_path)
    measure = ["--load-path", str(run_dir), "--device", "cpu", "--n-samples", "20",
               "--attacks", "pgd-linf", "corruptions", "--gradients", "bptt", "--eps", "0",
               "0.1", "--steps", "2", "--corruptions", "gaussian_noise", "--severities", "1",
               "--tensorboard"]  # fmt: skip
    assert robustness.main(measure) == 0
    log = events(run_dir / "tb" / "robustness")
    rows = storage.read_csv_rows(run_dir / ROBUSTNESS_CSV)
    accuracy = {(row["attack"], row["epsilon"], row["severity"]): row["accuracy"] for row in rows}
    expected = {
        "robustness/clean": accuracy["clean", 0.0, 0],
        "robustness/pgd-linf/bptt": accuracy["pgd-linf", 0.0, 0],
        "robustness/pgd-linf/bptt/eps_0.1": accuracy["pgd-linf", 0.1, 0],
        "robustness/gaussian_noise/severity_1": accuracy["gaussian_noise", 0.0, 1],
        "robustness/corruption_mean": accuracy["corruption_mean", 0.0, 0],
    }
    assert set(log.Tags()["scalars"]) == set(expected)
    for tag, value in expected.items():
        assert curve(log, tag) == [(3, f32(value))], tag  # T1 of DIGITS_CNN_BATCHED


def test_a_log_that_cannot_be_written_warns_and_keeps_the_checkpoints(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tb").write_text("a file where the log's folder would go")
    argv = [*DIGITS_CNN_BATCHED, "--epochs", "2", "--save", "--tensorboard", "--device", "cpu",
            "--load-path", str(run_dir)]  # fmt: skip
    assert main_fast.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("warning: TensorBoard log") == 1 and "Traceback" not in err
    assert load(run_dir / "checkpoint.pt")["epoch"] == 2 and len(read_csv(run_dir)) == 2


@pytest.mark.slow
def test_without_the_flag_no_log_and_no_tensorboard_import(tmp_path):
    argv = [*DIGITS_CNN_BATCHED, "--epochs", "1", "--save", "--device", "cpu",
            "--results-dir", str(tmp_path)]  # fmt: skip
    script = (
        "import sys, main_fast\n"
        f"assert main_fast.main({argv!r}) == 0\n"
        "loaded = [name for name in sys.modules if name.split('.')[0] == 'tensorboard'\n"
        "          or name.startswith('torch.utils.tensorboard')]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (only_run_dir(tmp_path) / "tb").exists()


@pytest.mark.slow
def test_two_processes_write_one_event_stream(tmp_path):
    argv = [*DIGITS_CNN_BATCHED, "--epochs", "2", "--save", "--tensorboard", "--log-every", "3",
            "--device", "cpu", "--results-dir", str(tmp_path / "results")]  # fmt: skip
    done = torchrun(2, argv, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "results")
    files = sorted(path for path in (run_dir / "tb").rglob("*") if path.is_file())
    folders = [path.parent.relative_to(run_dir / "tb").as_posix() for path in files]
    assert folders == [".", "hparams"]  # one writer: the run's stream and its hparams sub-run
    log = events(run_dir / "tb")
    rows = read_csv(run_dir)
    for column, tag in CSV_TAGS.items():
        expected = [(BATCHES * (k + 1), f32(row[column])) for k, row in enumerate(rows)]
        assert curve(log, tag) == expected, tag
    assert [step for step, _ in curve(log, "train/running_acc")] == [3, 6, 9, 12]
