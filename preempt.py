"""Stopping a run cleanly on many machines: preemption signals, Ctrl-C deferred across
checkpoint writes, the per-step agreement of all ranks, and one report per failed job.

* **Signals.** SIGTERM or SIGUSR1 (SLURM's warning before a kill, torchrun's shutdown) asks the
  run to stop. Inside training the request waits for the next step, where every rank stops
  together and a mid-epoch checkpoint is written; elsewhere (feature pass, clustering) it raises
  :class:`Preempted` at once: the last checkpoint is where the next launch resumes. The process
  then exits with :data:`EXIT_PREEMPTED`. SIGINT and these signals wait for the end of a
  checkpoint write (:func:`deferred_signals`): a write is never torn by Ctrl-C. A second stop
  signal (torchrun and SLURM both send one) is ignored while the first is acted on.
* **The other processes.** The DataLoader workers leave stop signals and Ctrl-C to their main
  process (:func:`loader_worker_init`): torchrun and SLURM signal them too, and a dead worker
  would end the step outside the agreement below. A torchrun worker stops like a preemption
  when its launcher dies (:func:`die_with_launcher`).
* **One decision per step** (:class:`StepControl`). Before each training step the ranks
  all-reduce a few integers on the host (a gloo group; under NCCL a side group, so the GPU
  stream is not synchronised): which ranks failed to load their batch (an unreadable image, a
  dead loader worker), whether a stop was requested, whether rank 0's clock says a checkpoint
  is due (``--checkpoint_minutes``). Every rank gets the same answer, so no collective is ever
  called by a subset of them: they write ``checkpoint_stopped`` together, then stop.
* **Any other error on one rank** (full disk on rank 0, a clustering error, a bug): that rank
  prints one line naming itself and leaves at once with ``os._exit`` (no
  ``destroy_process_group``, which waits for the others under NCCL). torchrun sees the dead
  worker within its monitor interval (0.1 s) and stops the others (SIGTERM, then SIGKILL 30 s
  later); under gloo their next collective already fails. The first rank to report takes a
  counter in torchrun's store (:func:`first_report`), the same before and after the process
  group exists: the others stay quiet, and ranks > 0 give rank 0 a few seconds' start, so an
  error every rank meets (a missing DIR, a bad flag) is said once, by rank 0. The reporting rank
  leaves its exit code for the launcher (:func:`record_for_launcher`, read by :mod:`launch`).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import torch

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped on request, --resume EXP continues
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)


class Preempted(BaseException):
    """A stop signal (SIGTERM, SIGUSR1) ended the run; a BaseException, as KeyboardInterrupt,
    so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signame: str, where: str = ""):
        super().__init__(f"{signame}{where}")
        self.signame, self.where = signame, where


class PeerFailed(Exception):
    """Another rank failed; this one stopped with it (after the shared checkpoint). Not reported."""


class StopTraining(Exception):
    """Every rank stops before step ``step`` of the epoch; ``cause`` is what each re-raises."""

    def __init__(self, step: int, cause: BaseException):
        super().__init__(str(cause))
        self.step, self.cause = step, cause


class _State:
    requested: str | None = None  # name of the stop signal received, if any
    training = False              # inside the training loop: requests wait for the next step
    defer = 0                     # inside a checkpoint write
    orphaned: int | None = None   # pid of the torchrun launcher that died (die_with_launcher)


_state = _State()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _on_stop_signal(signum, frame) -> None:
    if _state.requested is not None:  # a stop under way (torchrun and SLURM both signal): it goes on
        return
    name = signal.Signals(signum).name
    _state.requested = f"{name} (its launcher, pid {_state.orphaned}, died)" if _state.orphaned else name
    if not _state.training and _state.defer == 0:
        raise Preempted(_state.requested)


def install() -> dict:
    """Route SIGTERM and SIGUSR1 to a clean stop (main thread only; else nothing). Returns the
    previous handlers, for :func:`uninstall`."""
    if not _main_thread():
        return {}
    _state.requested, _state.training, _state.defer = None, False, 0
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in STOP_SIGNALS}
    die_with_launcher()
    return previous


