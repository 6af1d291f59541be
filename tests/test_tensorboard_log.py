"""tensorboard_log: what it writes, read back with TensorBoard's own EventAccumulator; a resume
with purge_step leaves one point per (tag, step); a failing disk warns once and never raises; a
disabled log writes nothing and imports nothing."""

import errno
import io
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from unittest import mock

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

from experiment import tensorboard_log as tbl
from experiment.tensorboard_log import TensorBoardLog

ROOT = Path(__file__).resolve().parents[1]
KEEP_ALL = {ea.SCALARS: 0, ea.IMAGES: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0}


def read_events(folder: Path) -> ea.EventAccumulator:
    """Every event of the one run in ``folder``, as TensorBoard loads it."""
    events = ea.EventAccumulator(str(folder), size_guidance=KEEP_ALL)
    events.Reload()
    return events


def points(events: ea.EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in events.Scalars(tag)]


def float32_points(expected: list[tuple[int, float]]) -> list[tuple[int, np.float32]]:
    return [(step, np.float32(value)) for step, value in expected]


def age_event_files(folder: Path) -> None:
    """Date the event files one second back, as those of a crashed process are: TensorBoard
    reads a folder's files in name order and the name starts with the creation second."""
    for path in folder.glob("events.out.tfevents.*"):
        parts = path.name.split(".")  # events, out, tfevents, seconds, host..., pid, counter
        parts[3] = f"{int(parts[3]) - 1:010d}"
        path.rename(folder / ".".join(parts))


def decode_png(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)))


def test_step_helpers_by_hand():
    assert tbl.epoch_end_step(0, 50) == 0
    assert tbl.epoch_end_step(3, 50) == 150
    assert tbl.batch_step(1, 1, 50) == 1
    assert tbl.batch_step(2, 1, 50) == 51
    assert tbl.batch_step(2, 50, 50) == tbl.epoch_end_step(2, 50) == 100
    assert tbl.resume_purge_step(2, 50) == 101
    for bad in ((1, 0, 50), (1, 51, 50)):
        with pytest.raises(ValueError, match="outside 1..50"):
            tbl.batch_step(*bad)
    with pytest.raises(ValueError, match="epoch -1"):
        tbl.epoch_end_step(-1, 50)
    with pytest.raises(ValueError, match="at least one batch"):
        tbl.epoch_end_step(1, 0)


def test_robustness_tags_one_per_setting():
    assert (
        tbl.robustness_tag("pgd-linf", "bptt", 8 / 255) == "robustness/pgd-linf/bptt/eps_0.0313725"
    )
    assert tbl.robustness_tag("square-l2", "none", 0.5) == "robustness/square-l2/eps_0.5"
    assert tbl.robustness_tag("corruption_mean") == "robustness/corruption_mean"
    settings = [(a, g, e) for a in ("pgd-l2", "apgd-l2") for g in ("bptt", "ep") for e in (0.1, 1)]
    assert len({tbl.robustness_tag(*setting) for setting in settings}) == len(settings)


def test_epoch_tags_of_a_results_row_by_hand():
    row = {
        "epoch": 3,
        "train_acc": 0.5,
        "test_acc": 0.25,
        "train_loss": 1.5,
        "lca_frac_active": 0.125,
        "lca_recon_error": 2.0,
        "dict_cosine": 0.75,
        "free_steps": 20.0,
        "free_at_cap": 0.0,
        "nudged_steps": 8.0,
        "nudged_at_cap": 1.0,
        "angle_syn1": 45.0,
        "lr": 0.01,
        "lr_group1": 0.02,
        "seconds": 12,
        "momentum": 0.9,
    }
    assert tbl.epoch_scalars(row) == {
        "train/acc": 0.5,
        "test/acc": 0.25,
        "train/loss": 1.5,
        "lca/frac_active": 0.125,
        "lca/recon_error": 2.0,
        "lca/dict_cosine": 0.75,
        "phases/free_steps": 20.0,
        "phases/free_at_cap": 0.0,
        "phases/nudged_steps": 8.0,
        "phases/nudged_at_cap": 1.0,
        "vf/angle_syn1": 45.0,
        "lr/group0": 0.01,
        "lr/group1": 0.02,
        "time/epoch_seconds": 12.0,
        "epoch/momentum": 0.9,
    }


