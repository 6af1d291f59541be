"""Probe run by hand (pytest does not collect it): what a cluster user meets besides stop
signals (those are ``tests/soak_signals.py``): two processes at one run folder, damaged files
and bad flags, each against the real scripts in child processes.

    nice -n 5 python tests/probe_cluster.py                      # every category
    nice -n 5 python tests/probe_cluster.py --only flags damaged

A refusal must exit 2 with one ``error:`` line on stderr and no traceback, and leave every file
it could reach byte for byte as it was (no lock, no removed temp file, no record). The
concurrency cases check the exit statuses of docs/runs.md (75 for a second writer, a stale lock
taken over) and that a process removes only the temp files of writers that are gone. Prints
one line per case and a count per category; exit status 0 when every case held.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds any one child may take

# A tiny CNN on the bundled digits, one epoch of two batches
DIGITS_CNN = ["--model", "CNN", "--task", "DIGITS", "--channels", "4", "--kernels", "3",
              "--strides", "1", "--paddings", "1", "--pools", "m", "--fc", "10", "--lrs", "0.1",
              "0.1", "--T1", "3", "--T2", "2", "--mbs", "720", "--seed", "0", "--device",
              "cpu"]  # fmt: skip
EVALUATE = ["--device", "cpu", "--n-samples", "12", "--attacks", "pgd-linf", "--gradients", "bptt",
            "--eps", "0.1", "--steps", "2"]  # fmt: skip
AUTOATTACK = ["--device", "cpu", "--n-samples", "12", "--gradients", "bptt", "--eps", "0.1",
              "--eps-l2", "0", "--aa-iterations", "2", "--aa-queries", "5",
              "--aa-targets", "1"]  # fmt: skip
DICTIONARY = ["--task", "DIGITS", "--features", "4", "--kernel-size", "3", "--stride", "1",
              "--lca-iters", "5", "--batch-size", "64", "--max-batches", "2", "--epochs", "1",
              "--device", "cpu"]  # fmt: skip

BAD_TRAINING_FLAGS = [
    ["--betas", "0.0", "nan"], ["--betas", "0.5"], ["--betas", "0", "0"], ["--lrs", "0.1", "-1"],
    ["--wds", "0", "inf"], ["--mmt", "1.5"], ["--epochs", "0"], ["--mbs", "0"], ["--T1", "0"],
    ["--model", "RNN"], ["--task", "CIFAR11"], ["--act", "relu"], ["--tol", "nan"],
    ["--dynamics", "sideways"], ["--channels", "4", "8"], ["--pools", "x"], ["--no-such-flag"],
    ["--seed", "x"], ["--scale", "nan"], ["--alg", "BPTT", "--T2", "9"],
]  # fmt: skip
BAD_EVALUATION_FLAGS = [
    ["--n-samples", "0"], ["--eps", "2"], ["--eps", "nan"], ["--eps-l2", "-1"],
    ["--attacks", "fgsm"], ["--gradients", "magic"], ["--T1", "3", "3"], ["--beta", "0"],
    ["--severities", "9"], ["--corruptions", "fog2"], ["--aa-queries", "0"], ["--steps", "0"],
    ["--mbs", "0"],
]  # fmt: skip
BAD_DICTIONARY_FLAGS = [
    ["--epochs", "0"], ["--features", "0"], ["--eta", "nan"], ["--lambda", "-1"],
    ["--task", "CIFAR11"], ["--no-such-flag"], ["--batch-size", "0"], ["--tau", "0"],
    ["--kernel-size", "4"],
]  # fmt: skip

# A child that holds a folder's lock (argv[2] names it) and, with argv[3], a temp file of its
# own there, until a line arrives on stdin
HOLD = """
import sys
from pathlib import Path
from experiment import storage
folder, name = Path(sys.argv[1]), sys.argv[2]
with storage.FolderLock(folder, name):
    def write(f):
        print("holding", flush=True)
        sys.stdin.readline()
    if len(sys.argv) > 3:
        storage.atomic_write(folder / sys.argv[3], write)
    else:
        write(None)
