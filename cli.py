"""Script plumbing shared by every CLI (main.py, the eval_*.py scripts, visu/): one ``error:``
line and exit 2 for known errors, logging set-up, progress-bar switch."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import checkpoint
import clustering
import data
import models
from errors import ScriptError

log = logging.getLogger("deepcluster")


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
        for h in logger.handlers:
            if isinstance(h, logging.FileHandler):
                h.handle(record)
    return code


def run_cli(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser | Callable,
            argv: Sequence[str] | None = None, *, logger: logging.Logger | None = None,
            explain: Callable[[BaseException, argparse.Namespace], str] | None = None,
            on_interrupt: Callable[[argparse.Namespace], str] | None = None) -> int:
    """Parse ``argv`` (``parser.parse_args``, or ``parser(argv)`` when given a function) and run
    ``main(args)``. Exit codes: 0 done, 2 a known error (one ``error:`` line on stderr, no
    traceback; ``explain(e, args)`` may word it), 130 Ctrl-C (``on_interrupt(args)`` says what
    to do next). A process group left open is closed in every case."""
    args = parser(argv) if callable(parser) and not isinstance(parser, argparse.ArgumentParser) \
        else parser.parse_args(argv)
    try:
        main(args)
    except known_errors() as e:
        if logger is not None:
            logger.debug("error", exc_info=True)
        return fail(explain(e, args) if explain else one_line(e), 2, logger)
    except KeyboardInterrupt:
        return fail(on_interrupt(args) if on_interrupt else "interrupted", 130, logger)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def setup_logging(logger: logging.Logger, exp: str | os.PathLike | None, filename: str,
                  verbose: bool = False, is_main: bool = True) -> None:
    """``logger`` to stdout and, on the main process when ``exp`` is given, to ``exp/filename``.
    Other ranks print warnings only. Handlers from an earlier call are closed first."""
    logger.setLevel((logging.DEBUG if verbose else logging.INFO) if is_main else logging.WARNING)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if exp is not None and is_main:
        Path(exp).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(exp) / filename))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.propagate = False




def progress(disable: bool) -> bool | None:
    """tqdm's ``disable`` value: None shows bars on a terminal only, True hides them."""
    return True if disable else None
