"""The entry of every command-line script: exit statuses, one-line failures, signals, usage.

``main_fast.py``, ``cifar_dictlearning.py`` and ``robustness.py`` all start here, so that one
table of exit statuses holds for each of them:

    0 done                     1 training diverged        2 bad input (``UsageError``)
    69 under torchrun: another process of the run was lost (killed, or it stopped answering)
    74 a file could not be written or read (``OSError``, ``storage.StorageError``)
    75 another process writes the folder (``storage.FolderBusyError``)
    130 Ctrl-C                 143 SIGTERM, handled like Ctrl-C (``Terminated``)

A failure the user can act on is one ``error:`` line on stderr, naming the problem and the fix.
This module imports the standard library only: a script calls :func:`install_stop_handlers`
before it imports torch, and then :func:`run_script` around its work. Every signal handler of
the scripts is installed here (``experiment/distributed.py`` hooks ``note_interrupts``).

Signals set a flag; the work stops at its next safe point. The handlers of SIGINT and SIGTERM
only record the request. The loops call :func:`raise_if_stopped` where stopping is safe
(between the steps of a phase, between batches, before and after saving), which raises
``KeyboardInterrupt`` or ``Terminated`` there, and the usual Ctrl-C path saves and exits 130 or
143. No exception ever starts inside library code, a second signal does not cut a save short,
and a third one ends the process at once.

Also here: the parser every script starts from (``command_parser``, errors as UsageErrors),
the dash and underscore spellings of a flag, and the range check of a number flag.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_DIVERGED = 1  # training diverged to NaN/inf; the last good checkpoint is kept
EXIT_USAGE = 2  # bad input: a flag, a missing or corrupt file; nothing was written
EXIT_LOST = 69  # torchrun: a process of the run is gone (sysexits' EX_UNAVAILABLE)
EXIT_STORAGE = 74  # a file could not be written or read (disk full, read-only, permissions)
EXIT_BUSY = 75  # another live process writes the same folder; try again later
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): what was saved is kept
EXIT_TERMINATED = 143  # SIGTERM (preemption): the same as Ctrl-C

FORCE_AFTER = 3  # the third stop signal ends the process at once

# (kind of error, exit status) pairs; the first kind an error is counts
Statuses = Sequence[tuple[type[BaseException], int]]


class UsageError(Exception):
    """A problem the user can fix (bad flag, missing or corrupt file); the message says how."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, the signal a cluster scheduler sends before killing a job. A KeyboardInterrupt,
    so that everything that saves and cleans up on Ctrl-C does the same on SIGTERM."""


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


class _Stops:
    """What the handlers have recorded: the first stop signal and how many came."""

    signum: int | None = None
    count = 0
    raised = False
    held = 0  # depth of the holding_stops blocks the work is in
    notes: list[Callable[[], None]] = []


def _record(signum, frame) -> None:
    """The handler of SIGINT and SIGTERM: record the request and return, so that no exception
    starts inside library code (a C extension would turn it into another error). A third
    signal ends the process at once."""
    _Stops.count += 1
    if _Stops.signum is None:
        _Stops.signum = signum
    for note in _Stops.notes:
        note()
    if _Stops.count >= FORCE_AFTER:
        os._exit(128 + signum)


def install_stop_handlers() -> None:
    """SIGINT and SIGTERM only record a stop request from now on (:func:`_record`). Scripts call
    this first, before torch loads, so that a signal during the imports is a quiet stop."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _record)
        signal.signal(signal.SIGTERM, _record)


def stop_requested() -> int | None:
    """The signal number of the first stop request, or None."""
    return _Stops.signum


def raise_if_stopped() -> None:
    """A safe point: once a stop was requested, raise ``KeyboardInterrupt`` (SIGINT) or
    ``Terminated`` (SIGTERM) here, once; what saves on Ctrl-C then saves. Later safe points
    pass, so that a save in progress is not cut short, and so do those within
    :func:`holding_stops`."""
    if _Stops.signum is None or _Stops.raised or _Stops.held:
        return
    _Stops.raised = True
    raise Terminated() if _Stops.signum == signal.SIGTERM else KeyboardInterrupt()


def request_stop(signum: int) -> None:
    """Record a stop request as if ``signum`` had arrived (another rank's, say), telling the
    ``note_interrupts`` hooks; the count of signals is left alone."""
    if _Stops.signum is None:
        _Stops.signum = signum
        for note in _Stops.notes:
            note()