def uninstall(previous: dict) -> None:
    """Put back the handlers :func:`install` replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def requested() -> str | None:
    """The stop signal received (its name), or None."""
    return _state.requested


def raise_if_requested(where: str = "") -> None:
    """Raise :class:`Preempted` when a stop was asked for while it could not act (end of an epoch)."""
    if _state.requested:
        raise Preempted(_state.requested, where)


@contextlib.contextmanager
def training_phase():
    """While inside: a stop signal is only recorded, and acted on at the next step."""
    _state.training = True
    try:
        yield
    finally:
        _state.training = False


@contextlib.contextmanager
def deferred_signals():
    """Ctrl-C and stop signals take effect after the block (a checkpoint write), not inside it:
    a KeyboardInterrupt inside ``torch.save`` tears its zip writer (``enforce fail at
    inline_container.cc``). Nothing changes outside the main thread."""
    if not _main_thread():
        yield
        return
    pending: list[int] = []
    before = _state.requested  # a request already pending is acted on by its owner (the training loop)
    prev = signal.getsignal(signal.SIGINT)
    if prev is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, lambda s, f: pending.append(s))
    _state.defer += 1
    try:
        yield
    finally:
        _state.defer -= 1
        if prev is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, prev)
    if pending:
        raise KeyboardInterrupt
    if _state.requested and before is None and not _state.training and _state.defer == 0:
        raise Preempted(_state.requested)


# ---------------------------------------------------------------------------------------
# the other processes of a run: DataLoader workers, torchrun workers
# ---------------------------------------------------------------------------------------
def loader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader: a stop signal or Ctrl-C is for the main process.

    torchrun stops a worker with ``killpg`` and SLURM signals every process of the job step, so
    the loader workers receive the SIGTERM too; PyTorch's own handler in them exits, the main
    process's SIGCHLD handler then raises "DataLoader worker ... exited unexpectedly" wherever
    it is, outside the per-step agreement, and no stop checkpoint is written. Here SIGUSR1 and
    SIGINT are ignored, and SIGTERM ends the worker only when its main process sends it (the
    loader's shutdown and multiprocessing's exit terminate their workers so; PyTorch's handler
    makes the same distinction): the main process stops at the next step as asked. A worker
    still ends with its main process: PyTorch's watchdog in each worker sees its parent gone
    within 5 s (``MP_STATUS_CHECK_INTERVAL``)."""
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # not on macOS: there SIGTERM keeps PyTorch's handling
        # blocked in this thread and every thread started after it; the waiter below takes it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_sigterm_from_parent_only, args=(os.getppid(),), daemon=True,
                         name="loader-sigterm").start()


