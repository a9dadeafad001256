"""The run engine: what every training run needs, once, for every method.

* :class:`Run`: the run folder (:mod:`runfolder`: lock, refuse / ``--overwrite`` / ``--resume``,
  the invocation record), the log file, the records (``log.jsonl``, TensorBoard, the report)
  and the checkpoint policy (:class:`Checkpoints`).
* :func:`run_steps` and :meth:`Run.train`: the step loop's stop protocol. Before each step the
  ranks agree (:class:`preempt.StepControl`): a batch that failed to load on any rank, or a stop
  signal (SIGTERM, SIGUSR1) on any rank, stops every rank at that step, which then writes
  ``checkpoints/checkpoint_stopped.pth.tar`` and leaves with exit code 75 (or the error). The
  training loss is summed on the device and read every :data:`SYNC_EVERY` steps and before
  every checkpoint: a NaN/inf loss stops the run before any checkpoint of its weights.

A method (:mod:`deepcluster`, :mod:`deepclusterv2`) gives the engine a step function and a
``state(step)`` function building its checkpoint (a collective under torchrun); the engine
decides when and where checkpoints are written.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm

import checkpoint
import cli
import data
import distributed
import preempt
import runfolder
import tb
import util
from distributed import DeviceLossMeter

log = logging.getLogger("deepcluster")

SYNC_EVERY = 50  # steps between two host reads of the training loss (distributed.DeviceLossMeter)
SHOW_EVERY_S = 1.0  # seconds between two reads of the loss shown on a progress bar (one sync each)


class LoaderError(data.DataError):
    """The training loader failed other than on an unreadable image (e.g. a killed worker)."""


# ---------------------------------------------------------------------------------------
# the flags every training script has
# ---------------------------------------------------------------------------------------
def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file_list", metavar="FILE", default=None,
                   help="the images listed in FILE, one path per line (optionally PATH<TAB>LABEL), relative to DIR "
                        "when given, else to FILE's folder: the folder is never walked (for datasets too big to list)")
    p.add_argument("--check_images", choices=["auto", "full", "header", "off"], default="auto",
                   help="check every image before training (auto: full decode up to 20,000 images, else header)")
    p.add_argument("--bad_images", choices=["error", "skip"], default="error",
                   help="unreadable images: stop naming them (mid-run after a resumable checkpoint), or go on "
                        "without them (listed in EXP/bad_images.txt)")


def add_run_args(p: argparse.ArgumentParser, exp: str, workers: int | None = None, seed: int = 31,
                 exp_aliases: tuple[str, ...] = ()):
    """The run group: folder, resume, checkpoint policy, records, device (``workers`` None: from
    the cores, :func:`data.default_workers`). Returns the group."""
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, default=data.default_workers() if workers is None else workers,
                   help="data loading workers per process" + (
                       " (default: the cores this process may use, os.sched_getaffinity, divided by the torchrun "
                       "processes of the node, LOCAL_WORLD_SIZE, less one, at least 1: here %(default)s)"
                       if workers is None else ""))
    g.add_argument("--exp", *exp_aliases, dest="exp", type=str, default=exp,
                   help="path to exp folder" + "".join(f" ({a})" for a in exp_aliases))
    g.add_argument("--resume", default="", type=str, metavar="PATH",
                   help="checkpoint, or an experiment folder (its newest valid checkpoint, mid-epoch copies too); "
                        "a run's folder: --exp and every flag not given default to that run's")
    g.add_argument("--overwrite", action="store_true",
                   help="start anew in an --exp that holds a run: deletes every output of that run first")
    g.add_argument("--keep_checkpoints", type=int, default=3,
                   help="periodic copies (EXP/checkpoints/checkpoint_N.pth.tar) kept: the newest N (0: all, as "
                        "the original)")
    g.add_argument("--keep_epoch_checkpoints", action="store_true",
                   help="also keep every epoch's end checkpoint as EXP/checkpoints/epoch_N.pth.tar (N epochs done)")
    g.add_argument("--checkpoint_minutes", type=float, default=0,
                   help="also a checkpoint (checkpoints/checkpoint_latest.pth.tar) at the first step after this many "
                        "minutes since the last one, by rank 0's clock: bounds the work a hard kill loses (0: off)")
    g.add_argument("--seed", type=int, default=seed, help="random seed")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to run")
    g.add_argument("--dist_timeout", type=float, default=60,
                   help="minutes a torchrun process waits in a collective (e.g. while rank 0 clusters)")
    g.add_argument("--report", action="store_true", help="draw the training report (PNG) at the end")
    g.add_argument("--tensorboard", action="store_true",
                   help="TensorBoard events in EXP/tensorboard: log.jsonl's numbers, lr, cluster sizes, top clusters")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g.add_argument("--verbose", action="store_true", help="chatty")
    return g


def run_arg_rules(args: argparse.Namespace) -> list[tuple[str, bool, object, str]]:
    """(flag, ok, value, why) checks of :func:`add_run_args`' flags."""
    return [
        ("--workers", args.workers >= 0, args.workers, "must be >= 0"),
        ("--dist_timeout", args.dist_timeout > 0, args.dist_timeout, "must be > 0 (minutes)"),
        ("--keep_checkpoints", args.keep_checkpoints >= 0, args.keep_checkpoints, "must be >= 0 (0: keep all)"),
        ("--seed", 0 <= args.seed < 2**32, args.seed, "must be in [0, 2**32)"),
        ("--checkpoint_minutes", args.checkpoint_minutes >= 0 and math.isfinite(args.checkpoint_minutes),
         args.checkpoint_minutes, "must be >= 0 (minutes; 0: off)"),
    ]