def forget_stops() -> None:
    """Clear the recorded requests (a script run in-process ends; tests start afresh)."""
    _Stops.signum, _Stops.count, _Stops.raised, _Stops.held = None, 0, False, 0
    _Stops.notes.clear()


@contextlib.contextmanager
def holding_stops() -> Iterator[None]:
    """Within the block every safe point passes (the figures of a save settle the model, whose
    phases have safe points): a stop requested meanwhile is honoured at the first safe point
    after the block, so that a save is never cut short."""
    _Stops.held += 1
    try:
        yield
    finally:
        _Stops.held = max(_Stops.held - 1, 0)


@contextlib.contextmanager
def stop_handlers() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM record a stop request that the work honours at its
    next safe point (:func:`raise_if_stopped`). A request recorded before the block (during the
    imports) stands. The previous handlers come back and the requests are cleared on exit.
    Outside the main thread signals cannot be caught, and nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    install_stop_handlers()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        forget_stops()


def with_signals(work: Callable[[], Any]) -> Any:
    """``work()`` under :func:`stop_handlers`, after a first safe point (a stop requested while
    the libraries loaded ends it before it starts)."""
    with stop_handlers():
        raise_if_stopped()
        return work()


def exit_after_work(status: int) -> NoReturn:
    """Exit with ``status`` once the script's work is over (everything is saved), SIGINT and
    SIGTERM ignored from here on. The interpreter's shutdown gives the handled signals their
    default action back before the libraries are torn down, so a late SIGTERM (a scheduler's
    preemption arriving as the job ends) would otherwise kill the finished process (-15);
    ignored signals stay ignored."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(status)


def note_interrupts(note: Callable[[], None]) -> None:
    """Call ``note()`` whenever a stop signal is recorded (from the handler: keep it short)."""
    _Stops.notes.append(note)


def exit_status_of(interrupt: KeyboardInterrupt) -> int:
    """143 for SIGTERM, 130 for Ctrl-C."""
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED


def interruption(interrupt: KeyboardInterrupt) -> str:
    """What stopped the process, in words."""
    return "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"


# --------------------------------------------------------------------------------------------
# One-line messages
# --------------------------------------------------------------------------------------------


def first_line(error: BaseException) -> str:
    """``"<ErrorType>: <first line of its message>"``, for one-line user messages."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def one_line(text: str) -> str:
    """A multi-line message joined into one line, its lines separated by '; ' unless they end
    in punctuation already."""
    parts = [line.strip() for line in text.splitlines() if line.strip()]
    ended = [p if p.endswith((".", ";", ":")) else p + ";" for p in parts[:-1]]
    return " ".join(ended + parts[-1:])


def shell_command(script: str, args: Sequence[str], launcher: str = "python") -> str:
    """The shell line that runs the checkout's ``script`` (``main_fast.py``, ...) with ``args``
    as this process was run, from any folder: it changes to the folder this process was
    launched from (so relative paths mean what they meant), names the script by its absolute
    path, and quotes every word for the shell."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    words = shlex.join([os.path.join(checkout, script), *map(str, args)])
    return f"cd {shlex.quote(os.getcwd())} && {launcher} {words}"


def warn(message: str) -> None:
    """One ``warning:`` line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def storage_message(error: OSError, fix: str) -> str:
    """One line for a failed read or write: what, which file, and ``fix``."""
    name = errno.errorcode.get(error.errno or 0, "")
    reason = error.strerror or str(error)
    where = f" ({error.filename})" if error.filename else ""
    return f"cannot write or read a file{where}: {reason}{f' [{name}]' if name else ''}; {fix}"


# --------------------------------------------------------------------------------------------
# Failures and exit statuses
# --------------------------------------------------------------------------------------------


def failure(error: BaseException, statuses: Statuses, storage_fix: str) -> tuple[int, str] | None:
    """Exit status and one-line message of ``error``: an interrupt (130 / 143), the first kind
    of ``statuses`` it is, or an I/O error (74, with ``storage_fix`` as the advice). None for
    an unforeseen error, whose traceback helps more than a line."""
    if isinstance(error, KeyboardInterrupt):
        return exit_status_of(error), interruption(error)
    for kind, status in statuses:
        if isinstance(error, kind):
            return status, one_line(str(error))
    if isinstance(error, OSError):
        return EXIT_STORAGE, storage_message(error, storage_fix)
    return None


