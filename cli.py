"""Script plumbing shared by every CLI (main.py, the eval_*.py scripts, visu/): one ``error:``
line and exit 2 for known errors, logging set-up, progress-bar switch."""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

import checkpoint
import clustering
import data
import models
import preempt
from errors import ScriptError

log = logging.getLogger("deepcluster")


# OSErrors of a write that no rerun fixes by itself: full disk, quota, file size limit, read-only file system
DISK_FULL = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS") if hasattr(errno, n))


def known_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that :func:`run_cli` reports as one ``error:`` line instead of a traceback."""
    return (ScriptError, checkpoint.CheckpointError, data.DataError, data.BadImageError,
            clustering.ClusteringError, models.StateDictError, models.ProbeError)


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line. An error raised in a DataLoader worker carries the
    worker's traceback in its text: keep its last line, without the exception's class name."""
    text = str(e).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(f"{type(e).__name__}: ", 1)[-1]
    return " ".join(text.split())


def fail(msg: str, code: int = 2, logger: logging.Logger | None = None) -> int:
    """Print ``error: msg`` on stderr (once), copy it to ``logger``'s log files (not to its
    console handler: the line is not printed twice) and return the exit code."""
    print(f"error: {msg}", file=sys.stderr)
    if logger is not None:
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, msg, None, None)
        quiet, logging.raiseExceptions = logging.raiseExceptions, False  # a full disk: the line above is enough
        try:
            for h in logger.handlers:
                if isinstance(h, logging.FileHandler):
                    h.handle(record)
        finally:
            logging.raiseExceptions = quiet
    return code


def run_cli(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser | Callable,
            argv: Sequence[str] | None = None, *, logger: logging.Logger | None = None,
            explain: Callable[[BaseException, argparse.Namespace], str] | None = None,
            on_interrupt: Callable[[argparse.Namespace], str] | None = None,
            hint: Callable[[argparse.Namespace], str] | None = None) -> int:
    """Parse ``argv`` (``parser.parse_args``, or ``parser(argv)`` when given a function) and run
    ``main(args)``. Exit codes: 0 done, 2 a known error (one ``error:`` line on stderr, no
    traceback; ``explain(e, args)`` may word it), 130 Ctrl-C (``on_interrupt(args)`` says what
    to do next), 75 (:data:`preempt.EXIT_PREEMPTED`) stopped by SIGTERM/SIGUSR1 (``hint(args)``
    says what ``--resume`` loads; it is also added to errors under torchrun).

    Under torchrun (``WORLD_SIZE`` > 1) only rank 0 prints usage errors; a failed rank prints
    one line naming itself (the first to fail only: the others stay quiet, rank 0 preferred, also
    before the process group exists: :func:`preempt.first_report`) and leaves at once
    (``os._exit``, no ``destroy_process_group``, see :mod:`preempt`); torchrun then stops the
    other ranks. A process group left open after a success is closed."""
    world = preempt.world_size()
    args = None
    signals = preempt.install()
    try:
        if world > 1 and preempt.rank() > 0:  # one usage message per job, rank 0's
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                args = _parse(parser, argv)
        else:
            args = _parse(parser, argv)
        main(args)
    except SystemExit as e:
        if world > 1 and e.code not in (0, None):  # argparse's usage error, said by rank 0 alone
            previous = preempt.leave_quietly_on_signals(2)
            if preempt.rank() > 0:  # silenced: stays until rank 0 has said it
                preempt.await_report(2 * preempt.REPORT_GRACE)
            elif preempt.first_report():  # taken, so that no rank stopped by torchrun says more
                preempt.record_for_launcher(2, "usage error")
            preempt.uninstall(previous)
        raise
    except BaseException as e:
        if world > 1:  # torchrun SIGTERMs the others once a rank has exited: no second report
            preempt.leave_quietly_on_signals(1)
        code, msg = _outcome(e, args, logger, explain, on_interrupt, hint, world)
        if world > 1:
            preempt.leave_quietly_on_signals(code)
            lost = code == 1 and preempt.is_lost_peer(e)  # a consequence: the failed rank says why
            wait = 2 * preempt.REPORT_GRACE if lost else preempt.REPORT_GRACE if preempt.rank() > 0 else 0.0
            if msg is None:  # stopped with the rank that failed: it reports, this one stays until then
                preempt.await_report(2 * preempt.REPORT_GRACE)
            elif preempt.first_report(wait):
                if code == 1 and not lost:  # a bug: its traceback, once
                    traceback.print_exc()
                line = f"rank {preempt.rank()}: {msg}"
                fail(line, code, logger)
                preempt.record_for_launcher(code, line)
            preempt.hard_exit(code)
        if code == 1:
            raise
        return fail(msg, code, logger)
    finally:
        preempt.uninstall(signals)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _parse(parser, argv):
    return parser(argv) if callable(parser) and not isinstance(parser, argparse.ArgumentParser) \
        else parser.parse_args(argv)


