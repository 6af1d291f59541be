"""Soak test, run by hand (pytest does not collect it): SIGTERMs at random moments into a
script's run, each of which must exit 143 without a traceback and then resume, by the same
command, to the result of the run that was never stopped.

    python tests/soak_signals.py --target main_fast --n 50 --seed 0
    python tests/soak_signals.py --target cifar_dictlearning --n 50
    python tests/soak_signals.py --target torchrun --n 10      # 2 processes; torchrun or a rank
    python tests/soak_signals.py --target robustness --n 20

Each trial starts the target's command in a fresh folder, launched from it as a job script
would be (the script by its path in the checkout, the run folder relative and named with a space
and an accent), sends SIGTERM after a random delay drawn from [0, ``--span`` x the uninterrupted
run's wall time] (the startup imports included), waits for the exit, then runs the continue
command the script printed, as printed, by a shell in another folder (the same command until it
exits 0 when none was printed, or under torchrun) and compares the result with the
uninterrupted one: the final weights (``main_fast``, ``torchrun``) or ``dictionary.pt``
(``cifar_dictlearning``) bit for bit, with ``results.csv`` or ``robustness.csv`` row by row
without their seconds. A signal that lands after the run finished (exit 0), or in the few
milliseconds before Python runs the script's first line, which installs the handlers (killed by
the signal: a shell's status 143), is counted apart.
Under torchrun the signal goes, in turn, to torchrun itself (its own status is then 1, see
docs/torchrun.md; rank 0 must have said that it saved ``interrupted.pt``) and to one of its
ranks (every rank's status in torchrun's summary must be 143). Exit status: 0 when every
trial held, 1 otherwise; one line per trial and a summary are printed.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds any one command may take
RESUMES = 4  # at most this many reruns to finish a stopped run
RUN = "rés ults/run 1"  # the run folder, relative to the trial folder it is launched from

# A tiny CNN on the bundled digits: 6 batches an epoch, 3 epochs
DIGITS_CNN = ["--model", "CNN", "--task", "DIGITS", "--channels", "4", "--kernels", "3",
              "--strides", "1", "--paddings", "1", "--pools", "m", "--fc", "10", "--lrs", "0.1",
              "0.1", "--T1", "3", "--T2", "2", "--mbs", "256", "--seed", "0", "--epochs", "3",
              "--device", "cpu", "--save"]  # fmt: skip
DICTIONARY = ["--task", "DIGITS", "--lca_feats", "4", "--lca_ksize", "3", "--lca_stride", "1",
              "--lca-iters", "5", "--epochs", "3", "--seed", "0"]  # fmt: skip
ROBUSTNESS = ["--device", "cpu", "--n-samples", "40", "--attacks", "pgd-linf", "--gradients",
              "bptt", "--steps", "5", "--eps", "0", "0.01", "0.05", "0.1", "0.2"]  # fmt: skip


@dataclass
class Target:
    """How to run one target in ``folder`` and what its result is."""

    name: str
    nproc: int = 1
    needs_trained_run: bool = False
    outcomes: dict[str, int] = field(default_factory=dict)

    def command(self, folder: Path) -> list[str]:
        """Launched from the trial folder, as a job script would: the script by its path in
        the checkout, the run folder relative to the trial folder."""
        python, run = [sys.executable], RUN
        if self.name == "main_fast":
            return [*python, str(ROOT / "main_fast.py"), *DIGITS_CNN, "--load-path", run]
        if self.name == "torchrun":
            launcher = [*python, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", str(self.nproc)]  # fmt: skip
            return [*launcher, str(ROOT / "main_fast.py"), *DIGITS_CNN, "--load-path", run]
        if self.name == "cifar_dictlearning":
            return [*python, str(ROOT / "cifar_dictlearning.py"), *DICTIONARY, "--out-dir", run]
        return [*python, str(ROOT / "robustness.py"), "--load-path", run, *ROBUSTNESS]

    def result(self, folder: Path) -> tuple[dict, list[dict]]:
        """The tensors and the CSV rows (without seconds) that must match."""
        run = folder / RUN
        if self.name in ("main_fast", "torchrun"):
            record = torch.load(run / "final_model.pt", weights_only=True)
            return record["model_state"], csv_rows(run / "results.csv")
        if self.name == "cifar_dictlearning":
            saved = torch.load(run / "dictionary.pt", weights_only=True)
            tensors = saved if isinstance(saved, dict) else {"dictionary": saved}
            return tensors, []
        return {}, csv_rows(run / "robustness.csv")


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def same(result: tuple[dict, list[dict]], expected: tuple[dict, list[dict]]) -> bool:
    tensors, rows = result
    expected_tensors, expected_rows = expected
    if tensors.keys() != expected_tensors.keys() or rows != expected_rows:
        return False
    return all(
        torch.equal(value, expected_tensors[name]) if isinstance(value, torch.Tensor)
        else value == expected_tensors[name]
        for name, value in tensors.items()
    )  # fmt: skip


def run(command: list[str] | str, folder: Path) -> subprocess.CompletedProcess:
    """``command`` run in ``folder``: a list of words, or a line for the shell."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, cwd=folder, env=environment, capture_output=True, text=True, timeout=TIMEOUT,
        shell=isinstance(command, str),
    )  # fmt: skip


