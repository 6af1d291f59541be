"""Robustness of a saved run: natural corruptions, white-box and black-box attacks.

    python robustness.py --load-path RUN_DIR [--attacks ...] [--eps ...] [--eps-l2 ...]

The run's best model (``model.pt``, else ``final_model.pt``) classifies test images given in
pixel space, ``p`` in [0, 1]: its task's normalisation, the LCA encode for an LCACNN, then T1
free steps from zero; the logits are the readout of that free state. On ``--n-samples`` test
images drawn with ``--seed`` it measures:

* ``corruptions``: the 15 corruptions of CIFAR-10-C and its 4 extra ones at severities 1-5,
  read from ``<data-dir>/CIFAR-10-C/<name>.npy`` (``CIFAR-100-C`` for CIFAR100) when there,
  else generated with ``corrupt_tta`` (the ImageNet-C corruptions, any image size);
* ``pgd-linf``, ``pgd-l2``, ``apgd-linf``, ``apgd-l2``: PGD and APGD-CE of the
  adversarial-robustness-toolbox (ART) at every epsilon of ``--eps`` (L-inf) or ``--eps-l2``,
  once per input gradient of ``--gradients``:
  ``bptt``, backpropagation through the LCA encode and all T1 steps (in chunks of
  ``--grad-chunk`` images to bound memory); ``ep``, the EP estimate of the engine
  (``EnergyNet.input_gradient_ep``) from two nudged phases at +-``--beta``, with no graph
  through the dynamics (for an LCACNN it gives the gradient w.r.t. the LCA code, which is then
  backpropagated through the LCA encode alone);
* ``square-linf``, ``square-l2``: ART's Square attack, query-based and gradient-free, with
  ``--queries`` iterations.

A white-box attack that leaves a higher accuracy than the Square attack at the same norm and
epsilon points to gradient masking: those cases are flagged. Written to the run folder:
``robustness.csv`` (attack, norm, epsilon, severity, gradient, accuracy, samples, seconds),
``robustness.png``, a summary appended to ``hyperparameters.txt`` and, with
``--tensorboard``, the sub-run ``tb/robustness`` (``run_board``). Exit statuses and
one-line errors are those of ``entry.py`` (2 bad input, 74 a file could not be written or
read, 130 / 143 Ctrl-C / SIGTERM: the rows measured so far stay in ``robustness.csv``).
"""

from __future__ import annotations

import entry

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the libraries load: no traceback
    entry.install_stop_handlers()

import argparse
import functools
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import data_loading
import data_utils
import records
import run_board
import runs
import storage
from distributed import resolve_device
from entry import UsageError
from lca_utils_ep_fast import LCA_CNN
from utils_ep_fast import EnergyNet, settle

ROBUSTNESS_CSV = "robustness.csv"
ROBUSTNESS_PNG = "robustness.png"
CSV_COLUMNS = (
    "attack",
    "norm",
    "epsilon",
    "severity",
    "gradient",
    "accuracy",
    "samples",
    "seconds",
)
ATTACKS = ("corruptions", "pgd-linf", "pgd-l2", "apgd-linf", "apgd-l2", "square-linf", "square-l2")
GRADIENTS = ("bptt", "ep")
# The 15 corruptions of CIFAR-10-C, then its 4 extra ones.
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate",
)  # fmt: skip
SEVERITIES = (1, 2, 3, 4, 5)
RELEASE_FOLDERS = {"CIFAR10": "CIFAR-10-C", "CIFAR100": "CIFAR-100-C"}
STORAGE_FIX = "free space or make the run folder writable; robustness.csv keeps the rows so far"
KEPT_NOTE = "; robustness.csv keeps the rows measured so far"


@dataclass(frozen=True)
class AttackBudget:
    """What an attack may spend: ``batch_size`` images at a time, ``steps`` iterations of PGD
    and APGD, ``queries`` iterations of the Square attack."""

    batch_size: int
    steps: int
    queries: int


