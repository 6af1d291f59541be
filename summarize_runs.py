"""Mean +- std of runs over their seeds: the command line of ``experiment/summary.py``.

    python summarize_runs.py RESULTS_DIR [RESULTS_DIR ...] [--out-dir DIR] [--ddof 1]
                             [--stopped separate | leave-out]

Groups the run folders below the results folders by their saved configuration (without the
seed and the flags that only say how a run was launched), prints a table per group (the
settings that differ between groups, n, the seeds, mean +- std of the best and final test
accuracy, of the epoch of the best and of the seconds per epoch) and writes it to ``--out-dir``
(default: the first results folder) as ``runs_summary.csv`` and ``runs_summary.md``, with
``runs_summary_test_acc.png`` (test accuracy against epoch, mean and a +- one std band per
group); the runs' ``robustness.csv`` the same way per attack and epsilon
(``robustness_summary.csv`` / ``.md``). A folder that cannot be read gives one ``skipped:``
line and the rest are summarised. Exit statuses are ``experiment/entry.py``'s (2: no run could
be summarised, or bad flags; 74: the out folder cannot be written).
"""

from __future__ import annotations

from experiment import entry

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the libraries load: no traceback
    entry.install_stop_handlers()

import sys
from collections.abc import Sequence
from pathlib import Path

from experiment import storage
from experiment.entry import UsageError
from experiment.summary import STOPPED_MODES, SummaryConfig, report, summarize

STORAGE_FIX = "give a writable --out-dir"


def build_parser() -> entry.UsageArgumentParser:
    parser = entry.command_parser(
        "summarize_runs.py",
        "Group saved runs by configuration and give mean +- std over their seeds.",
    )
    parser.add_argument(
        "results_dirs",
        nargs="+",
        metavar="RESULTS_DIR",
        help="folders holding run folders (searched at any depth)",
    )
    parser.add_argument(
        "--out-dir",
        default=None,
        help="where the tables and figure go (default: the first RESULTS_DIR)",
    )
    parser.add_argument(
        "--ddof",
        type=int,
        default=1,
        choices=(0, 1),
        help="delta degrees of freedom of the std: 1 the sample std (n - 1), "
        "0 the population std (n)",
    )
    parser.add_argument(
        "--stopped",
        default="separate",
        choices=STOPPED_MODES,
        help="runs stopped before their last epoch: in rows of their own, or left out",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; write no files")
    return parser  # fmt: skip


def build_config(argv: Sequence[str] | None) -> SummaryConfig:
    """The typed configuration of the command line ``argv``."""
    args = build_parser().parse_args(argv)
    results_dirs = tuple(Path(d) for d in args.results_dirs)
    out_dir = None if args.no_write else Path(args.out_dir or results_dirs[0])
    return SummaryConfig(
        results_dirs=results_dirs, out_dir=out_dir, ddof=args.ddof, stopped=args.stopped
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        config = build_config(argv)
    except UsageError as error:
        return entry.fail(str(error), entry.EXIT_USAGE)

    def work() -> None:
        summary = summarize(config)
        for problem in summary.problems:
            print(f"skipped: {problem}", file=sys.stderr)
        if not summary.groups:
            folders = ", ".join(str(folder) for folder in config.results_dirs)
            raise UsageError(
                f"no run could be summarised under {folders}: give the results folders "
                "that main_fast.py --save wrote"
            )
        print(report(config, summary))

    return entry.run_script(work, storage.ERROR_STATUSES, STORAGE_FIX)


if __name__ == "__main__":
    entry.exit_after_work(main())
