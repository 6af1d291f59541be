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
  (``estimators.input_gradient``) from two nudged phases at +-``--beta``, with no graph
  through the dynamics (for an LCACNN it gives the gradient w.r.t. the LCA code, which is then
  backpropagated through the LCA encode alone);
  ``bpda``, backpropagation with every clamp and LCA threshold straight-through;
* ``square-linf``, ``square-l2``: ART's Square attack, query-based and gradient-free, with
  ``--queries`` iterations;
* ``autoattack``: AutoAttack's standard version (``autoattack.py``) per norm, epsilon and
  gradient, a row per component and the worst case, each component's per-image results saved
  under ``autoattack/`` so that a resumed run gives the same worst case;
* with ``--checks``, the adaptive-attack checks (convergence in steps and restarts, PGD at
  L-inf eps 1, white-box vs Square) and their results line.

A cross-entropy model's white-box attacks ascend the CE of the logits through the chosen
gradient (``attacks.attack_classifier``; EP nudged by that cost); an MSE model's its own loss.
Without ``--eps`` / ``--eps-l2`` the task's benchmark epsilons are used.

A white-box attack that leaves a higher accuracy than the Square attack at the same norm and
epsilon points to gradient masking: those cases are flagged. Everything is measured at each T1
of ``--T1`` (default: the run's own).

Written to the run folder, under a lock of its own (``.robustness.lock``, beside a training
run's ``.lock``, whose half-written files it leaves alone), and never into a training run's
files: ``robustness.csv``, one row per measurement (attack, norm, epsilon, severity, gradient,
accuracy, samples, seconds, then T1 and every setting the result depends on: T2, beta, steps,
queries, restarts, batch size, seed, the sample set, and a hash of the model's weights; ``-``
where a setting does not apply), rewritten atomically after each row; ``robustness.png``; and
``robustness.txt``, the summary; with ``--tensorboard``, the sub-run ``tb/robustness``
(``run_board``). Re-running a command reuses every row whose key matches
and computes the rest (``--fresh``: all); CSVs of 8 columns, written before the settings were
recorded, are read and kept, and match no new row. Exit statuses and one-line errors are those
of ``entry.py`` (2 bad input, checked before anything is written; 74 the run folder cannot be
written, checked before any attack; 75 another evaluation holds the folder; 130 / 143 Ctrl-C
/ SIGTERM: the finished rows stay, and the command that continues is printed).
"""

from __future__ import annotations

import entry

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the libraries load: no traceback
    entry.install_stop_handlers()

import argparse
import dataclasses
import functools
import hashlib
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import attacks
import autoattack
import data_loading
import data_utils
import estimators
import records
import run_board
import storage
from corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    generate_corruption,
    read_release,
    release_folder,
)
from distributed import resolve_device
from entry import UsageError
from lca_utils_ep_fast import LCA_CNN
from robustness_results import (
    AUTOATTACK,
    CHECK,
    UNBOUNDED,
    Job,
    ResultsFile,
    job_row,
    row_key,
    sample_set_id,
    weights_hash,
)
from utils_ep_fast import CLAMP_SLOPES, EnergyNet, settle

ROBUSTNESS_CSV = "robustness.csv"
ROBUSTNESS_PNG = "robustness.png"
ROBUSTNESS_TXT = "robustness.txt"
# beside a training run's .lock, whose holder must keep its half-written .tmp files
LOCK_FILE = ".robustness.lock"
DEFAULT_ATTACKS = ("corruptions", "pgd-linf", "pgd-l2", "apgd-linf", "apgd-l2", "square-linf",
                   "square-l2")  # fmt: skip
ATTACKS = (*DEFAULT_ATTACKS, "autoattack")
AUTOATTACK_FOLDER = "autoattack"  # per-component results (.pt) and per-image tables (.csv)
GRADIENTS = ("bptt", "bpda", "ep")
DEFAULT_GRADIENTS = ("bptt", "ep")
STORAGE_FIX = "free space or make the run folder writable; robustness.csv keeps the rows so far"
KEPT_NOTE = "; robustness.csv keeps the rows measured so far"


@dataclass(frozen=True)
class AttackBudget:
    """What an attack may spend: ``batch_size`` images at a time, ``steps`` iterations of PGD
    and APGD, ``queries`` iterations of the Square attack, ``restarts`` random starts of each."""

    batch_size: int
    steps: int
    queries: int
    restarts: int = 1


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

    def logits_with_graph(self, pixels: Tensor) -> Tensor:
        """The logits (B, classes) with an autograd graph back to ``pixels`` through the
        encode and all T1 steps."""
        code = self.code_with_graph(pixels)
        labels = torch.zeros(pixels.shape[0], dtype=torch.long, device=pixels.device)
        final = self.model(code, labels, self.model.init_neurons(code), self.T1, track_grad=True)
        return self.model.output_logits(final)

    def ep_gradient(self, pixels: Tensor, cost: attacks.LogitCost) -> Tensor:
        """The EP estimate of ``dA/dp`` (B, C, H, W) of the cost ``A`` on the logits: the
        nudged phases follow ``A`` itself (``attacks.output_nudge``), ``chunk`` images at a
        time, carried back to the pixels through the encode."""
        parts = []
        for start in range(0, pixels.shape[0], self.chunk):
            rows = cost.rows(start, start + self.chunk)
            readout = self.model.readout

            def nudge(state: Tensor, rows=rows, readout=readout) -> Tensor:
                return attacks.output_nudge(rows, state, readout)

            chunk = pixels[start : start + self.chunk]
            parts.append(self._ep_through_encode(chunk, rows.labels, nudge))
        return torch.cat(parts)

    def cost_gradient(self, kind: str) -> attacks.InputGradient:
        """``(p, cost) -> dA/dp`` by ``bptt`` (backpropagation through the dynamics), ``bpda``
        (the same with every clamp and LCA threshold straight-through) or ``ep``."""
        if kind == "ep":
            return self.ep_gradient
        backprop = attacks.backprop_gradient(self.logits_with_graph, self.chunk)
        if kind == "bptt":
            return backprop

        def straight_through(pixels: Tensor, cost: attacks.LogitCost) -> Tensor:
            with attacks.straight_through_activations(self.model):
                return backprop(pixels, cost)

        return straight_through

    def input_gradient(self, pixels: Tensor, labels: Tensor, kind: str) -> Tensor:
        """``dL/dp`` (B, C, H, W) of the model's own loss by ``bptt``, ``bpda`` or ``ep``,
        computed ``chunk`` images at a time."""
        if kind == "bpda":
            with attacks.straight_through_activations(self.model):
                return self.input_gradient(pixels, labels, "bptt")
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
        """The EP estimate of ``dL/dcode`` of the model's loss at the free fixed point."""
        return self._ep_through_encode(pixels, labels, None)

    def _ep_through_encode(self, pixels: Tensor, labels: Tensor, nudge) -> Tensor:
        """The EP estimate of the gradient w.r.t. the code at the free fixed point (of the
        loss, or of the cost whose ``nudge`` is given), carried back to the pixels through
        the (cheap) encode: the normalisation, and the LCA loop for an LCACNN."""
        pixels = pixels.detach().requires_grad_(True)
        with torch.enable_grad():
            code = self.code_with_graph(pixels)
        fixed = code.detach()
        free = self.model(fixed, labels, self.model.init_neurons(fixed), self.T1)
        code_gradient = estimators.input_gradient(
            self.model, fixed, labels, free, self.T2, self.beta, nudge
        )
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
    own: ``loss_gradient`` is ``net.input_gradient(.., gradient)`` (``bptt``, ``bpda`` or
    ``ep``), and
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

    return attacks.art_wrapped(EnergyClassifier, net, input_shape, classes, device)


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
            num_random_init=budget.restarts, **common,
        )  # fmt: skip
    if kind == "apgd":
        return AutoProjectedGradientDescent(
            classifier, eps_step=max(2.0 * eps, tiny), max_iter=budget.steps,
            nb_random_init=budget.restarts, loss_type=None, **common,
        )  # fmt: skip
    return SquareAttack(classifier, max_iter=budget.queries, nb_restarts=budget.restarts, **common)


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
    ("--attacks", {"nargs": "+", "default": list(DEFAULT_ATTACKS), "help": ", ".join(ATTACKS)}),
    ("--aa-iterations", {"type": int, "default": 100,
                         "help": "AutoAttack: iterations of APGD-CE, APGD-T and FAB-T"}),
    ("--aa-restarts", {"type": int, "default": 1, "help": "AutoAttack: restarts of each"}),
    ("--aa-targets", {"type": int, "default": 9, "help": "AutoAttack: target classes"}),
    ("--aa-queries", {"type": int, "default": 5000, "help": "AutoAttack: Square's queries"}),
    ("--gradients", {"nargs": "+", "default": list(DEFAULT_GRADIENTS),
                     "help": "bptt, bpda (straight-through clamps) and/or ep"}),
    ("--eps", {"type": float, "nargs": "+", "default": None,
               "help": "L-inf epsilons (pixels in [0, 1]); default: the task's benchmark one"}),
    ("--eps-l2", {"type": float, "nargs": "+", "default": None,
                  "help": "L2 epsilons; default: the task's benchmark one"}),
    ("--steps", {"type": int, "default": 10, "help": "iterations of PGD and APGD"}),
    ("--queries", {"type": int, "default": 300, "help": "iterations of the Square attack"}),
    ("--corruptions", {"nargs": "+", "default": list(CORRUPTIONS), "help": "their names"}),
    ("--severities", {"type": int, "nargs": "+", "default": list(SEVERITIES), "help": "1-5"}),
    ("--restarts", {"type": int, "default": 1, "help": "random starts of every attack"}),
    ("--T1", {"type": int, "nargs": "+", "default": None,
              "help": "free-phase steps, one or several (each evaluated); default: the run's"}),
    ("--T2", {"type": int, "default": None, "help": "EP nudged-phase steps; default: the run's"}),
    ("--beta", {"type": float, "default": 0.01, "help": "nudging of the EP input gradient"}),
    ("--grad-chunk", {"type": int, "default": 16, "help": "images per backpropagated chunk"}),
    ("--checks", {"action": "store_true",
                  "help": "adaptive-attack checks at the largest --eps: PGD at 2x, 4x steps and "
                          "5 restarts, PGD at L-inf eps 1, white-box vs Square"}),
    ("--tensorboard", {"action": "store_true", "help": "a TensorBoard log in RUN/tb/robustness"}),
    ("--fresh", {"action": "store_true",
                 "help": "recompute every row, even those robustness.csv already has"}),
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
    for name in ("n_samples", "mbs", "steps", "queries", "restarts", "grad_chunk"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    for T in [*(args.T1 or []), args.T2]:
        if T is not None and T < 1:
            raise UsageError(f"--{'T1' if T in (args.T1 or []) else 'T2'} must be at least 1")
    if args.T1 is not None and len(set(args.T1)) != len(args.T1):
        raise UsageError("--T1 lists a value twice: give each number of steps once")
    _check_names("--attacks", args.attacks, ATTACKS)
    _check_names("--gradients", args.gradients, GRADIENTS)
    _check_names("--corruptions", args.corruptions, CORRUPTIONS)
    _check_names("--severities", args.severities, SEVERITIES)
    for name in ("aa_iterations", "aa_restarts", "aa_targets", "aa_queries"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    for flag, values in (("--eps", args.eps or []), ("--eps-l2", args.eps_l2 or [])):
        bad = [value for value in values if not (0.0 <= value < float("inf"))]
        if bad:
            raise UsageError(f"{flag} takes finite epsilons >= 0, got {bad[0]}")
    if args.eps and max(args.eps) > 1.0:
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


def plan_jobs(args: argparse.Namespace, T1_values: Sequence[int]) -> list[Job]:
    """Every measurement asked for, in order, at each T1: the clean accuracy, the corruptions
    (then their mean), then every attack at every epsilon and input gradient."""
    jobs: list[Job] = []
    for T1 in T1_values:
        jobs.append(Job("clean", "none", 0.0, 0, "none", T1))
        if "corruptions" in args.attacks:
            severities = sorted(args.severities)
            jobs += [Job(name, "none", 0.0, s, "none", T1)
                     for name in args.corruptions for s in severities]  # fmt: skip
            jobs.append(Job("corruption_mean", "none", 0.0, 0, "none", T1))
        if args.checks:
            jobs += check_jobs(args, T1)
        for attack in args.attacks:
            if attack == AUTOATTACK:
                jobs += autoattack_jobs(args, T1)
            if attack in ("corruptions", AUTOATTACK):
                continue
            norm = attack.split("-")[1]
            epsilons = args.eps if norm == "linf" else args.eps_l2
            gradients = ["none"] if attack.startswith("square") else args.gradients
            jobs += [Job(attack, norm, eps, 0, g, T1) for eps in epsilons for g in gradients]
    return jobs


def check_jobs(args: argparse.Namespace, T1: int) -> list[Job]:
    """The adaptive checks' measurements at the largest L-inf epsilon, per white-box gradient:
    PGD's convergence runs, PGD at L-inf eps 1, and (once) Square at that epsilon."""
    eps = max(args.eps)
    jobs = []
    for gradient in args.gradients:
        runs = autoattack.convergence_runs(args.steps)
        jobs += [Job(f"{CHECK}/pgd {label}", "linf", eps, 0, gradient, T1) for label in runs]
        jobs.append(Job(UNBOUNDED, "linf", autoattack.UNBOUNDED_EPS, 0, gradient, T1))
    return [*jobs, Job(f"{CHECK}/square", "linf", eps, 0, "none", T1)]


def checks_lines(rows: list[dict]) -> list[str]:
    """Per T1 and gradient, the results line of the adaptive checks in ``rows``."""
    checks = [row for row in rows if row["attack"].startswith(f"{CHECK}/")]
    lines = []
    for T1, gradient in dict.fromkeys((r["T1"], r["gradient"]) for r in checks):
        if gradient == "none":
            continue
        mine = {r["attack"]: r for r in checks if (r["T1"], r["gradient"]) == (T1, gradient)}
        pgd = {k.removeprefix(f"{CHECK}/pgd "): r["accuracy"] for k, r in mine.items()
               if k.startswith(f"{CHECK}/pgd ")}  # fmt: skip
        (square,) = [r for r in checks if r["T1"] == T1 and r["attack"] == f"{CHECK}/square"]
        pair = (f"pgd ({gradient}) eps {square['epsilon']:g}", pgd["base"], square["accuracy"])
        results = [
            autoattack.convergence_check(pgd),
            autoattack.unbounded_check(mine[UNBOUNDED]["accuracy"]),
            autoattack.blackbox_check([pair]),
        ]
        lines.append(f"T1 {T1:g}, {gradient} gradients: {autoattack.checks_line(results)}")
    return lines


def autoattack_jobs(args: argparse.Namespace, T1: int) -> list[Job]:
    """At each norm, epsilon and gradient: a row per AutoAttack component that can be had, then
    the worst case."""
    names = autoattack.available_components()
    jobs = []
    for norm, epsilons in (("linf", args.eps), ("l2", args.eps_l2)):
        for eps in epsilons:
            for gradient in args.gradients:
                jobs += [Job(f"{AUTOATTACK}/{name}", norm, eps, 0, gradient, T1) for name in names]
                jobs.append(Job(AUTOATTACK, norm, eps, 0, gradient, T1))
    return jobs


def masking_flags(rows: list[dict]) -> list[str]:
    """Cases of suspected gradient masking: a white-box attack that leaves a higher accuracy
    than the Square attack at the same norm, epsilon and T1."""
    square = {
        (row["norm"], row["epsilon"], row.get("T1")): row["accuracy"]
        for row in rows
        if row["attack"].startswith("square")
    }
    flags = []
    for row in rows:
        black_box = square.get((row["norm"], row["epsilon"], row.get("T1")))
        if row["gradient"] in GRADIENTS and black_box is not None:
            if row["accuracy"] > black_box:
                at_T1 = f" T1 {row['T1']:g}" if "T1" in row else ""
                flags.append(
                    f"{row['attack']} ({row['gradient']}) at eps {row['epsilon']:g}{at_T1}: "
                    f"{row['accuracy']:.3f} > square {black_box:.3f}"
                )
    return flags


def summary_lines(rows: list[dict], flags: list[str], header: str) -> list[str]:
    """The summary printed and written to robustness.txt."""
    lines = [header]
    for row in rows:
        at_T1 = f"T1 {row['T1']:g} " if "T1" in row else ""
        if row["attack"] == "clean" or row["attack"] == "corruption_mean":
            lines.append(f"  {at_T1}{row['attack']}: {row['accuracy']:.4f}")
        elif row["norm"] != "none":
            lines.append(
                f"  {at_T1}{row['attack']} eps {row['epsilon']:g} {row['gradient']}: "
                f"{row['accuracy']:.4f} ({row['seconds']:.1f} s)"
            )
    if flags:
        lines.append("  gradient masking suspected (white-box above black-box):")
        lines += [f"    {flag}" for flag in flags]
    return lines


class Measurer:
    """Measures a job's accuracy: the clean images, a corruption (read or generated), or an
    attack through an ART classifier of the chosen gradient, one network per T1."""

    def __init__(self, args, model, task, T2, budget, pixels, labels, released, device, folder):
        self.args, self.model, self.task, self.T2, self.budget = args, model, task, T2, budget
        self.pixels, self.labels, self.released, self.device = pixels, labels, released, device
        self.folder = folder / AUTOATTACK_FOLDER
        self.shape_and_classes = data_loading.task_info(task)
        self.nets: dict[int, PixelClassifier] = {}
        self.classifiers: dict[tuple[str, int], object] = {}

    def net(self, T1: int) -> PixelClassifier:
        if T1 not in self.nets:
            self.nets[T1] = PixelClassifier(
                self.model, self.task, T1, self.T2, self.args.beta, self.args.grad_chunk
            ).to(self.device)
        return self.nets[T1]

    def classifier(self, gradient: str, T1: int):
        """The ART classifier of ``gradient`` at ``T1``. A cross-entropy model's is that of
        the CE cost on the logits (``attacks.attack_classifier``, the EP gradient nudged by
        that cost); another loss's (MSE) is the model's own loss, what its rows always meant."""
        if (gradient, T1) not in self.classifiers:
            channels, height, width, classes = self.shape_and_classes
            net, kind = self.net(T1), "bptt" if gradient == "none" else gradient
            shape = (channels, height, width)
            if self.model.loss_name == "cel":
                self.classifiers[gradient, T1] = attacks.attack_classifier(
                    net, net.cost_gradient(kind), "ce", shape, classes, self.device
                )
            else:
                self.classifiers[gradient, T1] = art_classifier(
                    net, kind, shape, classes, self.device
                )
        return self.classifiers[gradient, T1]

    def accuracy(self, job: Job, corruption_rows: list[dict]) -> tuple[float, int]:
        """``(accuracy, images)`` of ``job``; ``corruption_rows`` are this T1's corruptions
        (the mean job averages them)."""
        args, net = self.args, self.net(job.T1)
        if job.kind == "clean":
            return net.accuracy(self.pixels, self.labels, args.mbs), len(self.labels)
        if job.kind == "mean":
            return float(np.mean([row["accuracy"] for row in corruption_rows])), len(self.labels)
        if job.kind == "corruption":
            if job.attack in self.released:
                corrupted, truth = (
                    t.to(self.device) for t in self.released[job.attack][job.severity]
                )
            else:
                corrupted = generate_corruption(self.pixels, job.attack, job.severity,
                                                args.seed + job.severity)  # fmt: skip
                corrupted, truth = corrupted.to(self.device), self.labels
            return net.accuracy(corrupted, truth, args.mbs), len(truth)
        if job.kind == AUTOATTACK:
            return self.autoattack(job)
        records.seed_everything(args.seed)
        if job.attack.startswith(f"{CHECK}/pgd ") or job.attack == UNBOUNDED:
            label = "base" if job.attack == UNBOUNDED else job.attack.split(" ", 1)[1]
            steps, restarts = autoattack.convergence_runs(args.steps)[label]
            adversarial = autoattack.pgd(
                net, net.cost_gradient(job.gradient), self.pixels, self.labels, "linf",
                job.epsilon, steps, restarts, args.mbs,
            )  # fmt: skip
            return net.accuracy(adversarial, self.labels, args.mbs), len(self.labels)
        classifier = self.classifier(job.gradient, job.T1)
        name = "square-linf" if job.attack == f"{CHECK}/square" else job.attack
        adversarial = attack_images(
            name, classifier, job.epsilon, self.budget, self.pixels, self.labels
        )
        return net.accuracy(adversarial, self.labels, args.mbs), len(self.labels)

    # ---- AutoAttack ----------------------------------------------------------------------

    def component_path(self, job: Job, evaluation: dict, name: str) -> Path:
        """Where component ``name``'s per-image results of ``job``'s setting are saved: named
        by a hash of the worst-case row's key, so a changed setting never reads them."""
        worst = Job(AUTOATTACK, job.norm, job.epsilon, 0, job.gradient, job.T1)
        key = "|".join(row_key(job_row(worst, evaluation, 0.0, 0, 0.0)))
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}_{name}.pt"

    def has_components(self, job: Job, evaluation: dict) -> bool:
        """Whether the per-image results behind ``job``'s row are saved: a component's own,
        every available component's for the worst case; True for the other attacks."""
        if job.attack == AUTOATTACK:
            names = autoattack.available_components()
        elif job.attack.startswith(f"{AUTOATTACK}/"):
            names = [job.attack.split("/", 1)[1]]
        else:
            return True
        return all(self.component_path(job, evaluation, name).is_file() for name in names)

    def autoattack(self, job: Job) -> tuple[float, int]:
        """A component's robust accuracy (its per-image results saved first), or the worst
        case over the saved components."""
        result = self.autoattack_result(job, run_missing=job.attack != AUTOATTACK)
        if job.attack == AUTOATTACK:
            return result.robust_accuracy, len(self.labels)
        name = job.attack.split("/", 1)[1]
        return result.component_accuracies()[name], len(self.labels)

    def autoattack_result(self, job: Job, run_missing: bool) -> autoattack.AutoAttackResult:
        """The AutoAttack result of ``job``'s setting from the saved components; with
        ``run_missing`` the job's own component is run (and saved) when it is not saved."""
        evaluation = self.evaluation
        names = autoattack.available_components()
        done = {}
        for name in names:
            path = self.component_path(job, evaluation, name)
            if path.is_file():
                state = storage.safe_load(path, "AutoAttack component result")
                done[name] = autoattack.ComponentResult.from_state(state)
        own = job.attack.split("/", 1)[1] if "/" in job.attack else None
        if run_missing and self.args.fresh:  # recompute the job's own component
            done.pop(own, None)
        wanted = [own] if run_missing and own is not None else [n for n in names if n in done]
        net = self.net(job.T1)
        budget = autoattack.AutoAttackBudget(
            self.args.aa_iterations, self.args.aa_restarts, self.args.aa_targets,
            self.args.aa_queries, self.args.mbs,
        )  # fmt: skip

        def save(result: autoattack.ComponentResult) -> None:
            storage.atomic_save(result.state(), self.component_path(job, evaluation, result.name))

        self.folder.mkdir(exist_ok=True)
        result = autoattack.autoattack(
            net, net.cost_gradient(job.gradient), self.pixels, self.labels, job.norm,
            job.epsilon, budget, job.gradient, wanted, done, save, self.args.seed,
        )  # fmt: skip
        missing = tuple(n for n in autoattack.COMPONENTS if n not in names)
        return dataclasses.replace(result, missing=missing)

    def autoattack_table(self, job: Job, indices: Tensor) -> tuple[str, Path]:
        """The summary line of ``job``'s AutoAttack (a worst-case job), and its per-image
        table written beside the component results: test index, label, clean, each
        component, robust (1 = classified correctly)."""
        result = self.autoattack_result(job, run_missing=False)
        table = result.table()
        columns = ["index", "label", "clean", *result.components, "robust"]
        rows = [
            dict(zip(columns, [int(i), int(y), int(c), *map(int, survived), int(r)], strict=True))
            for i, y, c, survived, r in zip(
                indices, self.labels.cpu(), result.clean.cpu(), table.cpu(),
                result.robust().cpu(), strict=True,
            )
        ]  # fmt: skip
        stem = self.component_path(job, self.evaluation, "table").stem
        path = self.folder / f"{stem}_{job.norm}_eps{job.epsilon:g}_{job.gradient}_T1{job.T1}.csv"
        storage.write_csv_rows(path, rows, columns)
        return f"T1 {job.T1}: {result.summary_line()}", path


def run(args: argparse.Namespace) -> int:
    """Evaluate the run of ``--load-path``; write its files; returns the exit status (0)."""
    check_args(args)
    record, model_path = records.load_model_file(args.load_path)
    folder = model_path.parent
    storage.check_writable(folder, "load-path")  # 74 at once, before any attack
    with storage.FolderLock(folder, LOCK_FILE, clean_temp_files=False):
        return evaluate(args, record, model_path)


def evaluate(args: argparse.Namespace, record: dict, model_path: Path) -> int:
    """The evaluation proper, under the folder's evaluation lock."""
    saved = record["args"]
    task = data_loading.canonical_task(saved["task"])
    args = with_default_epsilons(args, task)
    data_dir = args.data_dir or saved.get("data_dir", "./data")
    T1_values = args.T1 or [int(saved["T1"])]
    T2 = args.T2 or int(saved["T2"])
    budget = AttackBudget(args.mbs, args.steps, args.queries, args.restarts)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # ART puts its tensors on the current CUDA device
    model = records.restore_model(record, device).eval()
    model.safe_point = entry.raise_if_stopped  # Ctrl-C and SIGTERM stop between steps
    if "bpda" in args.gradients and model.activation not in CLAMP_SLOPES:
        raise UsageError(
            f"--gradients bpda needs a clamp activation ({', '.join(CLAMP_SLOPES)}); this model "
            f"uses {model.activation}: use --gradients bptt or ep"
        )
    channels, height, width, _ = data_loading.task_info(task)
    indices, pixels, labels, n_test = sample_test_pixels(
        task, data_dir, not args.no_download, args.n_samples, args.seed
    )
    release = release_folder(task, data_dir) if "corruptions" in args.attacks else None
    released = {}
    if release is not None:  # read (and check) every file before anything is written
        for name in args.corruptions:
            released[name] = read_release(release, name, n_test, (channels, height, width), indices)
    evaluation = {"T2": T2, "beta": args.beta, "steps": args.steps, "queries": args.queries,
                  "restarts": args.restarts, "batch_size": args.mbs, "seed": args.seed,
                  "sample_set": sample_set_id(task, indices, n_test),
                  "model": weights_hash(model),
                  AUTOATTACK: {"steps": args.aa_iterations, "queries": args.aa_queries,
                               "restarts": args.aa_restarts,
                               "targets": args.aa_targets}}  # fmt: skip
    measurer = Measurer(args, model, task, T2, budget, pixels.to(device), labels.to(device),
                        released, device, model_path.parent)  # fmt: skip
    measurer.evaluation = evaluation
    results = ResultsFile(model_path.parent / ROBUSTNESS_CSV)
    jobs = plan_jobs(args, T1_values)
    if args.fresh:
        reusable = {}
    else:
        reusable = {job: results.find(job_row(job, evaluation, 0.0, 0, 0.0)) for job in jobs}
        reusable = {  # an AutoAttack row counts only with its saved per-image results
            job: row
            for job, row in reusable.items()
            if row is not None and measurer.has_components(job, evaluation)
        }
    source = f"read from {release}" if release is not None else "generated by corrupt_tta"
    print(f"{task}, {model_path}: {len(labels)} test images, T1 {' '.join(map(str, T1_values))}")
    print(
        f"reused {len(reusable)} rows of {ROBUSTNESS_CSV}; {len(jobs) - len(reusable)} to compute"
    )
    rows: list[dict] = []
    for job in tqdm(jobs, desc="robustness", dynamic_ncols=True, disable=not jobs):
        entry.raise_if_stopped()
        if job in reusable:
            rows.append(reusable[job])
            continue
        started = time.perf_counter()
        corruption_rows = [r for r in rows if r["norm"] == "none" and r["severity"] != 0
                           and r["T1"] == job.T1]  # fmt: skip
        accuracy, samples = measurer.accuracy(job, corruption_rows)
        row = job_row(job, evaluation, accuracy, samples, time.perf_counter() - started)
        results.put(row)
        rows.append(row)
        entry.raise_if_stopped()
    log_rows(model_path.parent, args.tensorboard, rows)
    for row in rows:
        if row["attack"] in ("clean", "corruption_mean"):
            name = "clean accuracy" if row["attack"] == "clean" else f"corruptions ({source})"
            print(f"T1 {row['T1']:g}: {name} {row['accuracy']:.4f}")
    extra = []
    for job in jobs:
        if job.attack == AUTOATTACK:
            line, table = measurer.autoattack_table(job, indices)
            print(f"{line}\nper-image table: {table}")
            extra.append(line)
    for line in checks_lines(rows):
        print(line)
        extra.append(line)
    write_summary(args, record, model_path, rows, T1_values, T2, extra)
    return entry.EXIT_OK


def with_default_epsilons(args: argparse.Namespace, task: str) -> argparse.Namespace:
    """``args`` with the task's benchmark epsilons (``attacks.default_epsilons``) where
    ``--eps`` or ``--eps-l2`` was not given."""
    if args.eps is not None and args.eps_l2 is not None:
        return args
    try:
        linf, l2 = attacks.default_epsilons(task)
    except ValueError as error:
        raise UsageError(str(error)) from error
    return argparse.Namespace(**{**vars(args), "eps": args.eps or [linf],
                                 "eps_l2": args.eps_l2 or [l2]})  # fmt: skip


def log_rows(folder: Path, enabled: bool, rows: list[dict]) -> None:
    """With ``--tensorboard``, every row (reused ones too) in ``folder/tb/robustness``, one tag
    per setting at step T1; the log starts again from the smallest T1 of this evaluation."""
    if not enabled or not rows:
        return
    with run_board.robustness_board(folder, True, int(min(row["T1"] for row in rows))) as board:
        for row in rows:
            run_board.log_robustness_row(board, row, int(row["T1"]))


def write_summary(args, record, model_path: Path, rows, T1_values, T2, extra) -> None:
    """robustness.png and robustness.txt of this evaluation's rows, both atomically."""
    folder = model_path.parent
    flags = masking_flags(rows)
    storage.save_figure(data_utils.plot_robustness(rows), folder / ROBUSTNESS_PNG)
    budgets = []  # only those of the attacks this evaluation ran
    if any(name != "corruptions" and name != AUTOATTACK for name in args.attacks) or args.checks:
        budgets.append(f"{args.steps} steps, {args.queries} queries, {args.restarts} restarts")
    if AUTOATTACK in args.attacks:
        budgets.append(
            f"AutoAttack {args.aa_iterations} iterations, {args.aa_queries} queries, "
            f"{args.aa_targets} targets, {args.aa_restarts} restarts"
        )
    header = (
        f"robustness {model_path.name} (epoch {record['epoch']}, T1 "
        f"{' '.join(map(str, T1_values))}, {rows[0]['samples']:g} test images, seed {args.seed}, "
        f"T2 {T2}, beta {args.beta}{''.join(', ' + budget for budget in budgets)}):"
    )
    lines = summary_lines(rows, flags, header) + [f"  {line}" for line in extra]
    print("\n".join(lines))
    text = "\n".join(lines) + "\n"
    storage.atomic_write(folder / ROBUSTNESS_TXT, lambda f: f.write(text.encode()))
    print(
        f"written: {folder / ROBUSTNESS_CSV}, {folder / ROBUSTNESS_PNG}, {folder / ROBUSTNESS_TXT}"
    )


def continue_command(argv: Sequence[str]) -> str:
    """The command that continues an interrupted evaluation: the same flags, ``--fresh``
    dropped (it would throw the finished rows away)."""
    kept = [arg for arg in argv if arg not in entry.flag_spellings("--fresh")]
    return shlex.join(["python", "robustness.py", *kept])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        return entry.fail(str(error), entry.EXIT_USAGE)
    argv = sys.argv[1:] if argv is None else list(argv)
    kept_note = f"{KEPT_NOTE}; continue with:\n{continue_command(argv)}"
    work = functools.partial(run, args)
    return entry.run_script(work, storage.ERROR_STATUSES, STORAGE_FIX, kept_note)


if __name__ == "__main__":
    entry.exit_after_work(main())