# --------------------------------------------------------------------------------------------
# The model as a classifier of pixels
# --------------------------------------------------------------------------------------------


class PixelClassifier(nn.Module):
    """A saved network as a classifier of images ``p`` (B, C, H, W) with pixels in [0, 1].

    ``x = (p - mean) / std`` (the task's test normalisation), the LCA code of ``x`` for an
    LCACNN, T1 free steps from zero; the logits (B, classes) are ``output_logits`` of that
    state. ``input_gradient`` gives ``dL/dp`` of the model's own per-sample loss ``L``.
    """

    def __init__(
        self,
        model: EnergyNet,
        task: str,
        T1: int,
        T2: int,
        beta: float,
        chunk: int,
    ) -> None:
        super().__init__()
        self.model = model
        self.T1, self.T2, self.beta, self.chunk = T1, T2, beta, chunk
        mean, std = data_loading.input_normalization(task)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def normalise(self, pixels: Tensor) -> Tensor:
        """``(p - mean) / std``, what the model was trained on."""
        return (pixels - self.mean) / self.std

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> Tensor:
        """Logits (B, classes) of the free state after T1 steps; no graph."""
        labels = torch.zeros(pixels.shape[0], dtype=torch.long, device=pixels.device)
        free = settle(self.model, self.normalise(pixels), labels, self.T1)[1]
        return self.model.output_logits(free)

    @torch.no_grad()
    def losses(self, pixels: Tensor, labels: Tensor) -> Tensor:
        """The model's per-sample loss (B,) at the free state after T1 steps."""
        free = settle(self.model, self.normalise(pixels), labels, self.T1)[1]
        return self.model.loss(free, labels)

    def code_with_graph(self, pixels: Tensor) -> Tensor:
        """The system's fixed input for ``pixels``, with an autograd graph back to them: the
        normalised images, or for an LCACNN their LCA code (the LCA loop run with a graph)."""
        images = self.normalise(pixels)
        if not isinstance(self.model, LCA_CNN):
            return images
        lca = self.model.lca
        tracked = lca.req_grad
        lca.req_grad = True  # LCAConv2D builds its graph (inputs included) only when asked
        try:
            return lca(images)[1]
        finally:
            lca.req_grad = tracked

    def input_gradient(self, pixels: Tensor, labels: Tensor, kind: str) -> Tensor:
        """``dL/dp`` (B, C, H, W) by ``bptt`` or ``ep``, computed ``chunk`` images at a time."""
        method = self._bptt_gradient if kind == "bptt" else self._ep_gradient
        parts = [
            method(pixels[start : start + self.chunk], labels[start : start + self.chunk])
            for start in range(0, pixels.shape[0], self.chunk)
        ]
        return torch.cat(parts)

    def _bptt_gradient(self, pixels: Tensor, labels: Tensor) -> Tensor:
        """Backpropagation through the whole dynamics: the encode and all T1 steps."""
        pixels = pixels.detach().requires_grad_(True)
        with torch.enable_grad():
            code = self.code_with_graph(pixels)
            final = self.model(
                code, labels, self.model.init_neurons(code), self.T1, track_grad=True
            )
            loss = self.model.loss(final, labels).sum()
            return torch.autograd.grad(loss, pixels)[0]

    def _ep_gradient(self, pixels: Tensor, labels: Tensor) -> Tensor:
        """The EP estimate of ``dL/dcode`` at the free fixed point, carried back to the pixels
        through the (cheap) encode: the normalisation, and the LCA loop for an LCACNN."""
        pixels = pixels.detach().requires_grad_(True)
        with torch.enable_grad():
            code = self.code_with_graph(pixels)
        fixed = code.detach()
        free = self.model(fixed, labels, self.model.init_neurons(fixed), self.T1)
        code_gradient = self.model.input_gradient_ep(fixed, labels, free, self.T2, self.beta)
        return torch.autograd.grad(code, pixels, code_gradient.reshape(code.shape))[0]

    @torch.no_grad()
    def accuracy(self, pixels: Tensor, labels: Tensor, batch_size: int) -> float:
        """Fraction of ``pixels`` classified as ``labels``, ``batch_size`` images at a time."""
        correct = 0
        for start in range(0, pixels.shape[0], batch_size):
            logits = self(pixels[start : start + batch_size])
            correct += (logits.argmax(1) == labels[start : start + batch_size]).sum().item()
        return correct / pixels.shape[0]


