"""The typed, frozen configuration of a robustness evaluation, and the names it chooses among.

``robustness.py`` checks its flags and builds one ``RobustnessConfig``; everything in
``robust_eval`` takes it (or plain values), never the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from robust_eval import attacks
from robust_eval.corruptions import CORRUPTIONS, SEVERITIES
from robust_eval.results import AUTOATTACK

DEFAULT_ATTACKS = ("corruptions", "pgd-linf", "pgd-l2", "apgd-linf", "apgd-l2", "square-linf",
                   "square-l2")  # fmt: skip
ATTACKS = (*DEFAULT_ATTACKS, AUTOATTACK)
GRADIENTS = ("bptt", "bpda", "ep")
DEFAULT_GRADIENTS = ("bptt", "ep")
DEFAULT_CORRUPTIONS = CORRUPTIONS
DEFAULT_SEVERITIES = SEVERITIES


@dataclass(frozen=True)
class RobustnessConfig:
    """One evaluation of a saved run.

    load_path      the run folder (or model file) evaluated
    data_dir       datasets and CIFAR-10-C; ``None``: the run's own
    download       whether a missing dataset may be downloaded
    n_samples      test images drawn with ``seed`` (all if fewer)
    mbs            images per batch of evaluation and attack
    device         a GPU index, or ``cpu``
    seed           the seed of the test subset and of the attacks
    attacks        names among ``ATTACKS``, in the order measured
    gradients      input gradients among ``GRADIENTS`` of every white-box attack
    eps, eps_l2    L-inf and L2 epsilons; ``None``: the task's benchmark one
    steps          iterations of PGD and APGD
    queries        iterations of the Square attack
    restarts       random starts of every attack
    corruptions    corruption names, each at every severity of ``severities`` (1-5)
    T1             free-phase steps, each evaluated; ``None``: the run's own
    T2             EP nudged-phase steps; ``None``: the run's own
    beta           the nudging of the EP input gradient
    grad_chunk     images per backpropagated chunk
    aa_*           AutoAttack's iterations, restarts, target classes and Square queries
    checks         run the adaptive-attack checks at the largest L-inf epsilon
    tensorboard    log every row in ``RUN/tb/robustness``
    fresh          recompute every row, even those ``robustness.csv`` already has
    """

    load_path: str
    data_dir: str | None = None
    download: bool = True
    n_samples: int = 1000
    mbs: int = 100
    device: str = "0"
    seed: int = 0
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    gradients: tuple[str, ...] = DEFAULT_GRADIENTS
    eps: tuple[float, ...] | None = None
    eps_l2: tuple[float, ...] | None = None
    steps: int = 10
    queries: int = 300
    restarts: int = 1
    corruptions: tuple[str, ...] = DEFAULT_CORRUPTIONS
    severities: tuple[int, ...] = DEFAULT_SEVERITIES
    T1: tuple[int, ...] | None = None
    T2: int | None = None
    beta: float = 0.01
    grad_chunk: int = 16
    aa_iterations: int = 100
    aa_restarts: int = 1
    aa_targets: int = 9
    aa_queries: int = 5000
    checks: bool = False
    tensorboard: bool = False
    fresh: bool = False

    def with_task_epsilons(self, task: str) -> RobustnessConfig:
        """This configuration with ``task``'s benchmark epsilons
        (``attacks.default_epsilons``) where ``eps`` or ``eps_l2`` is ``None``; ValueError for
        a task that has none."""
        if self.eps is not None and self.eps_l2 is not None:
            return self
        linf, l2 = attacks.default_epsilons(task)
        return dataclasses.replace(self, eps=self.eps or (linf,), eps_l2=self.eps_l2 or (l2,))