"""


def python(script: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (missing: empty), by relative path, with its bytes."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def refusal_problem(done: subprocess.CompletedProcess) -> str | None:
    """What is wrong with a refusal, or None: exit 2, one error line, no traceback."""
    err = done.stderr
    if "Traceback" in err:
        return f"traceback: {err[-600:]}"
    if done.returncode != 2:
        return f"exit {done.returncode}: {err[-600:]}"
    lines = err.strip().splitlines()
    if not lines or not lines[-1].startswith("error: ") or err.count("error: ") != 1:
        return f"not one error line: {err[-600:]}"
    return None


def refused_untouched(folder: Path, script: str, *args: str) -> str | None:
    """``script args`` is refused (``refusal_problem``) and ``folder`` is as it was (and is
    not created)."""
    before = snapshot(folder)
    existed = folder.exists()
    problem = refusal_problem(python(script, *args))
    if problem:
        return problem
    after = snapshot(folder)
    changed = set(after) ^ set(before) | {k for k in before if after.get(k) != before[k]}
    if changed:
        return f"changed {sorted(changed)}"
    return f"created {folder}" if folder.exists() and not existed else None


class Holder:
    """A child process holding a lock (and a temp file) until :meth:`release`."""

    def __init__(self, folder: Path, lock: str, temp_of: str | None = None) -> None:
        args = [str(folder), lock, *([temp_of] if temp_of else [])]
        self.child = subprocess.Popen([sys.executable, "-c", HOLD, *args], cwd=ROOT,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)  # fmt: skip
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.child.stdout.readline()))
        reader.start()
        reader.join(TIMEOUT)
        assert lines == ["holding\n"], (lines, self.child.stderr.read() if lines else "")

    def release(self) -> int:
        _, err = self.child.communicate("go\n", timeout=TIMEOUT)
        assert self.child.returncode == 0, err
        return self.child.returncode


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    return int(done.stdout)


# --------------------------------------------------------------------------------------------
# The cases: each returns None when it held, else what went wrong
# --------------------------------------------------------------------------------------------


class Probe:
    def __init__(self, work: Path) -> None:
        self.work, self.count = work, 0
        self.base = work / "base"  # a finished one-epoch run
        done = python("main_fast.py", *DIGITS_CNN, "--save", "--load-path", str(self.base))
        assert done.returncode == 0, done.stderr[-2000:]
        self.attacked = self.copy("attacked")  # the same, evaluated with AutoAttack
        done = python("robustness.py", "--load-path", str(self.attacked), *AUTOATTACK,
                      "--attacks", "autoattack")  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        self.dictionary = work / "dictionary"
        done = python("cifar_dictlearning.py", *DICTIONARY, "--out-dir", str(self.dictionary))
        assert done.returncode == 0, done.stderr[-2000:]

    def copy(self, name: str, source: Path | None = None) -> Path:
        self.count += 1
        return Path(shutil.copytree(source or self.base, self.work / f"{name}_{self.count}"))

    # ---- bad flags ---------------------------------------------------------------------

    def flags(self) -> dict[str, str | None]:
        cases = {}
        for extra in BAD_TRAINING_FLAGS:
            results = self.work / f"results_{len(cases)}"
            cases[f"main_fast.py {' '.join(extra)}"] = refused_untouched(
                results, "main_fast.py", *DIGITS_CNN, *extra, "--save", "--results-dir",
                str(results),
            )  # fmt: skip
        for extra in BAD_EVALUATION_FLAGS:
            cases[f"robustness.py {' '.join(extra)}"] = refused_untouched(
                self.base, "robustness.py", "--load-path", str(self.base), *EVALUATE, *extra
            )
        cases["robustness.py without --load-path"] = refusal_problem(
            python("robustness.py", *EVALUATE)
        )
        for extra in BAD_DICTIONARY_FLAGS:
            out = self.work / f"dictionary_{len(cases)}"
            cases[f"cifar_dictlearning.py {' '.join(extra)}"] = refused_untouched(
                out, "cifar_dictlearning.py", *DICTIONARY, *extra, "--out-dir", str(out)
            )
        return cases

    # ---- damaged files -----------------------------------------------------------------

    def damaged(self) -> dict[str, str | None]:
        checkpoint = (self.base / "checkpoint.pt").read_bytes()
        damages = {
            "checkpoint.pt of garbage": ("checkpoint.pt", b"\x80\x02garbage"),
            "checkpoint.pt of zero bytes": ("checkpoint.pt", b""),
            "checkpoint.pt cut in half": ("checkpoint.pt", checkpoint[: len(checkpoint) // 2]),
            "checkpoint.pt of another program": ("checkpoint.pt", None),
            "results.csv not UTF-8": ("results.csv", b"epoch,train_acc\n\xff\xfe1,0.5\n"),
        }
        cases = {}
        for label, (name, content) in damages.items():
            run = self.copy("damaged")
            if content is None:
                torch.save({"epoch": 1}, run / name)
            else:
                (run / name).write_bytes(content)
            requeue = ["--save", "--load-path", str(run), "--epochs", "2"]
            cases[f"requeue, {label}"] = refused_untouched(run, "main_fast.py", *requeue)
        for label, script, args in (
            ("--todo evaluate", "main_fast.py", ["--todo", "evaluate"]),
            ("robustness.py", "robustness.py", EVALUATE),
        ):
            run = self.copy("damaged")
            (run / "model.pt").write_bytes(b"not a model")
            cases[f"{label}, model.pt of garbage"] = refused_untouched(
                run, script, "--load-path", str(run), *args
            )
        run = self.copy("damaged")
        (run / "robustness.csv").write_bytes(b"attack,norm\n\xff\xfe,linf\n")
        cases["robustness.py, robustness.csv not UTF-8"] = refused_untouched(
            run, "robustness.py", "--load-path", str(run), *EVALUATE
        )
        for label, content in (("zero bytes", b""), ("garbage", b"PK\x03\x04 not a tensor")):
            run = self.copy("damaged", self.attacked)
            component = sorted((run / "autoattack").glob("*_square.pt"))[0]
            component.write_bytes(content)
            more = ["--load-path", str(run), *AUTOATTACK, "--attacks", "pgd-linf", "autoattack"]
            cases[f"robustness.py, AutoAttack component of {label}"] = refused_untouched(
                run, "robustness.py", *more
            )
        out = self.copy("damaged", self.dictionary)
        (out / "dictlearning_state.pt").write_bytes(b"\x80\x02garbage")
        cases["cifar_dictlearning.py, dictlearning_state.pt of garbage"] = refused_untouched(
            out, "cifar_dictlearning.py", *DICTIONARY, "--epochs", "2", "--out-dir", str(out)
        )
        notes = self.work / "notes"
        notes.mkdir()
        (notes / ".draft.tmp").write_text("half a thought")
        cases["--load-path at a folder that is not a run"] = refused_untouched(
            notes, "main_fast.py", "--load-path", str(notes), "--epochs", "3"
        )
        (notes / "results.csv").write_text("epoch,train_acc\n")
        cases["--save --load-path at a run without its checkpoint"] = refused_untouched(
            notes, "main_fast.py", *DIGITS_CNN, "--save", "--load-path", str(notes)
        )
        missing = self.work / "no such folder"
        cases["--load-path at a missing folder"] = refused_untouched(
            missing, "main_fast.py", "--load-path", str(missing), "--epochs", "3"
        )
        return cases

    # ---- two processes at one folder ---------------------------------------------------

    def concurrency(self) -> dict[str, str | None]:
        cases = {}
        host = socket.gethostname()

        run = self.copy("concurrent")
        evaluation = Holder(run, ".robustness.lock", "robustness.csv")
        (temp,) = run.glob(".robustness.csv.*.tmp")
        done = python("main_fast.py", "--save", "--load-path", str(run))
        problem = None if done.returncode == 0 else f"requeue exit {done.returncode}"
        problem = problem or (None if temp.is_file() else "the evaluation's temp file was removed")
        evaluation.release()
        cases["requeue beside an evaluation's write"] = problem

        run = self.copy("concurrent")
        training = Holder(run, ".lock", "checkpoint.pt")
        (temp,) = run.glob(".checkpoint.pt.*.tmp")
        done = python("robustness.py", "--load-path", str(run), *EVALUATE)
        problem = None if done.returncode == 0 else f"evaluation exit {done.returncode}"
        problem = problem or (None if temp.is_file() else "the training's temp file was removed")
        training.release()
        cases["evaluation beside a training run's write"] = problem

        run = self.copy("concurrent")
        training = Holder(run, ".lock")
        before = snapshot(run)
        done = python("main_fast.py", "--load-path", str(run), "--epochs", "2")
        training.release()
        problem = None if done.returncode == 75 else f"exit {done.returncode}"
        after = {k: v for k, v in snapshot(run).items() if k != ".lock"}
        unchanged = after == {k: v for k, v in before.items() if k != ".lock"}
        cases["a second training writer"] = problem or (None if unchanged else "files changed")

        run = self.copy("concurrent")
        evaluation = Holder(run, ".robustness.lock")
        done = python("robustness.py", "--load-path", str(run), *EVALUATE)
        evaluation.release()
        cases["a second evaluation"] = None if done.returncode == 75 else f"exit {done.returncode}"

        run = self.copy("concurrent")
        training = Holder(run, ".lock")
        training.child.send_signal(signal.SIGKILL)
        training.child.wait(TIMEOUT)
        done = python("main_fast.py", "--load-path", str(run), "--epochs", "2")
        problem = None if done.returncode == 0 else f"exit {done.returncode}: {done.stderr[-600:]}"
        taken = "took over the lock" in done.stderr
        cases["the lock of a killed writer"] = problem or (None if taken else "no notice")

        run = self.copy("concurrent")
        gone = run / f".checkpoint.pt.k2j4x9.{dead_pid()}@{host}.tmp"
        kept = [run / ".draft.tmp", run / f".results.csv.a1b2c3.{dead_pid()}@other-host.tmp"]
        for path in [gone, *kept]:
            path.write_bytes(b"half a file")
        done = python("main_fast.py", "--load-path", str(run), "--epochs", "2")
        problem = None if done.returncode == 0 else f"exit {done.returncode}"
        problem = problem or ("a killed writer's temp file stayed" if gone.exists() else None)
        cases["temp files: a dead writer's removed, others kept"] = problem or (
            None if all(p.is_file() for p in kept) else "removed a file it does not own"
        )

        folder = self.work / "twice started"
        argv = [sys.executable, str(ROOT / "main_fast.py"), *DIGITS_CNN, "--save", "--load-path",
                str(folder)]  # fmt: skip
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        children = [subprocess.Popen(argv, env=environment, **quiet) for _ in range(2)]
        statuses = sorted(child.wait(TIMEOUT) for child in children)
        fine = statuses in ([0, 0], [0, 75]) and (folder / "final_model.pt").is_file()
        cases["the same job started twice at once"] = None if fine else f"statuses {statuses}"
        return cases


def main(argv: list[str] | None = None) -> int:
    categories = ("concurrency", "damaged", "flags")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=categories, default=list(categories))
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="probe_cluster_"))
    probe = Probe(work)
    failures = 0
    for category in args.only:
        cases = getattr(probe, category)()
        for label, problem in cases.items():
            print(f"{category}: {label}: {'held' if problem is None else 'FAILED: ' + problem}")
        failed = sum(problem is not None for problem in cases.values())
        print(f"{category}: {len(cases)} cases, {len(cases) - failed} held, {failed} failed")
        failures += failed
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