def art_classifier(net: PixelClassifier, gradient: str, input_shape, classes: int, device):
    """``net`` as an ART ``PyTorchClassifier`` whose loss and input gradient are the model's
    own: ``loss_gradient`` is ``net.input_gradient(.., gradient)`` (``bptt`` or ``ep``), and
    ``compute_loss`` the model's loss at the free state."""
    from art.estimators.classification import PyTorchClassifier

    class EnergyClassifier(PyTorchClassifier):
        def _labels(self, y) -> Tensor:
            labels = torch.as_tensor(np.asarray(y) if isinstance(y, np.ndarray) else y)
            labels = labels.argmax(1) if labels.dim() == 2 else labels
            return labels.to(device=device, dtype=torch.long)

        def loss_gradient(self, x, y, training_mode: bool = False, **kwargs):
            pixels = torch.as_tensor(x, dtype=torch.float32, device=device)
            grad = net.input_gradient(pixels, self._labels(y), gradient)
            return grad.cpu().numpy() if isinstance(x, np.ndarray) else grad.to(x.device)

        def compute_loss(self, x, y, reduction: str = "none", **kwargs):
            pixels = torch.as_tensor(x, dtype=torch.float32, device=device)
            losses = net.losses(pixels, self._labels(y))
            losses = {"mean": losses.mean(), "sum": losses.sum()}.get(reduction, losses)
            return losses.cpu().numpy() if isinstance(x, np.ndarray) else losses

    return EnergyClassifier(
        model=net,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if device.type == "cuda" else "cpu",
    )


def make_attack(name: str, classifier, eps: float, budget: AttackBudget):
    """The ART attack ``name`` (``pgd-linf`` ... ``square-l2``) at ``eps``: PGD with step
    ``2.5 eps / steps`` and a random start, APGD-CE (the model's loss) with ``budget.steps``
    iterations, Square with ``budget.queries`` iterations."""
    from art.attacks.evasion import (
        AutoProjectedGradientDescent,
        ProjectedGradientDescent,
        SquareAttack,
    )

    kind, norm_name = name.split("-")
    norm = np.inf if norm_name == "linf" else 2
    common = {"norm": norm, "eps": eps, "batch_size": budget.batch_size, "verbose": False}
    # ART wants a positive step even at eps = 0, where the projection undoes any step
    tiny = 1e-12
    if kind == "pgd":
        return ProjectedGradientDescent(
            classifier, eps_step=max(2.5 * eps / budget.steps, tiny), max_iter=budget.steps,
            num_random_init=1, **common,
        )  # fmt: skip
    if kind == "apgd":
        return AutoProjectedGradientDescent(
            classifier, eps_step=max(2.0 * eps, tiny), max_iter=budget.steps, nb_random_init=1,
            loss_type=None, **common,
        )  # fmt: skip
    return SquareAttack(classifier, max_iter=budget.queries, nb_restarts=1, **common)


def attack_images(
    name: str, classifier, eps: float, budget: AttackBudget, pixels: Tensor, labels: Tensor
) -> Tensor:
    """Adversarial versions of ``pixels`` (N, C, H, W) by the attack ``name`` at ``eps``. ART's
    APGD and Square refuse a zero radius: there the images come back unchanged."""
    if eps == 0.0 and not name.startswith("pgd"):
        return pixels
    with np.errstate(divide="ignore", invalid="ignore"):  # ART's Square L2 on tiny windows
        adversarial = make_attack(name, classifier, eps, budget).generate(
            x=pixels.cpu().numpy(), y=labels.cpu().numpy()
        )
    return torch.as_tensor(adversarial, dtype=torch.float32, device=pixels.device)