# ---------------------------------------------------------------------------------------
# checkpoint policy
# ---------------------------------------------------------------------------------------
class Checkpoints:
    """Where and when a run's checkpoints go.

    ``EXP/checkpoint.pth.tar`` after every epoch (with ``keep_epochs``, also a hard-linked copy
    ``checkpoints/epoch_N.pth.tar``); inside an epoch ``checkpoints/checkpoint_<n>.pth.tar`` every
    ``every`` global steps (0: never; the newest ``keep`` kept, 0: all), and
    ``checkpoints/checkpoint_latest.pth.tar`` before the first step after a clustering and at
    the first step after ``minutes`` of rank 0's clock since the last save.
    """

    def __init__(self, exp: Path, run_id: str, rt, every: int = 0, keep: int = 3, keep_epochs: bool = False,
                 minutes: float = 0.0):
        self.exp, self.run_id, self.rt = Path(exp), run_id, rt
        self.every, self.keep, self.keep_epochs = every, keep, keep_epochs
        self.control = preempt.StepControl(rt, minutes)  # the ranks' per-step agreement

    @property
    def folder(self) -> Path:
        return self.exp / "checkpoints"

    def due(self, global_step: int, i: int, clustered: bool) -> str | None:
        """The name of the checkpoint due before step ``i`` of the epoch (the same on every rank)."""
        if self.every and global_step % self.every == 0:
            return f"checkpoint_{global_step // self.every}"
        return "checkpoint_latest" if self.control.due or (clustered and i == 0) else None

    def save(self, name: str, state: dict | None) -> Path:
        """Write ``state`` (rank 0's; None elsewhere) as ``checkpoints/<name>.pth.tar``; prune."""
        path = self.folder / f"{name}.pth.tar"
        self._write(path, state)
        if name not in ("checkpoint_latest", "checkpoint_stopped"):
            checkpoint.prune_periodic(self.folder, self.keep, self.run_id, self.rt, protect=path)
        return path

    def save_epoch(self, state: dict | None, epochs_done: int) -> None:
        """``EXP/checkpoint.pth.tar`` (and its epoch copy) at the end of an epoch."""
        self._write(self.exp / "checkpoint.pth.tar", state)
        if self.keep_epochs:
            checkpoint.keep_epoch_copy(self.exp, epochs_done, self.rt)

    def _write(self, path: Path, state: dict | None) -> None:
        if self.rt.is_main:
            checkpoint.save_checkpoint({**state, "run_id": self.run_id}, path, self.rt)
        self.control.saved()


