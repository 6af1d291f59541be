"""What an evaluation measures and how its rows read: the jobs planned from a configuration, and
the lines its rows give (gradient-masking flags, the adaptive checks, the summary).

A job (``results.Job``) is one measurement at one T1: the clean accuracy, a corruption at a
severity (and their mean), or an attack at a norm, epsilon and input gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

from robust_eval import autoattack
from robust_eval.config import GRADIENTS, RobustnessConfig
from robust_eval.results import AUTOATTACK, CHECK, UNBOUNDED, Job


def plan_jobs(config: RobustnessConfig, T1_values: Sequence[int]) -> list[Job]:
    """Every measurement asked for, in order, at each T1: the clean accuracy, the corruptions
    (then their mean), then every attack at every epsilon and input gradient."""
    jobs: list[Job] = []
    for T1 in T1_values:
        jobs.append(Job("clean", "none", 0.0, 0, "none", T1))
        if "corruptions" in config.attacks:
            severities = sorted(config.severities)
            jobs += [Job(name, "none", 0.0, s, "none", T1)
                     for name in config.corruptions for s in severities]  # fmt: skip
            jobs.append(Job("corruption_mean", "none", 0.0, 0, "none", T1))
        if config.checks:
            jobs += check_jobs(config, T1)
        for attack in config.attacks:
            if attack == AUTOATTACK:
                jobs += autoattack_jobs(config, T1)
            if attack in ("corruptions", AUTOATTACK):
                continue
            norm = attack.split("-")[1]
            epsilons = config.eps if norm == "linf" else config.eps_l2
            gradients = ["none"] if attack.startswith("square") else config.gradients
            jobs += [Job(attack, norm, eps, 0, g, T1) for eps in epsilons for g in gradients]
    return jobs


def check_jobs(config: RobustnessConfig, T1: int) -> list[Job]:
    """The adaptive checks' measurements at the largest L-inf epsilon, per white-box gradient:
    PGD's convergence runs, PGD at L-inf eps 1, and (once) Square at that epsilon."""
    eps = max(config.eps)
    jobs = []
    for gradient in config.gradients:
        runs = autoattack.convergence_runs(config.steps)
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


def autoattack_jobs(config: RobustnessConfig, T1: int) -> list[Job]:
    """At each norm, epsilon and gradient: a row per AutoAttack component that can be had, then
    the worst case."""
    names = autoattack.available_components()
    jobs = []
    for norm, epsilons in (("linf", config.eps), ("l2", config.eps_l2)):
        for eps in epsilons:
            for gradient in config.gradients:
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