# --------------------------------------------------------------------------------------------
# Corruptions
# --------------------------------------------------------------------------------------------


def release_folder(task: str, data_dir: str | Path) -> Path | None:
    """``<data_dir>/CIFAR-10-C`` (or ``CIFAR-100-C``) when it exists for ``task``, else None."""
    name = RELEASE_FOLDERS.get(task)
    folder = Path(data_dir) / name if name else None
    return folder if folder is not None and folder.is_dir() else None


def read_release(
    folder: Path, name: str, n_test: int, image_shape: tuple[int, int, int], indices: Tensor
) -> dict[int, tuple[Tensor, Tensor]]:
    """Severity -> (pixels (n, C, H, W) in [0, 1], labels (n,)) of the test images ``indices``
    from the released ``folder/<name>.npy``: uint8 (5 * n_test, H, W, C), severity ``s`` in rows
    ``(s - 1) * n_test .. s * n_test``, with ``folder/labels.npy`` (5 * n_test,).

    Raises UsageError for a file that is missing, unreadable or of another shape or type."""
    channels, height, width = image_shape
    expected = (len(SEVERITIES) * n_test, height, width, channels)
    images = _load_npy(folder / f"{name}.npy", expected, np.uint8)
    labels = _load_npy(folder / "labels.npy", expected[:1], None)
    by_severity = {}
    for severity in SEVERITIES:
        rows = (severity - 1) * n_test + indices.numpy()
        block = torch.from_numpy(np.ascontiguousarray(images[rows]))
        pixels = block.permute(0, 3, 1, 2).float() / 255.0
        by_severity[severity] = pixels, torch.from_numpy(np.asarray(labels[rows])).long()
    return by_severity


