"""A robustness evaluation of a saved run, from its configuration to its files.

``evaluate_run`` loads the run's best model, draws the test images, plans the jobs
(``jobs.plan_jobs``), reuses every row of ``robustness.csv`` whose key matches (unless
``fresh``), measures the rest (``measure.Measurer``), rewriting the CSV after each row, and
writes ``robustness.png`` and the summary ``robustness.txt``, all under the folder's
evaluation lock; with ``tensorboard``, every row goes to ``RUN/tb/robustness`` too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

import data_utils
from experiment import data_loading, entry, records, run_board, storage
from experiment.distributed import resolve_device
from experiment.entry import UsageError
from robust_eval.config import RobustnessConfig
from robust_eval.corruptions import read_release, release_folder
from robust_eval.jobs import checks_lines, masking_flags, plan_jobs, summary_lines
from robust_eval.measure import Measurer, sample_test_pixels
from robust_eval.results import AUTOATTACK, ResultsFile, job_row, sample_set_id, weights_hash
from utils_ep_fast import CLAMP_SLOPES

ROBUSTNESS_CSV = "robustness.csv"
ROBUSTNESS_PNG = "robustness.png"
ROBUSTNESS_TXT = "robustness.txt"
# beside a training run's .lock; each removes only the .tmp files of writers that are gone
LOCK_FILE = ".robustness.lock"


def evaluate_run(config: RobustnessConfig) -> int:
    """Evaluate the run of ``config.load_path``; write its files; returns the exit status (0).
    The folder must be writable (74 at once, before any attack) and free of another
    evaluation (75)."""
    record, model_path = records.load_model_file(config.load_path)
    folder = model_path.parent
    storage.check_writable(folder, "load-path")  # 74 at once, before any attack
    with contextlib.ExitStack() as held:
        return evaluate(
            config,
            record,
            model_path,
            lambda: held.enter_context(storage.FolderLock(folder, LOCK_FILE)),
        )


def evaluate(
    config: RobustnessConfig, record: dict, model_path: Path, take_lock: Callable[[], object]
) -> int:
    """The evaluation proper. ``take_lock()`` takes the folder's evaluation lock once all that
    can be refused has been checked (a refusal leaves the folder as it was, not even a lock
    file), before the files it rewrites are read for good."""
    saved = records.run_flags(record)
    task = data_loading.canonical_task(saved["task"])
    try:
        config = config.with_task_epsilons(task)
    except ValueError as error:
        raise UsageError(str(error)) from error
    data_dir = config.data_dir or saved.get("data_dir", "./data")
    T1_values = list(config.T1 or [int(saved["T1"])])
    T2 = config.T2 or int(saved["T2"])
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # ART puts its tensors on the current CUDA device
    model = records.restore_model(record, device).eval()
    if "bpda" in config.gradients and model.activation not in CLAMP_SLOPES:
        raise UsageError(
            f"--gradients bpda needs a clamp activation ({', '.join(CLAMP_SLOPES)}); this model "
            f"uses {model.activation}: use --gradients bptt or ep"
        )
    channels, height, width, _ = data_loading.task_info(task)
    indices, pixels, labels, n_test = sample_test_pixels(
        task, data_dir, config.download, config.n_samples, config.seed
    )
    release = release_folder(task, data_dir) if "corruptions" in config.attacks else None
    released = {}
    if release is not None:  # read (and check) every file before anything is written
        for name in config.corruptions:
            released[name] = read_release(release, name, n_test, (channels, height, width), indices)
    evaluation = {"T2": T2, "beta": config.beta, "steps": config.steps, "queries": config.queries,
                  "restarts": config.restarts, "batch_size": config.mbs, "seed": config.seed,
                  "sample_set": sample_set_id(task, indices, n_test),
                  "model": weights_hash(model),
                  AUTOATTACK: {"steps": config.aa_iterations, "queries": config.aa_queries,
                               "restarts": config.aa_restarts,
                               "targets": config.aa_targets}}  # fmt: skip
    measurer = Measurer(config, model, task, T2, evaluation, pixels.to(device), labels.to(device),
                        released, model_path.parent)  # fmt: skip
    jobs = plan_jobs(config, T1_values)
    csv_path = model_path.parent / ROBUSTNESS_CSV
    ResultsFile(csv_path)  # a damaged CSV or AutoAttack file is refused before the lock
    measurer.check_saved_components(jobs)
    take_lock()
    results = ResultsFile(csv_path)  # again, under the lock: another evaluation may have ended
    if config.fresh:
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
    log_rows(model_path.parent, config.tensorboard, rows)
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
    write_summary(config, record, model_path, rows, T1_values, T2, extra)
    return entry.EXIT_OK


def log_rows(folder: Path, enabled: bool, rows: list[dict]) -> None:
    """With ``--tensorboard``, every row (reused ones too) in ``folder/tb/robustness``, one tag
    per setting at step T1; the log starts again from the smallest T1 of this evaluation."""
    if not enabled or not rows:
        return
    with run_board.robustness_board(folder, True, int(min(row["T1"] for row in rows))) as board:
        for row in rows:
            run_board.log_robustness_row(board, row, int(row["T1"]))


def write_summary(config, record, model_path: Path, rows, T1_values, T2, extra) -> None:
    """robustness.png and robustness.txt of this evaluation's rows, both atomically."""
    folder = model_path.parent
    flags = masking_flags(rows)
    storage.save_figure(data_utils.plot_robustness(rows), folder / ROBUSTNESS_PNG)
    budgets = []  # only those of the attacks this evaluation ran
    if (
        any(name != "corruptions" and name != AUTOATTACK for name in config.attacks)
        or config.checks
    ):
        budgets.append(
            f"{config.steps} steps, {config.queries} queries, {config.restarts} restarts"
        )
    if AUTOATTACK in config.attacks:
        budgets.append(
            f"AutoAttack {config.aa_iterations} iterations, {config.aa_queries} queries, "
            f"{config.aa_targets} targets, {config.aa_restarts} restarts"
        )
    header = (
        f"robustness {model_path.name} (epoch {record['epoch']}, T1 "
        f"{' '.join(map(str, T1_values))}, {rows[0]['samples']:g} test images, seed {config.seed}, "
        f"T2 {T2}, beta {config.beta}{''.join(', ' + budget for budget in budgets)}):"
    )
    lines = summary_lines(rows, flags, header) + [f"  {line}" for line in extra]
    print("\n".join(lines))
    text = "\n".join(lines) + "\n"
    storage.atomic_write(folder / ROBUSTNESS_TXT, lambda f: f.write(text.encode()))
    print(
        f"written: {folder / ROBUSTNESS_CSV}, {folder / ROBUSTNESS_PNG}, {folder / ROBUSTNESS_TXT}"
    )
