"""Tests of experiment/data_loading.py: datasets from real on-disk formats and loaders, and, through
main_fast.py, archives and pickles from elsewhere (unsafe members, pickles checked before
torchvision unpickles them), a missing dataset and an unwritable data folder, each one line.
Nothing here touches the network (run folders: test_runs.py; figures: test_data_utils.py)."""

from __future__ import annotations

import errno
import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
import torchvision.datasets.mnist as tv_mnist
from fake_datasets import CodeRunningPickle, write_fake_cifar10, write_fake_mnist, write_fake_svhn
from helpers import DIGITS_CNN, one_error_line, run_failing
from torch.utils.data import Subset, TensorDataset

from experiment import data_loading, entry
from experiment.entry import UsageError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
MNIST_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


def load_cifar(root: Path, **kwargs):
    """build_datasets('CIFAR10') on fake files, which always differ from the official checksums."""
    with pytest.warns(UserWarning, match="official checksums"):
        return data_loading.build_datasets("CIFAR10", root, **kwargs)


def shifted_copies(image: np.ndarray, pad: int, flips: bool) -> list[np.ndarray]:
    """Every crop (same size) of ``image`` (C, H, W) edge-padded by ``pad``, also of its mirror."""
    _, h, w = image.shape
    sources = [image, image[:, :, ::-1]] if flips else [image]
    out = []
    for src in sources:
        padded = np.pad(src, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                out.append(padded[:, dy : dy + h, dx : dx + w])
    return out


def is_one_of(image: np.ndarray, candidates: list[np.ndarray]) -> bool:
    return any(np.allclose(image, c, atol=1e-6) for c in candidates)


def assert_random_shifts(train, index: int, plain: np.ndarray, pad: int, draws: int, seed: int):
    """Drawing item ``index`` of an augmented ``train`` set ``draws`` times (from ``seed``) gives
    only edge-padded shifts of ``plain`` (C, H, W) by up to ``pad`` pixels, not all unshifted."""
    candidates = shifted_copies(plain, pad=pad, flips=False)
    torch.manual_seed(seed)
    images = [train[index][0].numpy() for _ in range(draws)]
    assert all(image.shape == plain.shape for image in images)
    assert any(not np.allclose(image, plain, atol=1e-6) for image in images)
    assert all(is_one_of(image, candidates) for image in images)


# ------------------------------------------------------------------------------------- tasks


def test_task_info_shapes_and_case_insensitive_names():
    assert data_loading.task_info("CIFAR10") == (3, 32, 32, 10)
    assert data_loading.task_info("cifar100") == (3, 32, 32, 100)
    assert data_loading.task_info("mnist") == (1, 28, 28, 10)
    assert data_loading.task_info("fashionMNIST") == (1, 28, 28, 10)
    assert data_loading.task_info("svhn") == (3, 32, 32, 10)
    assert data_loading.task_info("Digits") == (1, 8, 8, 10)
    assert data_loading.canonical_task("fashionmnist") == "FashionMNIST"
    with pytest.raises(UsageError) as err:
        data_loading.task_info("ImageNet")
    for name in ("ImageNet", "MNIST", "CIFAR10", "DIGITS"):
        assert name in str(err.value)


# ------------------------------------------------------------------------------------- CIFAR-10


def test_cifar10_shapes_labels_and_normalisation(tmp_path):
    fake = write_fake_cifar10(tmp_path, n_train_per_batch=3, n_test=5)
    train, test = load_cifar(tmp_path)
    assert (len(train), len(test)) == (15, 5)
    assert data_loading.dataset_labels(train).tolist() == fake["train_labels"].tolist()
    assert data_loading.dataset_labels(test).tolist() == fake["test_labels"].tolist()

    # Item 7 is the second image of data_batch_3; pixel (row 5, column 11) in R, G and B.
    image, label = train[7]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label == fake["train_labels"][7]
    r, g, b = (int(v) for v in fake["train_images"][7, :, 5, 11])
    assert image[0, 5, 11].item() == pytest.approx((r / 255 - 0.4914) / (3 * 0.2023), abs=1e-5)
    assert image[1, 5, 11].item() == pytest.approx((g / 255 - 0.4822) / (3 * 0.1994), abs=1e-5)
    assert image[2, 5, 11].item() == pytest.approx((b / 255 - 0.4465) / (3 * 0.2010), abs=1e-5)


def test_cifar10_augmentation_flips_and_edge_shifts_train_only(tmp_path):
    fake = write_fake_cifar10(tmp_path, n_train_per_batch=2, n_test=2)
    train, test = load_cifar(tmp_path, data_aug=True)
    mean = np.array([0.4914, 0.4822, 0.4465]).reshape(3, 1, 1)
    std = np.array([0.6069, 0.5982, 0.6030]).reshape(3, 1, 1)
    plain = ((fake["train_images"][3] / 255.0 - mean) / std).astype(np.float32)
    unflipped = shifted_copies(plain, pad=4, flips=False)
    flipped = shifted_copies(plain[:, :, ::-1], pad=4, flips=False)

    torch.manual_seed(0)
    draws = [train[3][0] for _ in range(12)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not np.allclose(d.numpy(), plain, atol=1e-6) for d in draws)
    assert all(is_one_of(d.numpy(), unflipped + flipped) for d in draws)
    assert any(is_one_of(d.numpy(), flipped) and not is_one_of(d.numpy(), unflipped) for d in draws)
    test_plain = (fake["test_images"][1] / 255.0 - mean) / std
    test_draws = [test[1][0] for _ in range(12)]  # the 12 train draws above varied
    assert all(np.allclose(d.numpy(), test_plain, atol=1e-5) for d in test_draws)


def test_cifar10_archive_is_unpacked_without_network(tmp_path, monkeypatch):
    fake = write_fake_cifar10(tmp_path / "made", n_train_per_batch=2, n_test=3)
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "made" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", _no_network)
    train, test = load_cifar(data, download=True)
    assert (len(train), len(test)) == (10, 3)
    assert data_loading.dataset_labels(test).tolist() == fake["test_labels"].tolist()


def test_missing_cifar10_names_folder_files_and_digits(tmp_path, monkeypatch):
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", _no_network)
    with pytest.raises(UsageError) as err:
        data_loading.build_datasets("CIFAR10", tmp_path / "nowhere", download=False)
    msg = str(err.value)
    assert "downloading is off" in msg
    folder = (tmp_path / "nowhere").resolve()
    assert str(folder / "cifar-10-batches-py") in msg
    for name in CIFAR_FILES:
        assert name in msg
    assert str(folder / "cifar-10-python.tar.gz") in msg
    assert "--task DIGITS" in msg


def test_corrupt_cifar10_batch_is_a_usage_error(tmp_path):
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(UsageError, match="corrupt") as err:
        data_loading.build_datasets("CIFAR10", tmp_path, download=False)
    assert "cifar-10-batches-py" in str(err.value)


def test_unverified_cifar10_pickle_with_code_is_refused(tmp_path):
    write_fake_cifar10(tmp_path)
    marker = tmp_path / "code_ran"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    entry = {
        "data": np.zeros((1, 3072), np.uint8),
        "labels": [0],
        "x": CodeRunningPickle(str(marker)),
    }
    batch.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(UsageError, match="corrupt"):
        data_loading.build_datasets("CIFAR10", tmp_path, download=False)
    assert not marker.exists()


# ------------------------------------------------------------------------------------- MNIST


def _no_network(*args, **kwargs):
    raise AssertionError("the network must not be used when the files exist")


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
def test_existing_mnist_files_load_without_download(tmp_path, monkeypatch, name):
    fake = write_fake_mnist(tmp_path, n_train=7, n_test=4, name=name)
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", _no_network)
    train, test = data_loading.build_datasets(name, tmp_path, download=True)
    assert (len(train), len(test)) == (7, 4)
    image, label = train[5]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label == fake["train_labels"][5]
    # Normalize(0, 1) leaves ToTensor's value/255.
    assert image[0, 13, 2].item() == pytest.approx(fake["train_images"][5, 13, 2] / 255, abs=1e-7)
    assert data_loading.dataset_labels(test).tolist() == fake["test_labels"].tolist()


def test_mnist_augmentation_shifts_train_images(tmp_path):
    fake = write_fake_mnist(tmp_path, n_train=3, n_test=2)
    train, _ = data_loading.build_datasets("MNIST", tmp_path, data_aug=True, download=False)
    plain = (fake["train_images"][1] / 255.0).astype(np.float32)[None]
    assert plain.shape == (1, 28, 28)
    assert_random_shifts(train, 1, plain, pad=2, draws=8, seed=1)


def test_mnist_gz_files_are_unpacked_without_network(tmp_path):
    fake = write_fake_mnist(tmp_path, n_train=5, n_test=3)
    raw = tmp_path / "MNIST" / "raw"
    for name in MNIST_FILES:
        (raw / f"{name}.gz").write_bytes(gzip.compress((raw / name).read_bytes()))
        (raw / name).unlink()
    train, test = data_loading.build_datasets("MNIST", tmp_path, download=False)
    assert (len(train), len(test)) == (5, 3)
    assert train[2][0][0, 20, 7].item() == pytest.approx(fake["train_images"][2, 20, 7] / 255)


def test_offline_mnist_download_failure_names_folder_and_files(tmp_path, monkeypatch):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise URLError("no route to host")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(UsageError) as err:
        data_loading.build_datasets("mnist", tmp_path / "data", download=True)
    assert calls, "a download is attempted when the files are missing and download=True"
    msg = str(err.value)
    assert str((tmp_path / "data" / "MNIST" / "raw").resolve()) in msg
    for name in MNIST_FILES:
        assert name in msg
    assert "download failed" in msg and "--task DIGITS" in msg


# ------------------------------------------------------------------------------------- SVHN


def test_svhn_labels_normalisation_and_shift_without_flip(tmp_path):
    fake = write_fake_svhn(tmp_path, n_train=5, n_test=3)
    with pytest.warns(UserWarning, match="official checksums"):
        train, test = data_loading.build_datasets("SVHN", tmp_path, data_aug=True)
    assert (len(train), len(test)) == (5, 3)
    assert data_loading.dataset_labels(train).tolist() == [0, 1, 2, 3, 4]
    assert test[0][1] == 0  # stored as 10 in the file
    image = test[2][0]
    r, g, b = (int(v) for v in fake["test_images"][2, :, 30, 1])
    assert image[0, 30, 1].item() == pytest.approx((r / 255 - 0.4914) / (3 * 0.2023), abs=1e-5)
    assert image[1, 30, 1].item() == pytest.approx((g / 255 - 0.4822) / (3 * 0.1994), abs=1e-5)
    assert image[2, 30, 1].item() == pytest.approx((b / 255 - 0.4465) / (3 * 0.2010), abs=1e-5)

    mean = np.array([0.4914, 0.4822, 0.4465]).reshape(3, 1, 1)
    std = np.array([0.6069, 0.5982, 0.6030]).reshape(3, 1, 1)
    plain = ((fake["train_images"][1] / 255.0 - mean) / std).astype(np.float32)
    assert_random_shifts(train, 1, plain, pad=4, draws=12, seed=3)


# ------------------------------------------------------------------------------------- DIGITS


def test_digits_fixed_stratified_split():
    from sklearn.datasets import load_digits

    train, test = data_loading.build_datasets("DIGITS")
    assert (len(train), len(test)) == (1437, 360)
    train_idx, test_idx = set(train.indices.tolist()), set(test.indices.tolist())
    assert not train_idx & test_idx and len(train_idx | test_idx) == 1797

    # Class sizes of the 1797 digits: 178 182 177 183 181 182 181 179 174 180; a stratified 20%
    # test split holds round(0.2 * size) of each, give or take one.
    sizes = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    test_counts = np.bincount(data_loading.dataset_labels(test).numpy(), minlength=10)
    assert all(abs(c - 0.2 * s) <= 1 for c, s in zip(test_counts, sizes, strict=True))

    image, label = test[4]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert 0.0 <= train.data.min() and train.data.max() == 1.0
    assert torch.equal(train.data * 16, torch.round(train.data * 16))
    digits = load_digits()
    k = int(test.indices[4])
    assert label == digits.target[k]
    assert np.allclose(image[0].numpy(), digits.images[k] / 16.0)
    assert data_loading.build_datasets("digits")[1].indices.tolist() == test.indices.tolist()
    # The split is pinned: results of runs made at different times must use the same test set.
    assert sorted(test.indices.tolist())[:8] == [21, 24, 28, 34, 35, 37, 39, 42]


def test_digits_augmentation_shifts_only_train():
    train, test = data_loading.build_datasets("DIGITS", data_aug=True)
    plain = train.data[10].numpy()
    assert plain.shape == (1, 8, 8)
    assert_random_shifts(train, 10, plain, pad=1, draws=10, seed=2)
    assert np.array_equal(test[3][0].numpy(), test.data[3].numpy())


def test_dataset_labels_through_subsets_and_without_targets():
    base = TensorDataset(torch.zeros(6, 1), torch.tensor([5, 4, 3, 2, 1, 0]))
    assert data_loading.dataset_labels(base).tolist() == [5, 4, 3, 2, 1, 0]
    nested = Subset(Subset(base, [1, 3, 5]), [2, 0])
    assert data_loading.dataset_labels(nested).tolist() == [0, 4]
    train, _ = data_loading.build_datasets("DIGITS")
    assert data_loading.dataset_labels(Subset(train, [0, 1])).tolist() == [train[0][1], train[1][1]]


# ------------------------------------------------------------------------------------- loaders


def _order(loader) -> list[int]:
    return [int(v) for (batch,) in loader for v in batch]


def test_make_loader_seeded_order_and_subsets():
    data = TensorDataset(torch.arange(20))
    a = data_loading.make_loader(data, batch_size=8, shuffle=True, seed=5)
    b = data_loading.make_loader(data, batch_size=8, shuffle=True, seed=5)
    first_a, first_b = _order(a), _order(b)
    assert first_a == first_b and sorted(first_a) == list(range(20))
    assert first_a != list(range(20))
    assert _order(a) == _order(b) != first_a  # next epoch: new order, still reproducible
    assert _order(data_loading.make_loader(data, 8, True, seed=6)) != first_a
    assert [len(x) for (x,) in a] == [8, 8, 4]

    plain = data_loading.make_loader(data, batch_size=3, shuffle=False)
    assert _order(plain) == list(range(20))
    sub = data_loading.make_loader(data, 2, shuffle=True, seed=0, indices=torch.tensor([3, 9, 11]))
    assert sorted(_order(sub)) == [3, 9, 11]
    assert plain.pin_memory == torch.cuda.is_available()


# ---------------------------------------- archives, pickles and missing data from a run's view


@pytest.mark.parametrize("unsafe", ["../escaped.txt", "/tmp/absolute.txt", "link"])
def test_archive_member_outside_the_data_folder_is_refused(tmp_path, unsafe):
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as tar:
        ok = tarfile.TarInfo("cifar-10-batches-py/readme.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        member = tarfile.TarInfo(unsafe)
        if unsafe == "link":  # a symlink pointing outside, then a file written through it
            member.type, member.linkname = tarfile.SYMTYPE, str(tmp_path)
            tar.addfile(member)
        else:
            member.size = 4
            tar.addfile(member, io.BytesIO(b"evil"))
    with pytest.raises(entry.UsageError, match="refusing to unpack .* is unsafe"):
        data_loading.build_datasets("CIFAR10", data, download=False)
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/absolute.txt").exists()
    assert not (data / "cifar-10-batches-py").exists(), "nothing is unpacked from such an archive"


def test_modified_cifar_files_are_checked_before_torchvision_unpickles_them(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path, n_train_per_batch=2, n_test=2)
    order = []
    real_check = data_loading._DataOnlyUnpickler.load
    real_load = pickle.load

    def checked(self):
        order.append("restricted")
        return real_check(self)

    def unrestricted(*args, **kwargs):
        order.append("unrestricted")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(data_loading._DataOnlyUnpickler, "load", checked)
    monkeypatch.setattr(tv_cifar.pickle, "load", unrestricted)
    with pytest.warns(UserWarning, match="official checksums"):
        data_loading.build_datasets("CIFAR10", tmp_path, download=False)
    assert order[:7] == ["restricted"] * 7 and "unrestricted" in order


def test_missing_dataset_is_one_line(tmp_path, capsys):
    argv = with_cifar = DIGITS_CNN + ["--task", "CIFAR10", "--no-download"]
    argv = [*with_cifar, "--data-dir", str(tmp_path), "--channels", "4", "--kernels", "3"]
    line = one_error_line(run_failing(argv, capsys))
    assert f"CIFAR10 data not found in {tmp_path} (downloading is off): put data_batch_1" in line
    assert "--task DIGITS" in line


def test_download_into_an_unwritable_data_dir_is_a_storage_error(tmp_path, monkeypatch, capsys):
    def denied(url, download_root, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), download_root)

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", denied)
    argv = DIGITS_CNN + ["--task", "CIFAR10", "--data-dir", str(tmp_path), "--channels", "4"]
    line = one_error_line(run_failing([*argv, "--kernels", "3"], capsys, status=74))
    assert f"({tmp_path}): Permission denied [EACCES]" in line
