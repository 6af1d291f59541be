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
* ``autoattack``: AutoAttack's standard version (``robust_eval/autoattack.py``) per norm, epsilon
  and gradient, a row per component and the worst case, each component's per-image results saved
  under ``autoattack/`` so that a resumed run gives the same worst case;
* with ``--checks``, the adaptive-attack checks (convergence in steps and restarts, PGD at
  L-inf eps 1, white-box vs Square) and their results line.

A cross-entropy model's white-box attacks ascend the CE of the logits through the chosen
gradient (``attacks.attack_classifier``; EP nudged by that cost); an MSE model's its own loss.
Without ``--eps`` / ``--eps-l2`` the task's benchmark epsilons are used.

A white-box attack that leaves a higher accuracy than the Square attack at the same norm and
epsilon points to gradient masking: those cases are flagged. Everything is measured at each T1
of ``--T1`` (default: the run's own).

Written to the run folder, under a lock of its own (``.robustness.lock``, beside a training run's
``.lock``, whose half-written files it leaves alone), and never into a training run's files:
``robustness.csv``, one row per measurement (attack, norm, epsilon, severity, gradient, accuracy,
samples, seconds, then T1 and every setting the result depends on: T2, beta, steps, queries,
restarts, batch size, seed, the sample set, and a hash of the model's weights; ``-`` where a setting
does not apply), rewritten atomically after each row; ``robustness.png``; and ``robustness.txt``,
the summary; with ``--tensorboard``, the sub-run ``tb/robustness`` (``run_board``). Re-running a
command reuses every row whose key matches and computes the rest (``--fresh``: all); CSVs of 8
columns, written before the settings were recorded, are read and kept, and match no new row. Exit
statuses and one-line errors are those of ``experiment/entry.py`` (2 bad input, checked before
anything is written; 74 the run folder cannot be written, checked before any attack; 75 another
evaluation holds the folder; 130 / 143 Ctrl-C / SIGTERM: the finished rows stay, and the command
that continues is printed).

This file is the command line: its flags become one ``robust_eval.config.RobustnessConfig``, which
``robust_eval.evaluation.evaluate_run`` carries out (the model wrapper is
``robust_eval/pixel_classifier.py``, the ART attacks ``robust_eval/art_attacks.py``, the jobs
``robust_eval/jobs.py``, their measuring ``robust_eval/measure.py``).
"""

from __future__ import annotations

from experiment import entry

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the libraries load: no traceback
    entry.install_stop_handlers()

import argparse
import dataclasses
import functools
import sys
from collections.abc import Sequence

from experiment import storage
from experiment.entry import UsageError
from robust_eval.config import (
    ATTACKS,
    DEFAULT_ATTACKS,
    DEFAULT_GRADIENTS,
    GRADIENTS,
    RobustnessConfig,
)
from robust_eval.corruptions import CORRUPTIONS, SEVERITIES
from robust_eval.evaluation import evaluate_run

STORAGE_FIX = "free space or make the run folder writable; robustness.csv keeps the rows so far"
KEPT_NOTE = "; robustness.csv keeps the rows measured so far"


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


def build_config(args: argparse.Namespace) -> RobustnessConfig:
    """The evaluation's configuration from the parsed flags; UsageError for any setting that
    cannot run, before anything is read or written."""
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

    values = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(RobustnessConfig)
        if field.name != "download"  # the flag is --no-download
    }
    frozen = {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}
    return RobustnessConfig(**frozen, download=not args.no_download)


def _check_names(flag: str, given: Sequence, known: Sequence) -> None:
    unknown = [value for value in given if value not in known]
    if unknown:
        choices = ", ".join(str(value) for value in known)
        raise UsageError(f"{flag}: unknown {unknown[0]!r}; choose among {choices}")


def run(args: argparse.Namespace) -> int:
    """Check the flags, then evaluate; returns the exit status (0)."""
    return evaluate_run(build_config(args))


def continue_command(argv: Sequence[str]) -> str:
    """The command that continues an interrupted evaluation: the same flags, ``--fresh``
    dropped (it would throw the finished rows away)."""
    kept = [arg for arg in argv if arg not in entry.flag_spellings("--fresh")]
    return entry.shell_command("robustness.py", kept)


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