# ---------------------------------------------------------------------------------------
# the step loop
# ---------------------------------------------------------------------------------------
def run_steps(batches: Iterable, step: Callable[[int, object], tuple[torch.Tensor, int]], *, start: int,
              total: int, meter: DeviceLossMeter, control: preempt.StepControl,
              before_step: Callable[[int], None] | None = None, desc: str = "train",
              no_progress: bool = False) -> None:
    """Steps ``start``.. of an epoch: ``step(i, batch)`` returns (loss (), images); the loss is
    added to ``meter`` on the device. Before step i the ranks agree (``control``): a failed
    batch on any rank or a stop signal raises :class:`preempt.StopTraining` on every rank;
    then ``before_step(i)`` (checkpoints). The meter is read every :data:`SYNC_EVERY` steps
    (raising :class:`distributed.DivergedError` on a NaN/inf loss). With DEEPCLUSTER_SYNC_DEBUG
    set on CUDA, every host sync from the third step on raises or warns except the documented
    ones: the checkpoints, the loss reads, a shown bar (:class:`distributed.SyncAudit`); the step
    function marks its own (GradScaler under ``--amp``) with :func:`allowed_sync`."""
    bar = tqdm(batches, desc=desc, leave=False, disable=cli.progress(no_progress), initial=start, total=total)
    bar.set_postfix(loss="-")
    it, shown = iter(bar), time.monotonic()
    audit = distributed.SyncAudit(meter.sum.device)
    _AUDIT.append(audit)
    try:
        for i in itertools.count(start):
            try:
                batch, failure = next(it), None
            except StopIteration:
                break
            except Exception as e:  # an unreadable image, a dead loader worker: stop where a resume can go on
                batch = None
                failure = e if isinstance(e, data.BadImageError) else LoaderError(
                    f"loading the batch of {desc}, step {i} failed: {cli.one_line(e)}")
            control.check(i, failure)  # every rank together, before anything else of step i
            audit.step()
            meter.step = i
            with audit.allowed():  # the documented syncs: checkpoints, the loss read every SYNC_EVERY steps
                if before_step is not None:
                    before_step(i)
                if i - meter.first >= SYNC_EVERY:
                    meter.read()
            loss, n = step(i, batch)
            meter.add(loss, n)
            meter.step = i + 1
            if not bar.disable and time.monotonic() - shown >= SHOW_EVERY_S:  # a shown bar: one read a second
                with audit.allowed():
                    bar.set_postfix(loss=f"{meter.peek():.3f}", refresh=False)
                shown = time.monotonic()
    except preempt.StopTraining:  # the steps done so far count in the meter (a collective: all ranks are here)
        audit.close()
        meter.read()
        raise
    finally:
        audit.close()
        _AUDIT.remove(audit)
        bar.close()
    meter.read()


_AUDIT: list = []  # the audit of the step loop running (at most one)


def allowed_sync():
    """A documented host sync inside a step function (GradScaler's inf check under --amp): the
    running step loop's audit is off inside it."""
    return _AUDIT[-1].allowed() if _AUDIT else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------