def _sigterm_from_parent_only(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


LAUNCHER_ENV = "DEEPCLUSTER_LAUNCHER_PID"  # set by launch.py for its workers: the process they must outlive
ORPHAN_GRACE = 30.0  # seconds an orphaned worker has to stop by itself (torchrun's own SIGTERM -> SIGKILL wait)
_PARENT_AT_START = os.getppid()
_launcher: int | None = None
_watching = False


def _launcher_pid() -> int:
    """The pid of this torchrun worker's launcher: launch.py's (it says so in the environment of
    its workers, who take it out of theirs: their own children have another parent), else the
    parent seen when this module was first imported."""
    global _launcher
    if _launcher is None:
        try:
            _launcher = int(os.environ.pop(LAUNCHER_ENV))
        except (KeyError, ValueError):
            _launcher = _PARENT_AT_START
    return _launcher


def under_torchrun() -> bool:
    """Whether this process is a worker of torchrun's elastic agent (launch.py included)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def launcher_gone() -> bool:
    """A torchrun worker whose launcher died (it was re-parented)."""
    return _state.orphaned is not None or (under_torchrun() and os.getppid() != _launcher_pid())


def die_with_launcher() -> None:
    """A torchrun worker stops when its launcher dies (SIGKILL, the OOM killer): the workers run
    in their own sessions, so nothing else would stop them, and a resume started by hand would
    train beside them. A watcher thread sees the launcher gone (its parent changed, within
    0.5 s) and sends the worker SIGTERM, as torchrun or SLURM would: it stops like a
    preemption (at the next step, with ``checkpoint_stopped``, exit 75), so what it trained
    since the last checkpoint is kept; one that has not stopped :data:`ORPHAN_GRACE` seconds
    later (a collective waiting for a rank that is gone) is ended, as torchrun would end it.
    Not ``prctl(PR_SET_PDEATHSIG)``: the kernel sends that signal when the parent *thread*
    exits, and a SIGKILLed launcher's threads die one by one (here the signal came while the
    launcher was still the parent), so a launcher that lives on could stop its workers.
    Nothing outside torchrun; once per process."""
    global _watching
    if _watching or not under_torchrun():
        return
    _watching = True
    threading.Thread(target=_watch_launcher, args=(_launcher_pid(),), name="die-with-launcher",
                     daemon=True).start()


def _watch_launcher(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(0.5)
    _state.orphaned = launcher
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(ORPHAN_GRACE)
    os.write(2, f"error: rank {rank()}: its launcher died and it did not stop within {ORPHAN_GRACE:.0f} s: "
                f"killed\n".encode())
    os._exit(128 + signal.SIGKILL)


# ---------------------------------------------------------------------------------------
# the per-step agreement
# ---------------------------------------------------------------------------------------
class StepControl:
    """What every rank does before a training step, decided together (see the module doc).

    ``checkpoint_minutes`` > 0: :attr:`due` turns true on every rank at the first step after
    that many minutes of rank 0's clock since the last :meth:`saved`.
    """

    def __init__(self, rt, checkpoint_minutes: float = 0.0):
        self.rt = rt
        self.period = 60.0 * checkpoint_minutes
        self.last_save = time.monotonic()
        self.due = False
        self._group = None

    def _reduce(self, flags: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self._group is None:  # host-side group: the decision never waits for the GPU stream
            gloo = dist.get_backend() == "gloo"
            self._group = dist.group.WORLD if gloo else dist.new_group(backend="gloo")
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        return flags

    def check(self, step: int, failure: BaseException | None = None) -> None:
        """Agree on step ``step``: raise :class:`StopTraining` on every rank when a rank failed
        (``failure``: its exception) or a stop signal arrived on any rank; set :attr:`due`."""
        w = self.rt.world_size
        clock = self.rt.is_main and self.period > 0 and time.monotonic() - self.last_save >= self.period
        # (W + 2,): failed flag per rank, stop requested, checkpoint due by rank 0's clock; plain
        # ints in one process, a host tensor (gloo: never a device sync) reduced over the ranks
        flags = [0] * (w + 2)
        flags[self.rt.rank] = int(failure is not None)
        flags[w] = int(_state.requested is not None)
        flags[w + 1] = int(bool(clock))
        if self.rt.distributed:
            flags = self._reduce(torch.tensor(flags, dtype=torch.int64)).tolist()
        failed = [r for r in range(w) if flags[r]]
        self.due = bool(flags[w + 1])
        if failure is not None:
            raise StopTraining(step, failure)
        if failed:
            raise StopTraining(step, PeerFailed(f"rank {failed[0]} failed"))
        if flags[w]:
            raise StopTraining(step, Preempted(_state.requested or "a stop signal on another rank",
                                               f" at step {step}"))

    def saved(self) -> None:
        """A checkpoint was written: the clock of ``--checkpoint_minutes`` restarts."""
        self.last_save = time.monotonic()
        self.due = False


# ---------------------------------------------------------------------------------------
# leaving a multi-process run after an error
# ---------------------------------------------------------------------------------------
def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


REPORT_GRACE = 3.0  # seconds a rank > 0 waits before claiming the report: rank 0 says a shared error


def _report_store():
    """The store holding the report counter: torchrun's own (the elastic agent's TCPStore at
    MASTER_ADDR:MASTER_PORT, served from launch to exit: ``TORCHELASTIC_USE_AGENT_STORE``), so
    an error before the process group exists is counted as one after it; else the process
    group's store; None when neither exists."""
    import datetime

    import torch.distributed as dist

    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=10))
    if dist.is_available() and dist.is_initialized():
        return dist.distributed_c10d._get_default_store()
    return None