def test_scalars_read_back_to_float32(tmp_path):
    values = np.random.default_rng(0).normal(size=5)
    with TensorBoardLog(tmp_path) as log:
        for step, value in enumerate(values, start=1):
            log.scalar("train/acc", value, step)
        log.scalars({"acc": 0.125, "loss": 1 / 3}, 7, prefix="test/")
    events = read_events(tmp_path / "tb")
    assert points(events, "train/acc") == float32_points(list(enumerate(values, start=1)))
    assert points(events, "test/acc") == [(7, 0.125)]
    assert points(events, "test/loss") == float32_points([(7, 1 / 3)])


def test_resume_with_purge_step_keeps_one_point_per_step(tmp_path):
    folder = tmp_path / "tb"
    crashed = TensorBoardLog(tmp_path)
    for step in (1, 2, 3):
        crashed.scalars({"train/acc": step / 10, "test/acc": step / 20}, step)
    crashed.histogram("free/layer1", torch.zeros(4), 2)
    crashed.flush()  # the process dies here, without close
    age_event_files(folder)
    with TensorBoardLog(tmp_path, purge_step=tbl.resume_purge_step(1, 1)) as resumed:
        for step in (2, 3):
            resumed.scalars({"train/acc": step / 100, "test/acc": step / 200}, step)
        resumed.histogram("free/layer1", torch.zeros(6), 2)
    events = read_events(folder)
    assert points(events, "train/acc") == float32_points([(1, 0.1), (2, 0.02), (3, 0.03)])
    assert points(events, "test/acc") == float32_points([(1, 0.05), (2, 0.01), (3, 0.015)])
    [histogram] = events.Histograms("free/layer1")
    assert (histogram.step, histogram.histogram_value.num) == (2, 6)
    # the loader of ``tensorboard --load_fast=false`` purges only at a folder's second START
    served = pea.EventAccumulator(str(folder), size_guidance=KEEP_ALL)
    served.Reload()
    train_acc = [
        (e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in served.Tensors("train/acc")
    ]
    assert train_acc == float32_points([(1, 0.1), (2, 0.02), (3, 0.03)])


def test_a_sub_run_purges_its_own_events_only(tmp_path):
    with TensorBoardLog(tmp_path) as training:
        training.scalars({"train/acc": 0.5, "test/acc": 0.25}, 100)
    tag = tbl.robustness_tag("pgd-linf", "ep", 0.01)
    for accuracy in (0.125, 0.375):  # robustness evaluated twice at T1 = 30
        age_event_files(tmp_path / "tb" / "robustness")
        with TensorBoardLog(tmp_path, purge_step=30, sub_run="robustness") as robustness:
            robustness.scalar(tag, accuracy, 30)
    assert points(read_events(tmp_path / "tb"), "train/acc") == [(100, 0.5)]
    assert points(read_events(tmp_path / "tb" / "robustness"), tag) == [(30, 0.375)]
    for bad in ("hparams", "a/b", ".."):
        with pytest.raises(ValueError, match="plain folder name"):
            TensorBoardLog(tmp_path, sub_run=bad)


def test_images_come_back_with_their_shape_and_pixels(tmp_path):
    colour = torch.randint(
        0, 256, (3, 4, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    grey = torch.tensor([[0.0, 1.0, 1.5], [-1.0, 0.0, 1.0]])  # out of [0, 1] is clipped
    with TensorBoardLog(tmp_path) as log:
        log.image("lca/dictionary", colour, 3)
        log.image("lca/grey", grey, 4)
        with pytest.raises(ValueError, match=r"expected \(C, H, W\) or \(H, W\)"):
            log.image("bad", torch.zeros(1, 3, 4, 4), 5)
    events = read_events(tmp_path / "tb")
    [dictionary] = events.Images("lca/dictionary")
    assert (dictionary.step, dictionary.height, dictionary.width) == (3, 4, 6)
    np.testing.assert_array_equal(
        decode_png(dictionary.encoded_image_string), colour.permute(1, 2, 0)
    )
    [grey_event] = events.Images("lca/grey")
    assert (grey_event.height, grey_event.width) == (2, 3)
    pixels = decode_png(grey_event.encoded_image_string)
    pixels = pixels if pixels.ndim == 2 else pixels[..., 0]
    np.testing.assert_array_equal(pixels, [[0, 255, 255], [0, 0, 255]])


def test_a_figure_comes_back_at_its_pixel_size_and_is_closed(tmp_path):
    figure = plt.figure(figsize=(2, 1), dpi=50)
    with TensorBoardLog(tmp_path) as log:
        log.figure("settling", figure, 3)
    [image] = read_events(tmp_path / "tb").Images("settling")
    assert (image.step, image.width, image.height) == (3, 100, 50)
    assert figure.number not in plt.get_fignums()


def test_feature_grid_tiles_each_feature_rescaled():
    weights = torch.arange(16.0).view(4, 1, 2, 2) * torch.tensor([1.0, -2.0, 3.0, 0.5]).view(
        4, 1, 1, 1
    )
    grid = tbl.feature_grid(weights)
    assert grid.shape == (3, 7, 7)  # 2 x 2 tiles of 2 x 2 pixels, 1 pixel of padding around each
    for index in range(4):
        row, col = divmod(index, 2)
        tile = grid[:, 1 + 3 * row : 3 + 3 * row, 1 + 3 * col : 3 + 3 * col]
        feature = weights[index, 0]
        expected = (feature - feature.min()) / (feature.max() - feature.min())
        torch.testing.assert_close(tile, expected.expand(3, 2, 2), atol=1e-6, rtol=0)
    padding = torch.ones(7, 7, dtype=torch.bool)
    padding[1:3, 1:3] = padding[1:3, 4:6] = padding[4:6, 1:3] = padding[4:6, 4:6] = False
    assert grid[:, padding].abs().max() == 0


def test_layer_histograms_count_every_entry(tmp_path):
    generator = torch.Generator().manual_seed(2)
    layers = [
        torch.rand(2, 3, 4, 4, dtype=torch.float64, generator=generator),
        torch.randn(2, 10, dtype=torch.float64, generator=generator),
    ]
    with TensorBoardLog(tmp_path) as log:
        log.layer_histograms("free", layers, 5)
    events = read_events(tmp_path / "tb")
    for k, layer in enumerate(layers, start=1):
        [event] = events.Histograms(f"free/layer{k}")
        histogram = event.histogram_value
        assert event.step == 5
        assert histogram.num == layer.numel() == sum(histogram.bucket)
        assert (histogram.min, histogram.max) == (layer.min().item(), layer.max().item())
        assert histogram.sum == pytest.approx(layer.sum().item(), rel=1e-12)
        assert histogram.sum_squares == pytest.approx(layer.pow(2).sum().item(), rel=1e-12)


def test_hparams_make_their_own_sub_run(tmp_path):
    config = {"lrs": [0.1, 0.2], "T1": 30, "model": "CNN", "seed": None, "amp": True}
    with TensorBoardLog(tmp_path) as log:
        log.scalar("test/acc", 0.5, 10)
        log.hparams(config, 0.25, 10)
        log.hparams(config, 0.5, 20)
    assert tbl.BEST_TEST_ACC_TAG not in read_events(tmp_path / "tb").Tags()[ea.SCALARS]
    events = read_events(tmp_path / "tb" / tbl.HPARAMS_RUN)
    assert points(events, tbl.BEST_TEST_ACC_TAG) == [(10, 0.25), (20, 0.5)]
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    shown = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert shown["lrs"].string_value == "[0.1, 0.2]"
    assert shown["T1"].number_value == 30
    assert shown["model"].string_value == "CNN"
    assert shown["seed"].string_value == "None"
    assert shown["amp"].number_value == 1  # torch's hparams writes a bool as a number


def test_a_failing_disk_warns_once_and_never_raises(tmp_path, capsys, monkeypatch):
    thread_failures = []
    monkeypatch.setattr(threading, "excepthook", thread_failures.append)
    log = TensorBoardLog(tmp_path)
    # the writer's thread, to wait for its death rather than for a time
    thread = log._writer.file_writer.event_writer._async_writer._worker
    no_space = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with mock.patch.object(RecordWriter, "write", side_effect=no_space):
        log.scalar("train/acc", 0.5, 1)  # written in the writer's thread, which dies of it
        log.flush()
        thread.join(timeout=10)
        log.scalar("train/acc", 0.6, 2)
        log.image("lca/dictionary", torch.zeros(3, 2, 2), 2)
        log.hparams({"T1": 30}, 0.5, 2)
        log.flush()
    log.close()
    log.close()
    assert not log.active and not thread.is_alive()
    assert thread_failures == []  # the thread's OSError printed no traceback
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: TensorBoard log ")
    assert "No space left on device" in lines[0] and "checkpoints go on without it" in lines[0]
    assert "train/acc" not in read_events(tmp_path / "tb").Tags()[ea.SCALARS]
    assert not (tmp_path / "tb" / tbl.HPARAMS_RUN).exists()  # nothing opened once stopped


def test_a_failing_call_in_the_foreground_warns_once(tmp_path, capsys):
    log = TensorBoardLog(tmp_path)
    with mock.patch.object(
        log._writer,
        "add_scalar",
        side_effect=PermissionError(errno.EACCES, "Permission denied", "tb/events"),
    ):
        log.scalars({"acc": 0.5, "loss": 1.0}, 1)
        log.scalar("acc", 0.5, 2)
    log.flush()
    log.close()
    assert not log.active
    [line] = capsys.readouterr().err.splitlines()
    assert "tb/events: Permission denied" in line


def test_a_target_that_cannot_be_a_folder_warns_once(tmp_path, capsys):
    (tmp_path / "tb").write_text("a file where the log folder should be")
    log = TensorBoardLog(tmp_path)
    log.scalar("acc", 0.5, 1)
    log.flush()
    log.close()
    assert not log.active
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: TensorBoard log ")
    assert (tmp_path / "tb").read_text() == "a file where the log folder should be"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_warns_once(tmp_path, capsys):
    tmp_path.chmod(0o500)
    try:
        log = TensorBoardLog(tmp_path)
        log.scalar("acc", 0.5, 1)
        log.close()
    finally:
        tmp_path.chmod(0o700)
    assert not log.active
    [line] = capsys.readouterr().err.splitlines()
    assert "Permission denied" in line


def test_a_disabled_log_writes_nothing_and_imports_nothing(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import torch
        from experiment.tensorboard_log import TensorBoardLog

        run = Path({str(tmp_path)!r})
        off = TensorBoardLog(run / "off", enabled=False)
        for log in (off, TensorBoardLog(run / "rank1", rank=1)):
            log.scalars({{"acc": 0.5}}, 1)
            log.image("image", torch.zeros(3, 2, 2), 1)
            log.layer_histograms("free", [torch.zeros(2, 3)], 1)
            log.hparams({{"T1": 30}}, 0.5, 1)
            log.flush()
            log.close()
            assert not log.active
        print(
            "disabled imported",
            "torch.utils.tensorboard" in sys.modules,
            "tensorboard" in sys.modules,
        )
        TensorBoardLog(run / "on").close()
        print("enabled imported", "torch.utils.tensorboard" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["disabled imported False False", "enabled imported True"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["on"]