def _outcome(e: BaseException, args, logger, explain, on_interrupt, hint, world: int) -> tuple[int, str | None]:
    """(exit code, the line to print or None for silence) of the exception ``e``."""
    def then(msg: str, known: bool = False) -> str:
        more = hint(args) if hint is not None and args is not None and world > 1 else ""
        if known and more.startswith("no checkpoint"):  # bad input: to fix, not to run again as is
            more = ""
        return f"{msg}; {more}" if more and "--resume" not in msg else msg
    if preempt.requested() and isinstance(e, RuntimeError) and "DataLoader worker" in str(e):
        # the stop signal reached the loader workers too (torchrun signals the worker's process
        # group): a stop, not a crash
        e = preempt.Preempted(preempt.requested())
    if isinstance(e, preempt.Preempted):
        where = f": {hint(args)}" if hint is not None and args is not None else ""
        return preempt.EXIT_PREEMPTED, f"stopped by {e.signame}{e.where}{where}"
    if isinstance(e, preempt.PeerFailed):
        return 2, None  # the failed rank reports
    if isinstance(e, known_errors()) or (isinstance(e, RuntimeError) and "DataLoader worker" in str(e)):
        if logger is not None:
            logger.debug("error", exc_info=True)
        return 2, then(explain(e, args) if explain and args is not None else one_line(e), known=True)
    if isinstance(e, OSError) and e.errno in DISK_FULL:  # a full disk mid-run: a rerun meets it again (no restart)
        where = f" {e.filename!r}" if e.filename else ""
        return 2, then(f"cannot write{where}: {e.strerror or e}", known=True)
    if isinstance(e, KeyboardInterrupt):
        return 130, on_interrupt(args) if on_interrupt and args is not None else "interrupted"
    if world > 1 and preempt.is_lost_peer(e):
        return 1, f"lost contact with another process (it failed or was stopped first): {one_line(e)}"
    return 1, then(f"{type(e).__name__}: {one_line(e)}")


def setup_logging(logger: logging.Logger, exp: str | os.PathLike | None, filename: str,
                  verbose: bool = False, is_main: bool = True, defer: bool = False) -> None:
    """``logger`` to stdout and, on the main process when ``exp`` is given, to ``exp/filename``.
    Other ranks print warnings only. Handlers from an earlier call are closed first.

    ``defer``: neither ``exp`` nor the file is made yet; the lines are kept until
    :func:`open_log_file` (called once the inputs are checked), so a refused run leaves no
    folder or empty log behind and the file still holds every line of the run."""
    logger.setLevel((logging.DEBUG if verbose else logging.INFO) if is_main else logging.WARNING)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if exp is not None and is_main:
        if defer:
            handlers.append(_PendingFile(Path(exp) / filename))
        else:
            Path(exp).mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(Path(exp) / filename))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.propagate = False


class _PendingFile(logging.Handler):
    """The log file of :func:`setup_logging` (``defer``) before it exists: records held in memory."""

    def __init__(self, path: Path):
        super().__init__()
        self.path, self.records = path, []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def open_log_file(logger: logging.Logger) -> None:
    """Create the log file :func:`setup_logging` deferred (and its folder), holding the lines
    logged so far; nothing when it is open already or none was asked for."""
    for h in list(logger.handlers):
        if isinstance(h, _PendingFile):
            h.path.parent.mkdir(parents=True, exist_ok=True)
            file = logging.FileHandler(h.path)
            file.setFormatter(h.formatter)
            file.setLevel(h.level)
            for record in h.records:
                file.handle(record)
            logger.removeHandler(h)
            logger.addHandler(file)


def progress(disable: bool) -> bool | None:
    """tqdm's ``disable`` value: None shows bars on a terminal only, True hides them."""
    return True if disable else None


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> dict:
    """The options given on the command line (dest -> value), without any default: ``argv``
    parsed a second time with every default suppressed. ``parser`` is changed: pass a fresh one."""
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def check_writable(folder: str | os.PathLike, flag: str = "--exp") -> None:
    """Refuse an output folder that cannot take files (ScriptError naming ``flag``), before any
    work and creating nothing: a probe folder is made, then removed, in ``folder`` or in its
    nearest existing parent."""
    import tempfile

    p = Path(folder).absolute()
    anc = p
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    try:
        if not anc.is_dir():
            raise NotADirectoryError(20, f"{str(anc)!r} is a file")
        os.rmdir(tempfile.mkdtemp(prefix=".write_test.", dir=anc))
    except OSError as e:
        raise ScriptError(f"{flag} {str(folder)!r} is not writable: {e.strerror or e}") from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every default, "(required)" on required flags, and no "(default: ...)"
    where a flag has no default value (None, "") or where its help already states its default
    or says when it is required ("(default: EXP/export)", "required unless --read")."""

    STATED = re.compile(r"\bdefault\b|\brequired\b", re.I)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings:
            return text if self.STATED.search(text) else f"{text} (required)"
        if action.default in (None, "", argparse.SUPPRESS) or self.STATED.search(text):
            return text
        return super()._get_help_string(action)


class Config(argparse.Namespace):
    """A script's flags read once, with the values it derives from them (an absolute data
    folder, a lowered --pca...): read-only, so library code cannot rewrite them. ``replace``
    gives a new config; ``vars(cfg)`` lists every value."""

    def __init__(self, args: argparse.Namespace | None = None, **derived):
        self.__dict__.update({**(vars(args) if args is not None else {}), **derived})

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"the run's config is read-only ({name}): derive a new one with replace()")

    def replace(self, **changes) -> "Config":
        return Config(None, **{**vars(self), **changes})
