"""Measuring a job's accuracy: the test images an evaluation draws, and ``Measurer``, which
measures the clean images, a corruption (read or generated), or an attack (ART's, AutoAttack's
components with their saved per-image results, or the adaptive checks' PGD) through one
``PixelClassifier`` per T1.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from experiment import data_loading, entry, records, storage
from robust_eval import attacks, autoattack
from robust_eval.art_attacks import AttackBudget, art_classifier, attack_images
from robust_eval.config import RobustnessConfig
from robust_eval.corruptions import generate_corruption
from robust_eval.pixel_classifier import PixelClassifier
from robust_eval.results import AUTOATTACK, CHECK, UNBOUNDED, Job, job_row, row_key
from utils_ep_fast import EnergyNet, Phases

# the engine's loop, with the stop requests of Ctrl-C and SIGTERM honoured between steps
STOPPABLE = Phases(safe_point=entry.raise_if_stopped)

AUTOATTACK_FOLDER = "autoattack"  # per-component results (.pt) and per-image tables (.csv)


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


class Measurer:
    """Measures a job's accuracy: the clean images, a corruption (read or generated), or an
    attack through an ART classifier of the chosen gradient, one network per T1."""

    def __init__(
        self,
        config: RobustnessConfig,
        model: EnergyNet,
        task: str,
        T2: int,
        evaluation: dict,
        pixels: Tensor,
        labels: Tensor,
        released: dict,
        folder: Path,
    ) -> None:
        """``pixels`` (N, C, H, W) in [0, 1] and ``labels`` (N,) on the model's device;
        ``evaluation`` the settings every row's key holds (``results.settings_of``);
        ``released`` the read corruption files by name and severity; ``folder`` the run's."""
        self.config, self.model, self.task, self.T2 = config, model, task, T2
        self.evaluation = evaluation
        self.budget = AttackBudget(config.mbs, config.steps, config.queries, config.restarts)
        self.pixels, self.labels, self.released = pixels, labels, released
        self.device = pixels.device
        self.folder = folder / AUTOATTACK_FOLDER
        self.shape_and_classes = data_loading.task_info(task)
        self.nets: dict[int, PixelClassifier] = {}
        self.classifiers: dict[tuple[str, int], object] = {}

    def net(self, T1: int) -> PixelClassifier:
        if T1 not in self.nets:
            self.nets[T1] = PixelClassifier(
                self.model, self.task, T1, self.T2, self.config.beta, self.config.grad_chunk,
                STOPPABLE,
            ).to(self.device)  # fmt: skip
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
        config, net = self.config, self.net(job.T1)
        if job.kind == "clean":
            return net.accuracy(self.pixels, self.labels, config.mbs), len(self.labels)
        if job.kind == "mean":
            return float(np.mean([row["accuracy"] for row in corruption_rows])), len(self.labels)
        if job.kind == "corruption":
            if job.attack in self.released:
                corrupted, truth = (
                    t.to(self.device) for t in self.released[job.attack][job.severity]
                )
            else:
                corrupted = generate_corruption(self.pixels, job.attack, job.severity,
                                                config.seed + job.severity)  # fmt: skip
                corrupted, truth = corrupted.to(self.device), self.labels
            return net.accuracy(corrupted, truth, config.mbs), len(truth)
        if job.kind == AUTOATTACK:
            return self.autoattack(job)
        records.seed_everything(config.seed)
        if job.attack.startswith(f"{CHECK}/pgd ") or job.attack == UNBOUNDED:
            label = "base" if job.attack == UNBOUNDED else job.attack.split(" ", 1)[1]
            steps, restarts = autoattack.convergence_runs(config.steps)[label]
            adversarial = autoattack.pgd(
                net, net.cost_gradient(job.gradient), self.pixels, self.labels, "linf",
                job.epsilon, steps, restarts, config.mbs,
            )  # fmt: skip
            return net.accuracy(adversarial, self.labels, config.mbs), len(self.labels)
        classifier = self.classifier(job.gradient, job.T1)
        name = "square-linf" if job.attack == f"{CHECK}/square" else job.attack
        adversarial = attack_images(
            name, classifier, job.epsilon, self.budget, self.pixels, self.labels
        )
        return net.accuracy(adversarial, self.labels, config.mbs), len(self.labels)

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
        if run_missing and self.config.fresh:  # recompute the job's own component
            done.pop(own, None)
        wanted = [own] if run_missing and own is not None else [n for n in names if n in done]
        net = self.net(job.T1)
        budget = autoattack.AutoAttackBudget(
            self.config.aa_iterations, self.config.aa_restarts, self.config.aa_targets,
            self.config.aa_queries, self.config.mbs,
        )  # fmt: skip

        def save(result: autoattack.ComponentResult) -> None:
            storage.atomic_save(result.state(), self.component_path(job, evaluation, result.name))

        self.folder.mkdir(exist_ok=True)
        result = autoattack.autoattack(
            net, net.cost_gradient(job.gradient), self.pixels, self.labels, job.norm,
            job.epsilon, budget, job.gradient, wanted, done, save, self.config.seed,
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