def first_report(wait: float = 0.0) -> bool:
    """True for the first rank of this launch (of this torchrun attempt) to report a failure,
    after ``wait`` seconds (ranks > 0 wait :data:`REPORT_GRACE` so that rank 0 reports an error
    every rank meets). One counter in torchrun's store, before and after the process group
    exists; True as well when no store can be reached (better twice than never)."""
    if world_size() <= 1:
        return True
    if launcher_gone():  # its store went with it: local rank 0 speaks for the ranks of this node
        return int(os.environ.get("LOCAL_RANK", "0")) == 0
    if wait > 0:
        time.sleep(wait)
    try:
        store = _report_store()
        return True if store is None else store.add(_report_key(), 1) == 1
    except Exception:
        return True


def await_report(timeout: float) -> None:
    """Wait (at most ``timeout`` seconds) until a rank has reported: a rank that stops silently
    because another failed (:class:`PeerFailed`) must not exit first, or torchrun would stop the
    failed rank before its report."""
    if launcher_gone():
        return
    deadline = time.monotonic() + timeout
    try:
        store = _report_store()
        while store is not None and time.monotonic() < deadline:
            if store.add(_report_key(), 0) > 0:
                return
            time.sleep(0.1)
    except Exception:
        pass
    time.sleep(max(0.0, deadline - time.monotonic()))


def _report_key(run_id: str | None = None, attempt: int | None = None) -> str:
    """The counter of this launch's reports: one per torchrun run and attempt (restart)."""
    return "deepcluster/reports/{}/{}".format(
        os.environ.get("TORCHELASTIC_RUN_ID", "") if run_id is None else run_id,
        os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if attempt is None else attempt)


def claim_report(addr: str, port: int, run_id: str, attempt: int) -> None:
    """Take the report counter of a torchrun attempt (for the launcher, before it stops the
    other workers of a failed one): the workers it stops stay quiet, the launcher says what
    failed. The store is torchrun's own (:func:`_report_store`); nothing when it is unreachable."""
    import datetime

    import torch.distributed as dist

    with contextlib.suppress(Exception):
        dist.TCPStore(addr, port, is_master=False, timeout=datetime.timedelta(seconds=5)).add(
            _report_key(run_id, attempt), 1)


def leave_quietly_on_signals(code: int) -> dict:
    """From now on a stop signal or Ctrl-C ends the process at once with ``code``, silently:
    torchrun SIGTERMs the other workers as soon as one has exited, and a rank on its way out
    after an error must not report "stopped by SIGTERM" instead. Returns the previous handlers
    (for :func:`uninstall`)."""
    if not _main_thread():
        return {}
    return {sig: signal.signal(sig, lambda s, f: os._exit(code)) for sig in (*STOP_SIGNALS, signal.SIGINT)}


def record_for_launcher(code: int, message: str) -> None:
    """Leave ``message`` where torchrun's agent reads a worker's failure (the
    ``TORCHELASTIC_ERROR_FILE`` of this worker): the launcher (:mod:`launch`) then knows which
    rank reported and exits with that rank's ``code``. Nothing outside torchrun."""
    import json

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    with contextlib.suppress(OSError):
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {
                "py_callstack": "", "timestamp": str(int(time.time())), "exitcode": code}}}, f)


def hard_exit(code: int) -> None:
    """Leave now: flush the output and exit without Python's teardown (no
    ``destroy_process_group``, which waits for the other ranks under NCCL)."""
    import logging

    for h in logging.getLogger("deepcluster").handlers:
        with contextlib.suppress(Exception):
            h.flush()
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    os._exit(code)


def is_lost_peer(e: BaseException) -> bool:
    """An error of a collective whose peer is gone (it died or was stopped first)."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Gloo", "gloo", "NCCL", "Broken pipe"))
