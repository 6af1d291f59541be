"""The registry of learning rules: every rule ``--alg`` can name, by its ``NAME``.

Each rule is a subclass of ``estimators.Estimator`` (``EP`` and ``BPTT`` live in
``learning/estimators.py``; a new rule goes in a file of its own in ``learning/``). Adding a
rule is its class and its entry in ``RULES`` below (docs/extending.md); ``main_fast.py``'s
``--alg`` choices, the flag checks (``experiment/config.py``) and ``make_estimator`` read
``ESTIMATORS``.
"""

from __future__ import annotations

from learning.clamped_learning import ContrastiveLearning, CoupledLearning
from learning.estimators import BPTT, EP, EPConfig, Estimator
from learning.recurrent_backprop import RecurrentBackprop

RULES: tuple[type[Estimator], ...] = (
    EP, BPTT, RecurrentBackprop, ContrastiveLearning, CoupledLearning,
)  # fmt: skip
ESTIMATORS: dict[str, type[Estimator]] = {rule.NAME: rule for rule in RULES}


def make_estimator(cfg: EPConfig) -> Estimator:
    """The rule ``cfg.alg`` names, for ``cfg``."""
    if cfg.alg not in ESTIMATORS:
        raise ValueError(f"unknown learning rule {cfg.alg!r}; choose from {list(ESTIMATORS)}")
    return ESTIMATORS[cfg.alg](cfg)


__all__ = ["ESTIMATORS", "RULES", "make_estimator"]
