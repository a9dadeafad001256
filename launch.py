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
* the exit code says what happened: the reporting worker's code, 2 a known error (bad input, a
  full disk), 75 stopped by SIGTERM or SIGUSR1 (``--resume EXP`` continues: requeue on 75),
  130 Ctrl-C, 1 a bug; torchrun exits 1 for all of them. A worker killed by a signal without a
  report (SIGKILL, the OOM killer, a segfault): ``error: rank 1: killed by SIGKILL (pid N)``
  and 128 + the signal (137), never 75, even though the workers torchrun then stops with
  SIGTERM would say "stopped by SIGTERM": before stopping them the launcher takes the report
  counter of the attempt (:func:`preempt.claim_report`), so they stay quiet. The launcher itself
  stopped by a signal: 75 for SIGTERM and SIGUSR1 (the workers were asked to stop and write
  their checkpoint; SIGUSR1 is passed on as torchrun passes SIGTERM), 130 for SIGINT.
* exit code 2 (bad input) is not restarted by ``--max-restarts``: a rerun meets the same error.
  A restart prints one ``launch.py: rank 1: killed by SIGKILL (pid N); restart 1 of 3 ...``
  line, no ``error:``: a run that a restart completes exits 0 with no error line.
* a failure that no worker reported (a worker killed by the kernel, a script that is not ours)
  gets one ``error:`` line naming the first failed rank and its exit code or signal.
* the workers die with the launcher (:func:`preempt.die_with_launcher`): launch.py killed by
  SIGKILL leaves no worker training (they run in their own sessions): each gets SIGTERM and
  stops like a preemption, with its checkpoint.
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


_ROOT_PIDS: set[int] = set()  # the workers of the last attempt that failed before the launcher stopped the others


def _watch_failures(agent, worker_group) -> None:
    """Before torchrun stops the other workers of a failed attempt (``close`` of the process
    context, called when a worker has failed): remember which workers had failed (the root
    cause, :func:`exit_code`) and take the attempt's report counter (:func:`preempt.claim_report`),
    so that the workers it stops with SIGTERM stay quiet instead of saying "stopped by SIGTERM"
    (a SIGKILLed rank is then reported by its signal, and a restart that succeeds prints no error)."""
    pc = getattr(agent, "_pcontext", None)
    if pc is None or getattr(pc, "_deepcluster_watched", False) or not hasattr(pc, "_failures"):
        return
    _ROOT_PIDS.clear()
    close = pc.close
    spec = worker_group.spec

    def close_after_failure(*args, **kwargs):
        failures = getattr(pc, "_failures", None) or {}
        if failures and not _ROOT_PIDS:
            _ROOT_PIDS.update(f.pid for f in failures.values())
            if getattr(spec.rdzv_handler, "use_agent_store", False) and worker_group.master_port:
                attempt = spec.max_restarts - getattr(agent, "_remaining_restarts", spec.max_restarts)
                preempt.claim_report(worker_group.master_addr, int(worker_group.master_port),
                                     spec.rdzv_handler.get_run_id(), attempt)
        return close(*args, **kwargs)

    pc.close, pc._deepcluster_watched = close_after_failure, True


def root_failures(failures: dict[int, ProcessFailure]) -> dict[int, ProcessFailure]:
    """The failures (global rank -> ProcessFailure) of the workers that failed by themselves,
    not stopped by torchrun after another one had failed; all of them when that is not known."""
    return {r: f for r, f in failures.items() if f.pid in _ROOT_PIDS} or failures