def fail(message: str, status: int) -> int:
    """One ``error:`` line on stderr; returns the exit ``status``."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    return status


def run_script(
    work: Callable[[], Any], statuses: Statuses, storage_fix: str, kept_note: str = ""
) -> int:
    """Run ``work`` with stop requests honoured at safe points; returns the exit status:
    what ``work`` returns when it is an int, else 0 (done). The failures :func:`failure` knows
    become their exit status and one line on stderr (an interrupt: what stopped the process,
    then ``kept_note``); others propagate."""
    try:
        result = with_signals(work)
    except BaseException as error:
        known = failure(error, statuses, storage_fix)
        if known is None:
            raise
        status, message = known
        if isinstance(error, KeyboardInterrupt):
            print(f"\n{message}{kept_note}", file=sys.stderr)
            return status
        return fail(message, status)
    is_status = isinstance(result, int) and not isinstance(result, bool)
    return result if is_status else EXIT_OK


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


class UsageArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors, reported like the rest (one line)."""

    def error(self, message: str):
        raise UsageError(message)


def command_parser(prog: str, description: str) -> UsageArgumentParser:
    """The parser every script starts from: defaults shown in ``--help``, no abbreviations."""
    return UsageArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )


_UNSET = object()


def parse_explicit(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.Namespace, set[str]]:
    """``parser``'s arguments of ``argv``, and the names of those typed on the command line."""
    args = parser.parse_args(argv)
    # argparse only fills in defaults for names missing from the namespace it is given
    marked = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), _UNSET)))
    return args, {name for name, value in vars(marked).items() if value is not _UNSET}


def flag_spellings(*names: str) -> list[str]:
    """Every spelling of the flags ``names`` (``--multi-word``): with dashes and with
    underscores, in order, each once."""
    spellings: list[str] = []
    for name in names:
        word = name[2:]
        for spelling in (word, word.replace("-", "_"), word.replace("_", "-")):
            if f"--{spelling}" not in spellings:
                spellings.append(f"--{spelling}")
    return spellings


def check_numbers(
    values: Any, ranges: dict[str, tuple], flags: dict[str, str] | None = None
) -> None:
    """:func:`check_number` on every value (a number, a list or None) of each float flag named
    in ``ranges``, ``{dest: (low, low_open, high, high_open)}``; ``values`` holds them by dest
    (a dict, or an object with those attributes), and ``flags`` spells the flag of a dest in
    messages when it is not the dest itself."""
    for name, (low, low_open, high, high_open) in ranges.items():
        given = values[name] if isinstance(values, dict) else getattr(values, name)
        flag = (flags or {}).get(name, name)
        for value in given if isinstance(given, (list, tuple)) else [given]:
            check_number(flag, value, low, high, low_open, high_open)


def check_number(
    flag: str,
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> None:
    """UsageError unless ``value`` (of ``--flag``) is a number in its range: finite (or +inf
    when ``allow_inf``), >= ``low`` (> with ``low_open``), <= ``high`` (< with ``high_open``).
    None (an unset optional flag) passes."""
    if value is None:
        return
    bad = math.isnan(value) or (math.isinf(value) and not allow_inf)
    bad |= low is not None and (value <= low if low_open else value < low)
    bad |= high is not None and (value >= high if high_open else value > high)
    if bad:
        left = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
        right = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        kind = "a number" if allow_inf else "a finite number"
        raise UsageError(f"--{flag} must be {kind} in {left}, {right}, got {value}")


def fit_list(flag: str, values, needed: int, why: str):
    """The first ``needed`` of ``values`` (a list or a string of letters).

    Fewer is a UsageError; extra trailing values (as in the seed's commands) are dropped with
    a one-line warning.
    """
    if len(values) < needed:
        raise UsageError(f"--{flag} needs {needed} values ({why}), got {len(values)}: {values}")
    if len(values) > needed:
        extra = values[needed:]
        shown = extra if isinstance(extra, str) else " ".join(str(v) for v in extra)
        warn(f"--{flag}: {why}, so the first {needed} values are used; ignoring {shown}")
    return values[:needed]


def check_positive(flags: dict, names: Sequence[str], minimum: int = 1) -> None:
    """UsageError unless every value of the flags ``names`` (numbers or lists) is >= minimum."""
    for name in names:
        values = flags[name] if isinstance(flags[name], list) else [flags[name]]
        if any(v < minimum for v in values):
            raise UsageError(f"--{name} must be at least {minimum}, got {flags[name]}")
