"""torchrun for this repository's scripts: torch's own launcher (``torch.distributed.run``, the
same flags, the same elastic agent), with the workers' one ``error:`` line as its only report.

Usage:
    python launch.py --standalone --nproc_per_node=2 main.py DIR --exp EXP ...   # torchrun's flags
    python -m launch --nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 main.py DIR ...

What differs from a bare ``torchrun`` (main.sh and main_deepclusterv2.sh run this):

* the elastic agent's own log lines (rendezvous info, "Sending process ... closing signal
  SIGTERM", "failed (exitcode: 2) local_rank ...") and its ChildFailedError banner and traceback
  are not printed: stderr holds what the workers print, which after an error is one line from
  the rank that reported (rank 0 for an error every rank meets; see :mod:`preempt`). Setting
  torchrun's ``LOGLEVEL`` (e.g. ``LOGLEVEL=INFO``) keeps the agent's lines, to debug a rendezvous.
* the exit code is the reporting worker's: 2 a known error (bad input), 75 stopped by SIGTERM or
  SIGUSR1 (``--resume EXP`` continues), 130 Ctrl-C, 1 a bug; torchrun exits 1 for all of them.
  The launcher itself stopped by a signal: 75 for SIGTERM (the workers were asked to stop and
  write their checkpoint), 130 for SIGINT, 128 + the signal otherwise.
* exit code 2 (bad input) is not restarted by ``--max-restarts``: a rerun meets the same error.
* a failure that no worker reported (a worker killed by the kernel, a script that is not ours)
  gets one ``error:`` line naming the first failed rank and its exit code or signal.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

import preempt

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

AGENT_LOGGERS = ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")


class _DropAgentRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(AGENT_LOGGERS)


def silence_agent() -> None:
    """Drop the elastic agent's log records at every handler they reach (torch installs its own
    stderr handlers on ``torch`` and ``torch.distributed``); nothing when ``LOGLEVEL`` is set."""
    if os.environ.get("LOGLEVEL"):
        return
    drop = _DropAgentRecords()
    for name in ("torch.distributed.elastic", "torch.distributed", "torch", ""):
        for h in logging.getLogger(name).handlers:
            h.addFilter(drop)


def _report_info(failure: ProcessFailure) -> dict:
    """The ``extraInfo`` of the report a worker left in its error file
    (:func:`preempt.record_for_launcher`); {} without one."""
    msg = failure.error_file_data.get("message") if isinstance(failure.error_file_data, dict) else None
    info = msg.get("extraInfo") if isinstance(msg, dict) else None
    return info if isinstance(info, dict) else {}


def failure_code(failure: ProcessFailure) -> int:
    """A failed worker's exit code: the one it left with its report, else its process's."""
    info = _report_info(failure)
    return int(info["exitcode"]) if "exitcode" in info else failure.exitcode


def reported(failure: ProcessFailure) -> bool:
    """Whether the worker left a report (:func:`preempt.record_for_launcher`) in its error file."""
    return "exitcode" in _report_info(failure)


def no_restart_after_bad_input() -> None:
    """``--max-restarts`` restarts the workers after any failure; after exit code 2 (bad input:
    a missing DIR, a bad flag, an unreadable image) a restart meets the same error, so the
    agent's remaining restarts are dropped then. Crashes, lost peers and preemption (exit 1,
    a signal, 75) still restart."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    # private torch API (present from torch 1.9 to 2.14): where it is missing, restarts stay as torchrun's
    monitor = getattr(LocalElasticAgent, "_monitor_workers", None)
    if monitor is None:
        return

    def _monitor_workers(self, worker_group):
        result = monitor(self, worker_group)
        if result.is_failed() and hasattr(self, "_remaining_restarts") \
                and any(failure_code(f) == 2 for f in result.failures.values()):
            self._remaining_restarts = 0
        return result

    LocalElasticAgent._monitor_workers = _monitor_workers


def signal_code(sig: int) -> int:
    """Exit code of a launch stopped by signal ``sig`` (see the module doc)."""
    if sig == signal.SIGTERM:
        return preempt.EXIT_PREEMPTED
    return 130 if sig == signal.SIGINT else 128 + sig


def exit_code(failures: dict[int, ProcessFailure]) -> int:
    """The launch's exit code after failed workers (global rank -> ProcessFailure); prints the one
    line itself when no worker reported."""
    reports = sorted((f.timestamp, rank) for rank, f in failures.items() if reported(f))
    if reports:  # the earliest report, when several ranks reported (torchrun could not be reached)
        return failure_code(failures[reports[0][1]])
    rank, first = min(failures.items(), key=lambda kv: (kv[1].timestamp, kv[0]))  # torch's root cause
    if first.exitcode < 0:
        name = signal.Signals(-first.exitcode).name if -first.exitcode in signal.valid_signals() else -first.exitcode
        print(f"error: rank {rank} was killed by signal {name} (pid {first.pid})", file=sys.stderr)
        return 128 - first.exitcode
    if first.exitcode != 2:  # 2: argparse's usage error, printed by rank 0 already
        print(f"error: rank {rank} exited with code {first.exitcode}", file=sys.stderr)
    return first.exitcode


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv`` (its own flags, then the script and its flags); the exit code."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)  # --help, bad flags: torchrun's
    silence_agent()
    no_restart_after_bad_input()
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        return exit_code(e.failures)
    except SignalException as e:
        return signal_code(int(e.sigval))
    except Exception as e:  # the rendezvous (a node unreachable, a timeout), a bad torchrun value
        print(f"error: torchrun: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