class Run:
    """One run in its folder: claim, records, checkpoints and the stop protocol.

    ``flags``: the script's flags as given (recorded in args.json / args_history.jsonl);
    ``outputs``: what this script writes beyond :data:`runfolder.OUTPUTS`; ``setup_log`` False:
    the script set up the ``deepcluster`` logger itself (deferred, kept lines logged before the claim).
    """

    def __init__(self, exp: str | os.PathLike, rt, method: str, flags: dict, *, resume: str = "",
                 overwrite: bool = False, outputs: tuple[str, ...] = (), verbose: bool = False,
                 tensorboard: bool = False, no_progress: bool = False, setup_log: bool = True):
        self.setup_log = setup_log
        self.exp, self.rt, self.method, self.flags = Path(exp), rt, method, flags
        self.resume, self.overwrite, self.outputs = resume, overwrite, outputs
        self.verbose, self.tensorboard = verbose, tensorboard
        self.no_progress = no_progress or not rt.is_main  # one set of progress bars, rank 0's
        self.lock = runfolder.FolderLock(self.exp)
        self.run_id = ""
        self.history: util.Logger | None = None
        self.board = tb.Board(None)
        self.ckpt: Checkpoints | None = None

    # -- the folder ------------------------------------------------------------------
    def claim(self) -> str | None:
        """Lock and check the folder before anything is written there (rank 0 decides, every
        rank gets its answer). Returns the checkpoint to resume from (None: a fresh start, or
        a resumed folder with no checkpoint yet, see :attr:`resuming`)."""
        if self.setup_log:
            cli.setup_logging(log, self.exp, "train.log", self.verbose, self.rt.is_main, defer=True)
        outcome = on_main(self._claim_main, self.rt)
        if isinstance(outcome, BaseException):
            raise outcome
        self.resuming, found, self.run_id = outcome
        runfolder.check_writable(self.exp)
        cli.open_log_file(log)
        if self.rt.is_main:
            self.history = util.Logger(self.exp / "log.jsonl")
            self.board = tb.Board(self.exp / "tensorboard" if self.tensorboard else None)  # no package: stops here
        return found

    def _claim_main(self):
        try:
            self.lock.acquire()
            resume = self.resume
            if not resume and runfolder.restarted_own_run(self.exp):  # torchrun --max-restarts: go on
                log.warning("restart %s of this torchrun launch: continuing its run in %s",
                            os.environ.get("TORCHELASTIC_RESTART_COUNT"), self.exp)
                resume = str(self.exp)
            runfolder.drop_partial_writes(self.exp)
            if resume:
                folder = runfolder.folder_of(resume)
                if folder is not None:
                    runfolder.check_method(folder, runfolder.recorded_run(resume)[2], self.method)
                found = checkpoint.find_checkpoint(resume, runfolder.current_run_id(folder) if folder else None)
                run_id = (checkpoint.torch_load(found, mmap=True).get("run_id") if found else None) \
                    or runfolder.current_run_id(self.exp) or runfolder.new_run_id()
                return True, found, run_id
            used = runfolder.used_by(self.exp, self.outputs)
            if used and not self.overwrite:
                raise runfolder.RunFolderError(
                    f"{self.exp} already holds a run ({used[0]}): continue it with --resume {self.exp}, use a new "
                    f"--exp, or start over with --overwrite (deletes every output of that run)")
            if used:
                log.warning("--overwrite: deleting every output of the run in %s", self.exp)
                runfolder.retire(self.exp, self.outputs)
            return False, None, runfolder.new_run_id()
        except BaseException as e:
            self.lock.release()
            return e

    def begin(self, start_epoch: int, iteration: int = 0, resumed_from: str | None = None,
              keep_random_network: bool = True) -> None:
        """Record this invocation and drop the log records of the epochs to redo (a fresh run:
        all of them; ``keep_random_network`` False also drops epoch -1's)."""
        if not self.rt.is_main:
            return
        if not self.resuming:
            self.history.truncate(0)
            runfolder.write_args(self.exp, self.flags, self.method)
        elif not (self.exp / "args.json").exists():
            runfolder.write_args(self.exp, self.flags, self.method)
        else:
            self.history.truncate(sum(1 for r in self.history.data if r.get("epoch", 0) < start_epoch
                                      and (keep_random_network or r.get("epoch", 0) >= 0)))
        runfolder.record_invocation(self.exp, self.flags, self.run_id, self.method, start_epoch, iteration,
                                    resumed_from)

    def checkpoints(self, every: int = 0, keep: int = 3, keep_epochs: bool = False,
                    minutes: float = 0.0) -> Checkpoints:
        self.ckpt = Checkpoints(self.exp, self.run_id, self.rt, every, keep, keep_epochs, minutes)
        return self.ckpt

    # -- training --------------------------------------------------------------------
    def train(self, batches: Iterable, step, *, epoch: int, start: int, iters: int, meter: DeviceLossMeter,
              state: Callable[[int], dict | None], clustered: bool = False) -> None:
        """One pass over ``batches`` (:func:`run_steps`) with the checkpoint policy and the stop
        protocol: ``state(i)`` builds the checkpoint of the epoch at step i (every rank calls
        it; rank 0's is written)."""
        ck = self.ckpt

        def before_step(i: int) -> None:
            name = ck.due(iters * epoch + i, i, clustered)
            if name is not None:
                ck.save(name, state(i))

        try:
            with preempt.training_phase():
                run_steps(batches, step, start=start, total=iters, meter=meter, control=ck.control,
                          before_step=before_step, desc=f"train {epoch}", no_progress=self.no_progress)
        except preempt.StopTraining as stop:  # on every rank at once: a failure on one, or a stop signal
            ck.save("checkpoint_stopped", state(stop.step))
            raise stop.cause from None

    # -- records ---------------------------------------------------------------------
    def record(self, record: dict, step: int) -> None:
        """One line of ``log.jsonl`` and its TensorBoard scalars (rank 0)."""
        if self.rt.is_main:
            self.history.log(record)
            self.board.record(record, step)

    def finish(self, report: bool = False) -> None:
        self.board.close()
        distributed.barrier(self.rt)
        if report and self.rt.is_main:
            from visu import training_report  # matplotlib only when asked for
            training_report.draw(self.exp)
        self.close()

    def close(self) -> None:
        self.lock.release()


def on_main(fn: Callable[[], object], rt):
    """``fn()`` on rank 0, its result (an exception too: returned, not raised) on every rank."""
    out = [fn() if rt.is_main else None]
    if rt.distributed:
        torch.distributed.broadcast_object_list(out, src=0)
    return out[0]


# ---------------------------------------------------------------------------------------
# what to tell the user
# ---------------------------------------------------------------------------------------
def resume_hint(exp: str) -> str:
    """What ``--resume EXP`` would load now, said plainly."""
    try:
        found = checkpoint.find_checkpoint(exp, runfolder.current_run_id(Path(exp)), quiet=True) \
            if Path(exp).is_dir() else None
    except checkpoint.CheckpointError:
        found = None
    if found is None:
        return "no checkpoint yet: nothing to resume, run the same command again"
    return f"--resume {exp} continues from {found}"


def interrupted_hint(exp: str) -> str:
    """What ``--resume EXP`` would load after an interruption, said plainly."""
    hint = resume_hint(exp)
    if hint.startswith("no checkpoint"):
        return "interrupted before the first checkpoint: nothing to resume, run the same command again"
    return f"interrupted; {hint}"