def _load_npy(path: Path, shape: tuple[int, ...], dtype) -> np.ndarray:
    """The array of ``path`` (memory-mapped), checked to have ``shape`` (and ``dtype``)."""
    if not path.is_file():
        raise UsageError(f"{path} is missing: put the whole release in {path.parent}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise UsageError(f"cannot read {path}: {entry.first_line(error)}") from error
    if array.shape != shape or (dtype is not None and array.dtype != dtype):
        wanted = f"{np.dtype(dtype).name} " if dtype is not None else ""
        raise UsageError(
            f"{path} holds {array.dtype.name} {array.shape}, expected {wanted}{shape} "
            f"(severities 1-5 of the test set in blocks): replace it with the released file"
        )
    return array


def generate_corruption(pixels: Tensor, name: str, severity: int, seed: int) -> Tensor:
    """``pixels`` (N, C, H, W) in [0, 1] corrupted by ``corrupt_tta`` (which takes RGB uint8
    images: a grey image is repeated over 3 channels, and the result averaged back), in [0, 1].
    NumPy's global generator is seeded with ``seed`` first."""
    from corrupt_tta import corrupt

    np.random.seed(seed)
    images = (pixels * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    grey = images.shape[-1] == 1
    out = np.empty(images.shape, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, image in enumerate(images):
            rgb = np.repeat(image, 3, axis=2) if grey else image
            corrupted = np.asarray(corrupt(rgb, severity=severity, corruption_name=name))
            corrupted = np.clip(corrupted.astype(np.float32), 0.0, 255.0)
            out[i] = corrupted.mean(2, keepdims=True) if grey else corrupted
    return torch.from_numpy(out / 255.0).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


# (flag, argparse keywords); every flag also has its underscore spelling
FLAGS: tuple[tuple[str, dict], ...] = (
    ("--load-path", {"required": True, "help": "run folder (or model file) to evaluate"}),
    ("--data-dir", {"default": None, "help": "datasets and CIFAR-10-C; default: the run's"}),
    ("--no-download", {"action": "store_true", "help": "never download a missing dataset"}),
    ("--n-samples", {"type": int, "default": 1000, "help": "test images (all if fewer)"}),
    ("--mbs", {"type": int, "default": 100, "help": "images per batch of evaluation/attack"}),
    ("--device", {"default": "0", "help": "GPU index (the CPU without CUDA) or 'cpu'"}),
    ("--seed", {"type": int, "default": 0, "help": "seed of the test subset and the attacks"}),
    ("--attacks", {"nargs": "+", "default": list(ATTACKS), "help": ", ".join(ATTACKS)}),
    ("--gradients", {"nargs": "+", "default": list(GRADIENTS), "help": "bptt and/or ep"}),
    ("--eps", {"type": float, "nargs": "+", "default": [0.0, 0.03, 0.1, 0.3],
               "help": "L-inf epsilons (pixels in [0, 1])"}),
    ("--eps-l2", {"type": float, "nargs": "+", "default": [0.0, 0.5, 1.0, 2.0],
                  "help": "L2 epsilons"}),
    ("--steps", {"type": int, "default": 10, "help": "iterations of PGD and APGD"}),
    ("--queries", {"type": int, "default": 300, "help": "iterations of the Square attack"}),
    ("--corruptions", {"nargs": "+", "default": list(CORRUPTIONS), "help": "their names"}),
    ("--severities", {"type": int, "nargs": "+", "default": list(SEVERITIES), "help": "1-5"}),
    ("--T1", {"type": int, "default": None, "help": "free-phase steps; default: the run's"}),
    ("--T2", {"type": int, "default": None, "help": "EP nudged-phase steps; default: the run's"}),
    ("--beta", {"type": float, "default": 0.01, "help": "nudging of the EP input gradient"}),
    ("--grad-chunk", {"type": int, "default": 16, "help": "images per backpropagated chunk"}),
    ("--tensorboard", {"action": "store_true", "help": "a TensorBoard log in RUN/tb/robustness"}),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``FLAGS``; a bad one raises UsageError (one line) instead of exiting."""
    parser = entry.command_parser(
        "robustness.py", "Accuracy of a saved run under corruptions and adversarial attacks."
    )
    for name, keywords in FLAGS:
        dest = name[2:].replace("-", "_")
        parser.add_argument(*entry.flag_spellings(name), dest=dest, **keywords)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """UsageError for any setting that cannot run, before anything is read or written."""
    for name in ("n_samples", "mbs", "steps", "queries", "grad_chunk"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("T1", "T2"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    _check_names("--attacks", args.attacks, ATTACKS)
    _check_names("--gradients", args.gradients, GRADIENTS)
    _check_names("--corruptions", args.corruptions, CORRUPTIONS)
    _check_names("--severities", args.severities, SEVERITIES)
    for flag, values in (("--eps", args.eps), ("--eps-l2", args.eps_l2)):
        bad = [value for value in values if not value >= 0.0]
        if bad:
            raise UsageError(f"{flag} takes epsilons >= 0, got {bad[0]}")
    if max(args.eps) > 1.0:
        raise UsageError(f"--eps {max(args.eps)} exceeds the pixel range [0, 1]")
    if not args.beta > 0.0:
        raise UsageError(f"--beta must be > 0, got {args.beta}")


def _check_names(flag: str, given: Sequence, known: Sequence) -> None:
    unknown = [value for value in given if value not in known]
    if unknown:
        choices = ", ".join(str(value) for value in known)
        raise UsageError(f"{flag}: unknown {unknown[0]!r}; choose among {choices}")


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------


def sample_test_pixels(
    task: str, data_dir: str, download: bool, n_samples: int, seed: int
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``n_samples`` test images of ``task`` (in ``data_dir``, downloaded there when missing
    and ``download``) drawn with ``seed`` (all if fewer): their indices (sorted), pixels
    (N, C, H, W) in [0, 1] (the normalisation undone), labels (N,), and the test-set size."""
    _, test_set = data_loading.build_datasets(task, data_dir, download=download)
    n_test = len(test_set)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(n_test, generator=generator)[: min(n_samples, n_test)].sort().values
    images = torch.stack([test_set[int(i)][0] for i in indices])
    labels = torch.tensor([int(test_set[int(i)][1]) for i in indices])
    mean, std = data_loading.input_normalization(task)
    pixels = images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    return indices, pixels.clamp(0.0, 1.0), labels, n_test


def plan_jobs(args: argparse.Namespace) -> list[tuple]:
    """Every measurement asked for, in order: ``("corruption", name, severity)`` and
    ``(attack, norm, eps, gradient)``."""
    jobs: list[tuple] = []
    if "corruptions" in args.attacks:
        jobs += [("corruption", n, s) for n in args.corruptions for s in sorted(args.severities)]
    for attack in args.attacks:
        if attack == "corruptions":
            continue
        norm = attack.split("-")[1]
        epsilons = args.eps if norm == "linf" else args.eps_l2
        gradients = ["none"] if attack.startswith("square") else args.gradients
        jobs += [(attack, norm, eps, g) for eps in epsilons for g in gradients]
    return jobs


def masking_flags(rows: list[dict]) -> list[str]:
    """Cases of suspected gradient masking: a white-box attack that leaves a higher accuracy
    than the Square attack at the same norm and epsilon."""
    square = {
        (row["norm"], row["epsilon"]): row["accuracy"]
        for row in rows
        if row["attack"].startswith("square")
    }
    flags = []
    for row in rows:
        black_box = square.get((row["norm"], row["epsilon"]))
        if row["gradient"] in GRADIENTS and black_box is not None:
            if row["accuracy"] > black_box:
                flags.append(
                    f"{row['attack']} ({row['gradient']}) at eps {row['epsilon']:g}: "
                    f"{row['accuracy']:.3f} > square {black_box:.3f}"
                )
    return flags


def summary_lines(rows: list[dict], flags: list[str], header: str) -> list[str]:
    """The summary printed and appended to hyperparameters.txt."""
    lines = [header]
    for row in rows:
        if row["attack"] == "clean" or row["attack"] == "corruption_mean":
            lines.append(f"  {row['attack']}: {row['accuracy']:.4f}")
        elif row["norm"] != "none":
            lines.append(
                f"  {row['attack']} eps {row['epsilon']:g} {row['gradient']}: "
                f"{row['accuracy']:.4f} ({row['seconds']:.1f} s)"
            )
    if flags:
        lines.append("  gradient masking suspected (white-box above black-box):")
        lines += [f"    {flag}" for flag in flags]
    return lines


def run(args: argparse.Namespace) -> list[dict]:
    """Evaluate the run of ``--load-path``; write its files; return the CSV rows."""
    check_args(args)
    record, model_path = records.load_model_file(args.load_path)
    saved = record["args"]
    task = data_loading.canonical_task(saved["task"])
    data_dir = args.data_dir or saved.get("data_dir", "./data")
    T1 = args.T1 or int(saved["T1"])
    T2 = args.T2 or int(saved["T2"])
    budget = AttackBudget(args.mbs, args.steps, args.queries)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # ART puts its tensors on the current CUDA device
    model = records.restore_model(record, device).eval()
    model.safe_point = entry.raise_if_stopped  # Ctrl-C and SIGTERM stop between steps
    channels, height, width, classes = data_loading.task_info(task)
    indices, pixels, labels, n_test = sample_test_pixels(
        task, data_dir, not args.no_download, args.n_samples, args.seed
    )
    release = release_folder(task, data_dir) if "corruptions" in args.attacks else None
    released = {}
    if release is not None:  # read (and check) every file before anything is written
        for name in args.corruptions:
            released[name] = read_release(release, name, n_test, (channels, height, width), indices)
    net = PixelClassifier(model, task, T1, T2, args.beta, args.grad_chunk).to(device)
    pixels, labels = pixels.to(device), labels.to(device)
    csv_path = model_path.parent / ROBUSTNESS_CSV
    csv_path.unlink(missing_ok=True)
    rows: list[dict] = []
    board = run_board.robustness_board(model_path.parent, args.tensorboard, T1)

    def record_row(attack, norm, eps, severity, gradient, accuracy, n, seconds) -> None:
        row = dict(zip(CSV_COLUMNS, (attack, norm, eps, severity, gradient, accuracy, n,
                                     seconds), strict=True))  # fmt: skip
        rows.append(row)
        storage.append_csv_row(csv_path, row)
        run_board.log_robustness_row(board, row, T1)

    records.seed_everything(args.seed)
    started = time.perf_counter()
    clean = net.accuracy(pixels, labels, args.mbs)
    record_row("clean", "none", 0.0, 0, "none", clean, len(labels), time.perf_counter() - started)
    source = f"read from {release}" if release is not None else "generated by corrupt_tta"
    print(f"{task}, {model_path}: {len(labels)} test images, T1 {T1}, clean accuracy {clean:.4f}")
    corruption_accuracies = []
    classifiers = {}
    for job in tqdm(plan_jobs(args), desc="robustness", dynamic_ncols=True):
        started = time.perf_counter()
        if job[0] == "corruption":
            _, name, severity = job
            if name in released:
                corrupted, truth = (t.to(device) for t in released[name][severity])
            else:
                corrupted = generate_corruption(pixels, name, severity, args.seed + severity)
                corrupted, truth = corrupted.to(device), labels
            accuracy = net.accuracy(corrupted, truth, args.mbs)
            corruption_accuracies.append(accuracy)
            record_row(name, "none", 0.0, severity, "none", accuracy, len(truth),
                       time.perf_counter() - started)  # fmt: skip
            continue
        attack, norm, eps, gradient = job
        if gradient not in classifiers:
            classifiers[gradient] = art_classifier(
                net, "bptt" if gradient == "none" else gradient,
                (channels, height, width), classes, device,
            )  # fmt: skip
        records.seed_everything(args.seed)
        adversarial = attack_images(attack, classifiers[gradient], eps, budget, pixels, labels)
        accuracy = net.accuracy(adversarial, labels, args.mbs)
        record_row(attack, norm, eps, 0, gradient, accuracy, len(labels),
                   time.perf_counter() - started)  # fmt: skip
    if corruption_accuracies:
        mean = float(np.mean(corruption_accuracies))
        record_row("corruption_mean", "none", 0.0, 0, "none", mean, len(labels), 0.0)
        print(f"corruptions ({source}): mean accuracy {mean:.4f}")
    flags = masking_flags(rows)
    storage.save_figure(data_utils.plot_robustness(rows), model_path.parent / ROBUSTNESS_PNG)
    header = (
        f"robustness {model_path.name} (epoch {record['epoch']}, T1 {T1}, {len(labels)} test "
        f"images, seed {args.seed}, T2 {T2}, beta {args.beta}, {args.steps} steps, "
        f"{args.queries} queries):"
    )
    lines = summary_lines(rows, flags, header)
    print("\n".join(lines))
    storage.append_text(model_path.parent, runs.HYPERPARAMETERS_TXT, "\n".join(lines))
    print(f"written: {csv_path}, {model_path.parent / ROBUSTNESS_PNG}")
    board.close()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        return entry.fail(str(error), entry.EXIT_USAGE)
    work = functools.partial(run, args)
    return entry.run_script(work, storage.ERROR_STATUSES, STORAGE_FIX, KEPT_NOTE)


if __name__ == "__main__":
    sys.exit(main())