def watch_workers() -> None:
    """Patch torchrun's agent: after a failure it knows the root cause (:func:`_watch_failures`);
    ``--max-restarts`` restarts the workers after any failure, but after exit code 2 (bad input:
    a missing DIR, a bad flag, an unreadable image, a full disk) a restart meets the same error,
    so the agent's remaining restarts are dropped then (crashes, lost peers and preemption: exit
    1, a signal, 75, still restart); a restart says why on one line, which is not an ``error:``."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    # private torch API (present from torch 1.9 to 2.14): where it is missing, restarts stay as torchrun's
    monitor = getattr(LocalElasticAgent, "_monitor_workers", None)
    if monitor is None:
        return

    def _monitor_workers(self, worker_group):
        _watch_failures(self, worker_group)
        result = monitor(self, worker_group)
        if result.is_failed() and hasattr(self, "_remaining_restarts"):
            root = root_failures(result.failures)
            if any(failure_code(f) == 2 for f in root.values()):
                self._remaining_restarts = 0
            elif self._remaining_restarts > 0:
                rank, first = min(root.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
                spec = worker_group.spec
                print(f"launch.py: {describe(rank, first)}; restart {spec.max_restarts - self._remaining_restarts + 1} "
                      f"of {spec.max_restarts} continues from the newest checkpoint", file=sys.stderr)
        return result

    LocalElasticAgent._monitor_workers = _monitor_workers


def signal_code(sig: int) -> int:
    """Exit code of a launch stopped by signal ``sig`` (see the module doc)."""
    if sig in preempt.STOP_SIGNALS:
        return preempt.EXIT_PREEMPTED
    return 130 if sig == signal.SIGINT else 128 + sig


def _signame(sig: int) -> str:
    return signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"


def describe(rank: int, f: ProcessFailure) -> str:
    """What became of a worker, in words: its report, else its signal or exit code."""
    msg = f.error_file_data.get("message") if isinstance(f.error_file_data, dict) else None
    if reported(f) and isinstance(msg, dict) and msg.get("message"):
        return str(msg["message"])
    if f.exitcode < 0:
        return f"rank {rank}: killed by {_signame(-f.exitcode)} (pid {f.pid})"
    return f"rank {rank}: exited with code {f.exitcode} (pid {f.pid})"


def exit_code(failures: dict[int, ProcessFailure]) -> int:
    """The launch's exit code after failed workers (global rank -> ProcessFailure); prints the one
    line itself when no worker reported. A worker killed by a signal without a report (SIGKILL,
    the OOM killer, a segfault) is the cause, whatever the workers torchrun stopped after it
    said: 128 + the signal; 75 only for a stop signal (SIGTERM, SIGUSR1: one that came before
    the worker could act on it), 130 for SIGINT."""
    root = root_failures(failures)
    killed = [(-f.exitcode in preempt.STOP_SIGNALS, f.timestamp, r) for r, f in root.items()
              if f.exitcode < 0 and not reported(f)]
    if killed:
        rank = min(killed)[2]
        sig = -root[rank].exitcode
        if sig in preempt.STOP_SIGNALS or sig == signal.SIGINT:  # before its handlers: nothing to say but the code
            return signal_code(sig)
        print(f"error: {describe(rank, root[rank])}", file=sys.stderr)
        return 128 + sig
    reports = sorted((f.timestamp, rank) for rank, f in failures.items() if reported(f))
    if reports:  # the earliest report, when several ranks reported (torchrun could not be reached)
        return failure_code(failures[reports[0][1]])
    rank, first = min(root.items(), key=lambda kv: (kv[1].timestamp, kv[0]))  # torch's root cause
    if first.exitcode != 2:  # 2: argparse's usage error, printed by rank 0 already
        print(f"error: {describe(rank, first)}", file=sys.stderr)
    return first.exitcode


def _stop_on_signal(signum, frame) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    # torchrun's own handling of SIGTERM: the agent passes the signal to every worker, waits 30 s
    raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv`` (its own flags, then the script and its flags); the exit code."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)  # --help, bad flags: torchrun's
    silence_agent()
    watch_workers()
    os.environ[preempt.LAUNCHER_ENV] = str(os.getpid())  # the workers stop when this process dies
    if hasattr(signal, "SIGUSR1"):  # SLURM's warning: the workers stop as for SIGTERM (its default would kill this)
        signal.signal(signal.SIGUSR1, _stop_on_signal)
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