def printed_command(stderr: str) -> str | None:
    """The continue command a stopped script printed last (``cd ... && python ...``)."""
    lines = [line.strip().removeprefix("continue with: ") for line in stderr.splitlines()]
    commands = [line for line in lines if line.startswith("cd ") and " && " in line]
    return commands[-1] if commands else None


def project_tracebacks(stderr: str) -> bool:
    """Whether a traceback names a file of this project, or an exception was swallowed
    (torchrun's own traceback, of its launcher, names only torch's files)."""
    frames = re.findall(r'File "(.*?)"', stderr)
    return any(name.startswith(str(ROOT)) for name in frames) or "Exception ignored" in stderr


def ranks_of(launcher: int) -> list[int]:
    """The worker processes torchrun ``launcher`` has started (Linux /proc)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children")
    try:
        return [int(pid) for pid in children.read_text().split()]
    except OSError:
        return []


def prepare(target: Target, folder: Path, trained: Path | None) -> None:
    """A fresh trial folder; robustness evaluates a copy of one trained run."""
    folder.mkdir(parents=True)
    if trained is not None:
        shutil.copytree(trained, folder / RUN)


def judge_stop(target: Target, done: subprocess.CompletedProcess, aimed_at_launcher: bool,
               folder: Path) -> str:  # fmt: skip
    """``ok``, ``finished`` (the run had ended) or what went wrong."""
    if done.returncode == 0:
        return "finished"
    if done.returncode == -signal.SIGTERM and not done.stderr.strip():
        # it arrived before Python ran the script's first line, so before its handlers: the
        # default action killed it, which a shell (and a scheduler) reports as 143
        return "killed before its handlers"
    if project_tracebacks(done.stderr):
        return "traceback"
    if target.name != "torchrun":
        return "ok" if done.returncode == 143 else f"exit {done.returncode}"
    if done.returncode != 1:
        return f"torchrun exit {done.returncode}"
    started = (folder / RUN / "hyperparameters.txt").exists()
    if started and not (folder / RUN / "interrupted.pt").exists():
        return "no interrupted.pt"
    if aimed_at_launcher:
        return "ok"
    statuses = re.findall(r"^\s*exitcode\s*: (-?\d+)", done.stderr, re.MULTILINE)
    return "ok" if statuses and set(statuses) == {"143"} else f"rank statuses {statuses}"


def resume(target: Target, command: list[str], folder: Path, stderr: str) -> str | None:
    """Finish the stopped run: by the command it printed, as printed, run by a shell in
    another folder (under torchrun, whose printed command names one process: by the job's
    command line again, up to ``RESUMES`` times). Returns what went wrong, or None."""
    printed = printed_command(stderr) if target.name != "torchrun" else None
    if printed is not None:
        elsewhere = folder.parent / "élsewhere"
        elsewhere.mkdir(exist_ok=True)
        resumed = run(printed, elsewhere)
        if resumed.returncode != 0:
            return f"printed command failed ({resumed.returncode}): {resumed.stderr[-1000:]}"
        target.outcomes["resumed by the printed command"] = (
            target.outcomes.get("resumed by the printed command", 0) + 1
        )
        return None
    for _ in range(RESUMES):
        resumed = run(command, folder)
        if resumed.returncode == 0:
            return None
    return f"no resume: {resumed.stderr[-1000:]}"


def trial(target: Target, folder: Path, delay: float, rng: random.Random, trained, expected):
    prepare(target, folder, trained)
    command = target.command(folder)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(command, cwd=folder, env=environment, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    aimed_at_launcher = target.name != "torchrun" or rng.random() < 0.5
    try:
        time.sleep(delay)  # the random moment is what this script is about
        ranks = [] if aimed_at_launcher else ranks_of(child.pid)
        victim = rng.choice(ranks) if ranks else child.pid
        aimed_at_launcher = victim == child.pid
        if child.poll() is None:
            os.kill(victim, signal.SIGTERM)
        out, err = child.communicate(timeout=TIMEOUT)
    finally:
        child.kill()
    done = subprocess.CompletedProcess(command, child.returncode, out, err)
    verdict = judge_stop(target, done, aimed_at_launcher, folder)
    if verdict != "finished":
        failure = resume(target, command, folder, err)
        if failure:
            return verdict, failure, done.stderr[-2000:]
    matched = "same" if same(target.result(folder), expected) else "differs"
    return verdict, matched, done.stderr[-2000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    targets = ("main_fast", "cifar_dictlearning", "torchrun", "robustness")
    parser.add_argument("--target", default="main_fast", choices=targets)
    parser.add_argument("--n", type=int, default=None, help="signals (50, 50, 10, 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the moments")
    parser.add_argument("--span", type=float, default=1.0,
                        help="moments in [0, SPAN x the uninterrupted wall time]")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the trial folders")
    args = parser.parse_args(argv)
    n = args.n or {"main_fast": 50, "cifar_dictlearning": 50, "torchrun": 10}.get(args.target, 20)
    target = Target(args.target, nproc=2 if args.target == "torchrun" else 1)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix=f"soak_{args.target}_"))
    trained = None
    if target.name == "robustness":  # the run the sweeps evaluate
        trained = work / "trained"
        done = run([sys.executable, "main_fast.py", *DIGITS_CNN, "--load-path", str(trained)],
                   ROOT)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    reference = work / "reference"
    prepare(target, reference, trained)
    started = time.monotonic()
    done = run(target.command(reference), reference)
    wall = (time.monotonic() - started) * args.span
    assert done.returncode == 0, done.stderr[-2000:]
    expected = target.result(reference)
    print(f"{target.name}: uninterrupted run {wall:.1f} s; {n} SIGTERMs in [0, {wall:.1f}] s")
    failures = 0
    for i in range(n):
        delay = rng.uniform(0.0, wall)
        verdict, matched, err = trial(target, work / f"trial_{i}", delay, rng, trained, expected)
        target.outcomes[verdict] = target.outcomes.get(verdict, 0) + 1
        held = verdict in ("ok", "finished", "killed before its handlers") and matched == "same"
        failures += not held
        print(f"trial {i:3d}: SIGTERM at {delay:5.2f} s: {verdict}, resumed result {matched}")
        if not held:
            print("  " + err.strip().replace("\n", "\n  "))
        if not args.keep:
            shutil.rmtree(work / f"trial_{i}", ignore_errors=True)
    summary = ", ".join(f"{count} {verdict}" for verdict, count in sorted(target.outcomes.items()))
    print(f"{target.name}: {n} trials: {summary}; {n - failures} held, {failures} failed")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
