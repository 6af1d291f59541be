"""``robustness.csv``: its columns, the measurement of each row (``Job``), the settings each
result depends on, and the file itself, rewritten whole and atomically after each row.

A row is identified by its key (``row_key``): the measurement (attack, norm, epsilon,
severity, gradient, T1) and every setting that changes its result (T2, beta, steps, queries,
restarts, targets, batch size, seed, the sample set, the model as a hash of its weights),
``-`` where a setting does not apply to it. A re-run reuses the rows whose key matches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from experiment import storage
from robust_eval import autoattack

# the columns of the CSVs written before the settings were recorded
RESULT_COLUMNS = ("attack", "norm", "epsilon", "severity", "gradient", "accuracy", "samples",
                  "seconds")  # fmt: skip
# the settings a result depends on ("-" where one does not apply: the queries of PGD, ...)
SETTING_COLUMNS = ("T2", "beta", "steps", "queries", "restarts", "targets", "batch_size",
                   "seed", "sample_set", "model")  # fmt: skip
CSV_COLUMNS = (*RESULT_COLUMNS, "T1", *SETTING_COLUMNS)
KEY_COLUMNS = ("attack", "norm", "epsilon", "severity", "gradient", "T1", *SETTING_COLUMNS)
NOT_APPLICABLE = "-"
AUTOATTACK = "autoattack"  # the worst-case row; its components' rows are autoattack/<name>
CHECK = "check"  # the adaptive checks' rows: check/pgd <run>, check/unbounded, check/square
UNBOUNDED = f"{CHECK}/unbounded"


@dataclass(frozen=True)
class Job:
    """One measurement, one row of ``robustness.csv``: the clean accuracy, a corruption at a
    severity, the corruptions' mean, or an attack at a norm and epsilon with an input gradient
    (``none`` for Square), all at ``T1`` free steps."""

    attack: str
    norm: str
    epsilon: float
    severity: int
    gradient: str
    T1: int

    @property
    def kind(self) -> str:
        """``clean``, ``corruption``, ``mean``, ``white-box``, ``black-box``, or ``autoattack``
        (its worst case and its components)."""
        if self.attack.startswith(AUTOATTACK):
            return AUTOATTACK
        if self.attack in ("clean", "corruption_mean"):
            return "clean" if self.attack == "clean" else "mean"
        if self.norm == "none":
            return "corruption"
        return "black-box" if self.gradient == "none" else "white-box"


def settings_of(job: Job, evaluation: dict) -> dict:
    """The settings that change ``job``'s result, by CSV column; the others are ``-``. Always
    the batch size, seed, sample set and model; the steps and restarts of a white-box attack
    (with T2 and beta for the EP gradient; a check's PGD its own, ``convergence_runs``); the
    queries and restarts of Square; AutoAttack's budget."""
    relevant = {"batch_size", "seed", "sample_set", "model"}
    if job.kind == "white-box":
        relevant |= {"steps", "restarts"} | ({"T2", "beta"} if job.gradient == "ep" else set())
    elif job.kind == "black-box":
        relevant |= {"queries", "restarts"}
    elif job.kind == AUTOATTACK:  # its own budget in the same columns
        relevant |= {"steps", "queries", "restarts", "targets"}
        relevant |= {"T2", "beta"} if job.gradient == "ep" else set()
        evaluation = {**evaluation, **evaluation[AUTOATTACK]}
    if job.attack.startswith(f"{CHECK}/pgd ") or job.attack == UNBOUNDED:
        label = job.attack.removeprefix(f"{CHECK}/pgd ") if job.attack != UNBOUNDED else "base"
        steps, restarts = autoattack.convergence_runs(evaluation["steps"])[label]
        evaluation = {**evaluation, "steps": steps, "restarts": restarts}
    return {
        column: evaluation[column] if column in relevant else NOT_APPLICABLE
        for column in SETTING_COLUMNS
    }


def _cell(value) -> str:
    """A CSV cell as it compares: numbers by value (``10`` and ``10.0`` alike), text as is."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))
    return str(value)


def row_key(row: dict) -> tuple[str, ...]:
    """What identifies a row's result: its measurement and every setting that changes it. A
    row of an older CSV lacks the settings (empty cells): its key matches no new row."""
    return tuple(_cell(row.get(column, "")) for column in KEY_COLUMNS)


def job_row(job: Job, evaluation: dict, accuracy: float, samples: int, seconds: float) -> dict:
    """The CSV row of ``job``'s result."""
    measured = {"attack": job.attack, "norm": job.norm, "epsilon": job.epsilon,
                "severity": job.severity, "gradient": job.gradient, "accuracy": accuracy,
                "samples": samples, "seconds": seconds, "T1": job.T1}  # fmt: skip
    row = {**measured, **settings_of(job, evaluation)}
    # numbers as floats, as they read back: a reused row and a new one are written alike
    return {k: float(v) if isinstance(v, int) else v for k, v in row.items()}


class ResultsFile:
    """``robustness.csv``: the rows of every evaluation of the run, rewritten whole and
    atomically after each new row, so a reader (or a kill) sees complete rows only. A new
    row replaces the stored row with the same key. Rows of an older CSV (8 columns) are kept
    with empty settings."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fix = "move it aside (its rows are measured again) or restore it from a copy"
        self.rows = storage.read_csv_rows(path, fix) if path.is_file() else []
        self.by_key = {row_key(row): i for i, row in enumerate(self.rows)}

    def find(self, row: dict) -> dict | None:
        """The stored row with ``row``'s key, or None."""
        index = self.by_key.get(row_key(row))
        return None if index is None else self.rows[index]

    def put(self, row: dict) -> None:
        """Store ``row`` (replacing its key's row) and write the file."""
        key = row_key(row)
        if key in self.by_key:
            self.rows[self.by_key[key]] = row
        else:
            self.by_key[key] = len(self.rows)
            self.rows.append(row)
        storage.write_csv_rows(self.path, self.rows, CSV_COLUMNS)


def weights_hash(model: nn.Module) -> str:
    """``sha256:`` and 16 hex digits of the model's parameters and buffers (names, dtypes,
    shapes and values), so a rewritten ``model.pt`` is told apart from the one evaluated."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"sha256:{digest.hexdigest()[:16]}"


def sample_set_id(task: str, indices: Tensor, n_test: int) -> str:
    """``<task>:<count>/<test size>:<hash of the indices>``, the test images evaluated."""
    digest = hashlib.sha256(indices.numpy().astype(np.int64).tobytes()).hexdigest()[:12]
    return f"{task}:{len(indices)}/{n_test}:{digest}"
