"""Run state: checkpoints (safe loading, RNG state, resuming a DeepCluster run), the per-epoch
cluster log, and models loaded from checkpoints (:func:`load_model`).

Checkpoints are dicts of plain types and tensors, loadable with
``torch.load(path, weights_only=True)``, written through :func:`fileio.atomic_write`
(temporary file, then rename), so a kill at any moment leaves either the old or the new file.

Resuming (``main.py --resume PATH``) is done in two phases: everything is checked first
(the file, the architecture, k, the input size, the number of images, the mid-epoch state,
the run id), and only then are the logs of the epochs to redo dropped. An experiment folder
records its invocations in ``args_history.jsonl``; the last line names the current run id,
and only checkpoints carrying that id are candidates for ``--resume FOLDER``.

``restart_from_checkpoint(path, run_variables=..., **objects)`` is the generic form used by
the evaluation scripts: every object with ``load_state_dict`` is restored from the key of
the same name, and ``run_variables`` receives the plain values.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import clustering
import fileio
import models
import preempt
from fileio import atomic_np_save, atomic_torch_save, atomic_write, atomic_write_text, fsync_enabled

log = logging.getLogger("deepcluster")

FORMAT_VERSION = 3
HISTORY = "args_history.jsonl"  # one line per invocation of main.py in an experiment folder


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the requested model or run."""


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------
def torch_load(path: str | os.PathLike, mmap: bool = False) -> dict:
    """Load a checkpoint safely (``weights_only``), with clear errors.

    Falls back to latin1 decoding for checkpoints pickled by Python 2 (the released ones).
    ``mmap``: map the tensors instead of reading them (fast when only the small entries such
    as the epoch are needed); files of the legacy format are then read normally. A full load
    verifies the checksum saved with the checkpoint (:func:`fileio.payload_digest`, none in
    older files); a mapped one does not (the caller verifies what it picks, see
    :func:`find_checkpoint`).
    """
    path = str(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, expected a file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes)")
    errors = []
    for kwargs in ([{"mmap": True}] if mmap else []) + [{}, {"encoding": "latin1"}]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "pickle_load_args only works if..."
                ckpt = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
            break
        except Exception as e:  # corrupt zip, truncated pickle, foreign file...
            errors.append(str(e))
    else:
        # PyTorch's message advises weights_only=False, which is wrong for random bytes or an
        # image; it is only relevant when the file is a real pickle of foreign objects.
        if any("Unsupported global" in e or "Unsupported operand" in e for e in errors) \
                and _is_torch_file(path):
            raise CheckpointError(f"{path!r} is not a checkpoint of plain tensors: it holds pickled "
                                  f"objects, which are not loaded for safety")
        raise CheckpointError(f"{path!r} is not a checkpoint (corrupt, truncated, or another kind of file)")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path!r} is not a checkpoint: it holds a {type(ckpt).__name__}, expected a dict")
    if not mmap and not fileio.is_verified(path):
        if fileio.checksum_mismatch(ckpt):
            raise CheckpointError(f"checkpoint {path!r} is corrupt: {fileio.CHECKSUM_MISMATCH}")
        fileio.mark_verified(path)
    return ckpt


def _is_torch_file(path: str) -> bool:
    """True for a zip (PyTorch >= 1.6) or a legacy pickle stream."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK") or head[:1] == b"\x80"


def restart_from_checkpoint(path: str | os.PathLike, run_variables: dict | None = None, *,
                            loaded: dict | None = None, **objects) -> dict:
    """Restore ``objects`` (anything with ``load_state_dict``) from the keys of the same name.

    ``run_variables`` (a dict) gets the checkpoint's value of each of its keys that the
    checkpoint holds. ``loaded``: the checkpoint already read from ``path`` (not read twice).
    Returns the checkpoint.
    """
    ckpt = torch_load(path) if loaded is None else loaded
    for key, obj in objects.items():
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {str(path)!r} has no {key!r}")
        try:
            obj.load_state_dict(ckpt[key])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {str(path)!r}: {key!r} does not fit: "
                                  f"{str(e).strip().splitlines()[-1]}") from None
    if run_variables is not None:
        for key in run_variables:
            if key in ckpt:
                run_variables[key] = ckpt[key]
    return ckpt


# ---------------------------------------------------------------------------------------
# RNG state (plain types, so that checkpoints load with weights_only=True)
# ---------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def gather_rng_states(rt) -> list[dict] | None:
    """Every rank's :func:`get_rng_state`, in rank order, on rank 0 (None elsewhere).

    Each rank draws its own dropout masks (torch seeded with seed + rank), so a checkpoint
    keeps all of them and each rank restores its own.
    """
    if not rt.distributed:
        return [get_rng_state()]
    import torch.distributed as dist
    out = [None] * rt.world_size if rt.is_main else None
    dist.gather_object(get_rng_state(), out, dst=0)
    return out


def restore_rank_rng(ckpt: dict, seed: int, rt) -> None:
    """This rank's own torch (CPU and CUDA) generators from ``ckpt['rng_ranks'][rank]``.

    ``resume`` has already restored ``ckpt['rng']`` (rank 0's state) on every rank: its numpy
    and random streams are shared by all ranks. A rank the checkpoint has no state for (it
    was written by fewer processes, or before states were kept per rank) starts a stream of
    its own, distinct per rank and epoch.
    """
    if ckpt.get("path", "") is None:  # no checkpoint yet: the run starts afresh, seeded as a fresh run is
        return
    states = ckpt.get("rng_ranks")
    if states and rt.rank < len(states):
        st = states[rt.rank]
        torch.set_rng_state(st["torch"].cpu())
        if rt.device.type == "cuda" and "cuda" in st and rt.device.index < len(st["cuda"]):
            torch.cuda.set_rng_state(st["cuda"][rt.device.index].cpu(), rt.device)
    elif rt.rank > 0:
        seed = seed + rt.rank + 1_000_003 * (int(ckpt.get("epoch", 0)) + 1)
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)


# ---------------------------------------------------------------------------------------
# the experiment folder: writability, run ids, invocation history
# ---------------------------------------------------------------------------------------
def check_exp_writable(exp: Path, rt) -> None:
    """Fail before any work if the experiment folder cannot take files (read-only, full)."""
    try:
        exp.mkdir(parents=True, exist_ok=True)
        (exp / "checkpoints").mkdir(exist_ok=True)
        probe = exp / f".write_test.{os.getpid()}"  # one per process: ranks share the folder
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"experiment folder {str(exp)!r} is not writable: {e.strerror or e}") from None
    if not rt.is_main:  # only rank 0 writes files, so only it cleans up
        return
    # temporary files of a save that was killed before its rename: never valid, remove them
    for stale in list(exp.glob(".tmp-*")) + list((exp / "checkpoints").glob(".tmp-*")) \
            + list((exp / "clusters").glob(".tmp-*")):
        stale.unlink(missing_ok=True)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def read_history(exp: Path) -> list[dict]:
    """The invocations recorded in ``exp/args_history.jsonl`` (oldest first)."""
    path = Path(exp) / HISTORY
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill while appending
            continue
    return out


def current_run_id(exp: Path) -> str | None:
    """The run id of the folder's last invocation (None for a folder without history)."""
    hist = [h for h in read_history(exp) if h.get("run_id")]
    return hist[-1]["run_id"] if hist else None


# flags a --resume never takes from the recorded run: where it writes, how it resumes, how it talks
NOT_INHERITED = ("resume", "exp", "overwrite", "start_epoch", "change_k", "verbose", "no_progress")


def recorded_run(resume: str) -> tuple[Path | None, dict]:
    """The experiment folder a ``--resume`` target belongs to and the flags its run last ran with.

    ``resume`` is a folder written by main.py, or a checkpoint in one (``EXP/checkpoint.pth.tar``,
    ``EXP/checkpoints/checkpoint_N.pth.tar``). The flags are those of the folder's last recorded
    invocation (``args_history.jsonl``), else ``args.json``'s; ``(None, {})`` for anything else
    (a released checkpoint, a missing path: the resume itself says what is wrong).
    """
    p = Path(resume)
    cands = [p] if p.is_dir() else [p.parent] + ([p.parent.parent] if p.parent.name == "checkpoints" else [])
    for folder in cands:
        hist = [h for h in read_history(folder) if isinstance(h.get("args"), dict)]
        if hist:
            return folder, dict(hist[-1]["args"])
        try:
            flags = json.loads((folder / "args.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(flags, dict):
            return folder, flags
    return None, {}


def record_invocation(exp: Path, args, run_id: str, start_epoch: int, iteration: int = 0,
                      resumed_from: str | None = None) -> None:
    """Append this invocation (all flags, run id, where it starts) to ``args_history.jsonl``.

    The log's epochs from ``start_epoch`` on were trained with these flags (until the next
    line). ``args.json`` keeps the flags the run was started with.
    """
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "run_id": run_id, "start_epoch": int(start_epoch),
             "iteration": int(iteration), "resumed_from": resumed_from, "launch": launch_id(),
             "args": dict(vars(args))}
    with open(Path(exp) / HISTORY, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
        f.flush()
        if fsync_enabled():
            os.fsync(f.fileno())


def launch_id() -> str | None:
    """The torchrun launch this process belongs to, the same in all its restarts (None outside
    torchrun): its rendezvous id when set (``--rdzv-id``, ``--standalone``), else the launcher's
    host and pid (static rendezvous: rank 0 always runs under the first node's launcher)."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run and run != "none":
        return f"rdzv:{run}"
    import socket
    return f"{socket.gethostname()}:{os.getppid()}"


def restarted_own_run(exp: Path, rt) -> bool:
    """True in a torchrun restart (``TORCHELASTIC_RESTART_COUNT`` > 0) whose folder's last
    invocation is this same launch: the command continues its own run (``--resume EXP``).
    A first launch, or a restart of a launch that never started its run there (a fresh command
    refused in a used folder), returns False. Rank 0 decides for all ranks."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) <= 0:
        return False
    hist = read_history(exp) if rt.is_main else []
    own = bool(hist) and hist[-1].get("launch") is not None and hist[-1].get("launch") == launch_id()
    if rt.distributed:
        import torch.distributed as dist
        flag = [own]
        dist.broadcast_object_list(flag, src=0)
        own = bool(flag[0])
    return own


def exp_holds_run(exp: Path) -> list[str]:
    """Files that show ``exp`` already holds a run (checkpoints, or logged epochs)."""
    exp = Path(exp)
    found = [p for p in [exp / "checkpoint.pth.tar", *sorted((exp / "checkpoints").glob("checkpoint_*.pth.tar"))]
             if p.exists()]
    logf = exp / "log.jsonl"
    if logf.exists() and logf.stat().st_size > 0:
        found.append(logf)
    return [str(p) for p in found]


def retire_run(exp: Path) -> None:
    """``--overwrite``: remove the checkpoints, cluster files and log of the previous run."""
    exp = Path(exp)
    for p in [exp / "checkpoint.pth.tar", *(exp / "checkpoints").glob("checkpoint_*.pth.tar"),
              *(exp / "checkpoints").glob("epoch_*.pth.tar"), *(exp / "clusters").glob("epoch_*.npy"),
              exp / "log.jsonl"]:
        p.unlink(missing_ok=True)
    shutil.rmtree(exp / "report", ignore_errors=True)
    shutil.rmtree(exp / "tensorboard", ignore_errors=True)  # --tensorboard's events of the old run


# ---------------------------------------------------------------------------------------
# DeepCluster checkpoints
# ---------------------------------------------------------------------------------------
def checkpoint_state(model, opt: torch.optim.Optimizer, epoch: int, args, labels: np.ndarray | None,
                     mid_epoch: dict | None = None, run_id: str | None = None,
                     rng_ranks: list[dict] | None = None) -> dict:
    """Everything a restart needs, as plain types and tensors (weights_only-loadable).

    End of epoch: ``epoch`` is the next epoch to run. Inside an epoch (periodic copies),
    ``epoch`` is the running one and ``mid_epoch`` holds its pseudo-labels, draws, position,
    top-layer optimizer and partial loss, so that training continues exactly there.
    ``rng_ranks``: every rank's RNG state (:func:`gather_rng_states`), restored by rank.
    """
    state = {
        "epoch": epoch,
        "iteration": 0 if mid_epoch is None else mid_epoch["iteration"],
        "arch": args.arch,
        "state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "model_config": model.config(),
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "rng": get_rng_state(),
        "last_assignment": None if labels is None else torch.from_numpy(labels.astype(np.int64)),
        "run_id": run_id,
        "format_version": FORMAT_VERSION,
    }
    if rng_ranks is not None:
        state["rng_ranks"] = rng_ranks
    if mid_epoch is not None:
        state["mid_epoch"] = mid_epoch
    return state


def save_checkpoint(state: dict, path: Path, rt) -> None:
    """Write a checkpoint atomically (temporary file + rename), on rank 0 only.

    A failed write (full disk, read-only folder) leaves the previous file intact and is
    reported as a CheckpointError naming the path. The file carries the checksum of its
    payload (``"checksum"``, :func:`fileio.with_checksum`).
    """
    if not rt.is_main:
        return
    state = fileio.with_checksum(state)  # verified by every full load (torch_load)
    try:
        with preempt.deferred_signals():  # Ctrl-C or SIGTERM mid-write acts after the rename
            atomic_torch_save(state, path)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {str(path)!r}: {e.strerror or e}; "
                              f"the previous checkpoint there is intact") from None


def save_run(path: Path, model, opt: torch.optim.Optimizer, epoch: int, args, labels: np.ndarray | None,
             run_id: str, rt, mid_epoch: dict | None = None) -> None:
    """Gather every rank's RNG state (a collective: all ranks call this), then write the
    checkpoint on rank 0 (:func:`checkpoint_state`, :func:`save_checkpoint`)."""
    rng = gather_rng_states(rt)
    if rt.is_main:
        save_checkpoint(checkpoint_state(model, opt, epoch, args, labels, mid_epoch=mid_epoch, run_id=run_id,
                                         rng_ranks=rng), path, rt)


def _candidates(folder: Path) -> list[Path]:
    return [p for p in [folder / "checkpoint.pth.tar", *sorted((folder / "checkpoints").glob("checkpoint_*.pth.tar"))]
            if p.exists()]


def find_checkpoint(path: str, quiet: bool = False) -> str | None:
    """``--resume`` target: a file, or an experiment folder whose newest valid checkpoint of
    the folder's current run (exp/checkpoint.pth.tar or a periodic copy, by epoch and
    iteration) is taken; corrupt files and other runs' files are skipped with a warning.
    A folder with no checkpoint at all (a run stopped before its first save) gives None:
    the run starts from the beginning."""
    p = Path(path)
    if not p.is_dir():
        return path
    warn = (lambda *a: None) if quiet else log.warning
    candidates = _candidates(p)
    if not candidates:
        warn("no checkpoint in %s yet: starting from the beginning", path)
        return None
    run_id = current_run_id(p)
    ranked = []
    for c in candidates:
        try:
            ck = torch_load(c, mmap=True)  # only the position and run id are read here
        except CheckpointError as e:
            warn("skipping %s", e)
            continue
        if run_id is not None and ck.get("run_id") != run_id:
            warn("skipping %s: it belongs to an earlier run in this folder", c)
            continue
        # a periodic copy at iteration 0 of epoch e already holds epoch e's clustering
        ranked.append(((int(ck.get("epoch", 0)), int(ck.get("iteration", 0)), "mid_epoch" in ck), str(c)))
    # the newest whose checksum matches (its tensors read through the map, not loaded)
    for _, c in sorted(ranked, key=lambda kc: kc[0], reverse=True):
        if fileio.is_verified(c) or not fileio.checksum_mismatch(torch_load(c, mmap=True)):
            fileio.mark_verified(c)
            return c
        warn("skipping %s: it is corrupt: %s", c, fileio.CHECKSUM_MISMATCH)
    raise CheckpointError(f"no valid checkpoint in experiment folder {path!r}")


def prune_periodic(folder: Path, keep: int, run_id: str, rt, protect: Path | None = None) -> list[str]:
    """``--keep_checkpoints N``: after a periodic copy is safely written, delete this run's older
    periodic copies (``folder/checkpoint_<n>.pth.tar``) beyond the newest ``keep`` (0: keep all).

    "Newest" is the resume order of :func:`find_checkpoint` (epoch, iteration), read from the
    files, not the number in the name (which changes meaning with ``--checkpoints``), so the
    copy a ``--resume EXP`` would take is always kept. Files of other runs, unreadable files and
    ``checkpoint_stopped.pth.tar`` are left alone. Rank 0 only. Returns the deleted paths.
    """
    if keep <= 0 or not rt.is_main:
        return []
    mine = []
    for p in Path(folder).glob("checkpoint_*.pth.tar"):
        if not p.name[len("checkpoint_"):-len(".pth.tar")].isdigit():
            continue
        try:
            ck = torch_load(p, mmap=True)  # only the position and run id are read
        except CheckpointError:
            continue
        if ck.get("run_id") != run_id:
            continue
        mine.append(((int(ck.get("epoch", 0)), int(ck.get("iteration", 0)), "mid_epoch" in ck), p))
    mine.sort(key=lambda kp: kp[0])
    deleted = []
    for _, p in mine[:-keep]:
        if protect is not None and p.resolve() == Path(protect).resolve():
            continue
        p.unlink(missing_ok=True)
        deleted.append(str(p))
    if deleted:
        log.debug("--keep_checkpoints %d: deleted %s", keep, ", ".join(deleted))
    return deleted


def keep_epoch_copy(exp: Path, epoch: int, rt) -> Path | None:
    """``--keep_epoch_checkpoints``: keep the end-of-epoch checkpoint just written as
    ``exp/checkpoints/epoch_<epoch>.pth.tar`` (a hard link: no extra disk until the next save
    replaces exp/checkpoint.pth.tar by a rename; a copy where links are not supported).
    Never pruned, never a ``--resume EXP`` candidate (exp/checkpoint.pth.tar is)."""
    if not rt.is_main:
        return None
    src, dst = Path(exp) / "checkpoint.pth.tar", Path(exp) / "checkpoints" / f"epoch_{epoch:05d}.pth.tar"
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        atomic_write(dst, lambda f: f.write(src.read_bytes()))
    return dst


_MID_KEYS = ("iteration", "assignment", "n_clusters", "draws", "top_optimizer", "clustering_loss",
             "loss_sum", "loss_count", "prev_assignment", "time_features", "time_clustering")


def check_checkpoint(ckpt: dict, path: str, args, n_images: int) -> None:
    """Refuse a checkpoint that does not fit the flags or the data, naming the mismatch."""
    if "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path!r} has no 'state_dict'")
    ck_arch = ckpt.get("arch")
    if ck_arch is not None and ck_arch != args.arch:
        raise CheckpointError(f"checkpoint {path!r} holds {models.article(ck_arch)} model but --arch is {args.arch}")
    sd = ckpt["state_dict"]
    has_sobel = any(k.endswith("sobel.0.weight") for k in sd)
    if has_sobel != bool(args.sobel):
        raise CheckpointError(f"checkpoint {path!r} was trained with sobel={has_sobel}, "
                              f"but --sobel is {'on' if args.sobel else 'off'}")
    size = (ckpt.get("model_config") or {}).get("input_size")
    if size is not None and int(size) != args.size:
        raise CheckpointError(f"checkpoint {path!r} was trained at --size {size}, not {args.size}")
    ck_k = (ckpt.get("args") or {}).get("nmb_cluster")
    if ck_k is not None and int(ck_k) != args.nmb_cluster and not getattr(args, "change_k", False):
        raise CheckpointError(f"checkpoint {path!r} was trained with --k {ck_k}, not {args.nmb_cluster} "
                              f"(add --change_k to cluster into {args.nmb_cluster} from the next epoch on)")
    ck_list = (ckpt.get("args") or {}).get("file_list_sha256")
    if ck_list is not None and ck_list != getattr(args, "file_list_sha256", None):
        raise CheckpointError(f"checkpoint {path!r} was trained on a --file_list with SHA-256 {ck_list[:12]}..., "
                              f"not on this {'list' if getattr(args, 'file_list', None) else 'folder'}: the image "
                              f"indices would not match")
    mid = ckpt.get("mid_epoch")
    if mid is None:
        return
    missing = [k for k in _MID_KEYS if k not in mid]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} has an incomplete mid-epoch state (no {missing})")
    position = _position(mid, args.batch)
    if position % args.batch:
        raise CheckpointError(f"the checkpoint stopped after {position} draws of its epoch, not a multiple of "
                              f"--batch {args.batch}: resume with the --batch of that run "
                              f"({mid.get('batch', 'see its args.json')})")
    n_ckpt = len(mid["assignment"])
    if n_ckpt != n_images:
        raise CheckpointError(f"the checkpoint's epoch was clustered on {n_ckpt} images but {args.data} "
                              f"now has {n_images}: resume from an end-of-epoch checkpoint instead")
    top = sd.get("top_layer.weight")
    if top is None or top.shape[0] != int(mid["n_clusters"]):
        raise CheckpointError(f"checkpoint {path!r}: its mid-epoch top layer does not match its "
                              f"{int(mid['n_clusters'])} clusters")
    draws = mid["draws"]
    if len(draws) == 0 or int(draws.min()) < 0 or int(draws.max()) >= n_images:
        raise CheckpointError(f"checkpoint {path!r}: its epoch's draws do not index {n_images} images")
    if not 0 <= int(mid["iteration"]) or int(mid["loss_count"]) < 0:
        raise CheckpointError(f"checkpoint {path!r}: invalid position in the epoch")


_KERNEL_FLAGS = ("fused", "foreach")


def load_optimizer(opt: torch.optim.Optimizer, state: dict) -> None:
    """``opt.load_state_dict(state)``, keeping this run's kernel choice: the saved param_groups
    carry the ``fused``/``foreach`` flags of the run that wrote them (none in the original's
    checkpoints), which would otherwise replace the ones ``opt`` was built with."""
    flags = [{k: g.get(k) for k in _KERNEL_FLAGS} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, kept in zip(opt.param_groups, flags):
        group.update(kept)
    match_state_layout(opt)


def match_state_layout(opt: torch.optim.Optimizer) -> None:
    """Give every state buffer (SGD's momentum) its parameter's strides.

    ``load_state_dict`` casts the saved buffers to the parameter's dtype and device but keeps
    the strides they were saved with: an NCHW momentum (a ``--no-channels_last`` run, the
    original release) next to a channels-last conv weight. The fused SGD kernel walks
    parameter, gradient and buffer as flat arrays, so on CPU it adds the momentum of other
    elements (conv1 moved by ~10% of its norm in one step) and on CUDA it refuses the step.
    ``empty_like`` keeps the parameter's memory format; ``copy_`` moves values by index.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            for name, buf in opt.state.get(p, {}).items():
                if (torch.is_tensor(buf) and buf.shape == p.shape and buf.dim() > 0
                        and buf.stride() != p.stride()):
                    opt.state[p][name] = torch.empty_like(p, dtype=buf.dtype).copy_(buf)


def resume(path: str, model, opt: torch.optim.Optimizer, args, n_images: int) -> dict:
    """Check, then restore model, optimizer and RNG; returns the checkpoint (epoch, last
    assignment, mid-epoch state, ``"path"``), or ``{"epoch": --start_epoch}`` for a folder
    without any checkpoint yet."""
    found = find_checkpoint(path)
    if found is None:
        return {"epoch": args.start_epoch, "path": None}
    ckpt = torch_load(found)
    check_checkpoint(ckpt, found, args, n_images)
    sd = models.clean_state_dict(ckpt["state_dict"])
    top = {k[len("top_layer."):]: v for k, v in sd.items() if k.startswith("top_layer.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("top_layer.")}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {found!r} does not fit --arch {args.arch} --size {args.size}: "
                              f"{str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.startswith("top_layer") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {found!r} does not fit --arch {args.arch} --size {args.size}: "
                              f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    if "optimizer" in ckpt:
        try:
            load_optimizer(opt, ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            log.warning("optimizer state in %s not restored (%s): momentum restarts from zero", found, e)
    if "mid_epoch" in ckpt and top:  # the running epoch's top layer comes back too
        model.reset_top_layer(top["weight"].shape[0]).load_state_dict(top)
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    ckpt["path"] = found
    return ckpt


def restore_run(args, model, opt, history, clog, n_images: int,
                rt) -> tuple[int, dict | None, np.ndarray | None, dict]:
    """--resume: check the checkpoint and the folder, restore the model, then drop the logs
    of the epochs to redo. Returns (start epoch, mid-epoch state or None, previous
    assignment or None, the checkpoint). Nothing in the folder changes if a check fails."""
    ckpt = resume(args.resume, model, opt, args, n_images)
    restore_rank_rng(ckpt, args.seed, rt)
    start_epoch, mid = int(ckpt.get("epoch", 0)), ckpt.get("mid_epoch")
    prev = mid["prev_assignment"] if mid is not None else ckpt.get("last_assignment")
    if prev is not None and len(prev) != n_images:  # the image set changed since
        log.warning("the checkpoint was made on %d images, %s now has %d: NMI with the previous epoch "
                    "restarts", len(prev), args.data, n_images)
        prev = None
    if start_epoch >= args.epochs:
        return start_epoch, mid, None if prev is None else prev.numpy(), ckpt  # nothing to redo or drop
    if rt.is_main:  # no checkpoint yet: the record of the random network (epoch -1) is redone too
        history.truncate(0 if ckpt["path"] is None else
                         sum(1 for r in history.data if r.get("epoch", 0) < start_epoch))
        clog.truncate(start_epoch)
    log.info("=> loaded checkpoint %r (epoch %d, iteration %d)", ckpt["path"], start_epoch, ckpt.get("iteration", 0))
    return start_epoch, mid, None if prev is None else prev.numpy(), ckpt


def start_or_resume(args, exp: Path, model, opt, history, clog, N: int,
                    rt) -> tuple[str, int, dict | None, np.ndarray | None]:
    """(run id, start epoch, mid-epoch state or None, previous assignment or None).

    --resume: the checkpoint is checked, then the logs of the epochs to redo are dropped.
    Without it, a folder that holds a run is refused unless --overwrite, which retires the
    old checkpoints and logs. Every invocation is appended to EXP/args_history.jsonl.
    """
    if not args.resume and restarted_own_run(exp, rt):  # torchrun --max-restarts: continue this run
        if rt.is_main:
            log.warning("restart %s of this torchrun launch: continuing its run in %s",
                        os.environ.get("TORCHELASTIC_RESTART_COUNT"), exp)
        args.resume = str(exp)
    if args.resume:
        start, mid, prev, ckpt = restore_run(args, model, opt, history, clog, N, rt)
        run_id = ckpt.get("run_id") or current_run_id(exp) or new_run_id()
        if start >= args.epochs:
            log.warning("nothing to train: the checkpoint is at epoch %d and --epochs is %d (the run is finished; "
                        "raise --epochs to train further)", start, args.epochs)
            return run_id, start, mid, prev
        if rt.is_main:
            if not (exp / "args.json").exists():
                atomic_write_text(exp / "args.json", json.dumps(vars(args), indent=1, default=str))
            record_invocation(exp, args, run_id, start, ckpt.get("iteration", 0), ckpt["path"])
        return run_id, start, mid, prev
    used = exp_holds_run(exp)
    if used and not args.overwrite:
        raise CheckpointError(
            f"{args.exp} already holds a run ({used[0]}): continue it with --resume {args.exp}, use a new "
            f"--exp, or start over with --overwrite (deletes its checkpoints, log and cluster files)")
    if args.start_epoch >= args.epochs:
        log.warning("nothing to train: --epochs %d (start epoch %d)", args.epochs, args.start_epoch)
        return "", args.start_epoch, None, None
    run_id = new_run_id()
    if rt.is_main:
        if used:
            log.warning("--overwrite: deleting the checkpoints, log and cluster files of the run in %s", args.exp)
            retire_run(exp)
        history.truncate(0)
        clog.truncate(0)
        atomic_write_text(exp / "args.json", json.dumps(vars(args), indent=1, default=str))
        record_invocation(exp, args, run_id, args.start_epoch)
    return run_id, args.start_epoch, None, None


def _position(mid: dict, batch: int) -> int:
    """Draws of the epoch already trained on (older checkpoints: iteration * batch)."""
    return int(mid.get("position", int(mid["iteration"]) * batch))


def restore_epoch(mid: dict, top_opt: torch.optim.Optimizer, args, world_size: int = 1) -> dict:
    """The plan of an epoch interrupted inside training, from a periodic checkpoint: a dict
    with labels, draws, the top-layer SGD (``top_opt``, built for the restored top layer, gets
    its saved state), the position and the partial loss sum/count.

    Training continues at the same global position of the epoch's draws whatever the number
    of processes now: step i covers draws [i * batch, (i + 1) * batch) for any W.
    """
    labels = mid["assignment"].numpy()
    draws = mid["draws"].numpy()
    position = _position(mid, args.batch)
    if len(draws) % world_size:  # from a run on another W: every rank must run as many steps
        cut = len(draws) // world_size * world_size
        log.info("resuming on %d processes: the epoch's last %d draw(s) are dropped so that every rank runs "
                 "the same number of steps", world_size, len(draws) - cut)
        draws = draws[:cut]  # position is a multiple of batch, so of W: still <= cut
    load_optimizer(top_opt, mid["top_optimizer"])
    n_clusters = int(mid["n_clusters"])
    return {"labels": labels, "images_lists": clustering.labels_to_lists(labels, n_clusters),
            "clustering_loss": float(mid["clustering_loss"]), "draws": draws, "top_opt": top_opt,
            "start_iter": position // args.batch, "loss_sum": float(mid["loss_sum"]),
            "loss_count": int(mid["loss_count"]), "time_features": float(mid["time_features"]),
            "time_clustering": float(mid["time_clustering"])}


def mid_epoch_state(plan, i: int, meter, prev_labels: np.ndarray | None, args, rt) -> dict:
    """What a periodic checkpoint needs to continue this epoch at step i, on any number of
    processes: ``position`` = draws trained on so far (i * global batch), ``world_size``."""
    return {"iteration": i, "position": i * args.batch, "batch": args.batch, "world_size": rt.world_size,
            "assignment": torch.from_numpy(plan.labels), "n_clusters": len(plan.images_lists),
            "draws": torch.from_numpy(plan.draws), "top_optimizer": plan.top_opt.state_dict(),
            "clustering_loss": plan.clustering_loss, "loss_sum": meter.sum, "loss_count": meter.count,
            "prev_assignment": None if prev_labels is None else torch.from_numpy(prev_labels),
            "time_features": plan.time_features, "time_clustering": plan.time_clustering}


def resume_hint(exp: str) -> str:
    """What ``--resume EXP`` would load now, said plainly."""
    try:
        found = find_checkpoint(exp, quiet=True) if Path(exp).is_dir() else None
    except CheckpointError:
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


# ---------------------------------------------------------------------------------------
# models from checkpoints
# ---------------------------------------------------------------------------------------
def load_model(path: str | os.PathLike | None, arch: str | None = None, purpose: str = "") -> torch.nn.Module:
    """Load a model from our checkpoints, the released original ones or torchvision-layout weights.

    Accepts ``{'state_dict': ...}`` checkpoints and bare state dicts; ``features.N.*``,
    ``features.module.N.*`` and ``module.*`` keys; missing BN counters; Python-2 pickles.
    The architecture, Sobel and k are read from the weights (``model_config`` wins when
    present). A ResNet-50 state dict may carry a head this model has no use for (the
    projection head and prototypes of SwAV's DeepCluster-v2 release): those keys are
    ignored, logged and listed in ``model.ignored_keys``. A DeepCluster-v2 checkpoint of
    ``main_deepclusterv2.py`` gives its trunk (ResNet-50 or ResNet-18) at its training size.
    ``arch``, when given, must match; ``purpose`` names who needs it in that error
    ("retrieval needs a vgg16 model, ...").
    """
    if not path:
        raise CheckpointError("no model given: pass --model PATH (a DeepCluster checkpoint)")
    where = f"checkpoint {str(path)!r}"
    if not os.path.exists(path) and "deepcluster_models" in str(path):  # the launchers' default MODEL
        raise CheckpointError(f"{where} does not exist: ./download_model.sh fetches the released models "
                              f"(into $MODELROOT, default ~/deepcluster_models), or set MODEL to your checkpoint")
    ckpt = torch_load(path)
    sd = ckpt.get("state_dict")
    if sd is None and models.detect_arch(models.clean_state_dict(ckpt)) is not None:
        sd = ckpt  # a bare state dict
    if not isinstance(sd, dict):
        raise CheckpointError(f"{where} has no 'state_dict' and is not a state dict of "
                              f"{', '.join(models.LOADABLE)}")
    cfg = ckpt.get("model_config")
    if ckpt.get("method") == "deepclusterv2" and isinstance(ckpt.get("config"), dict):
        # main_deepclusterv2.py's checkpoints: the trunk (resnet50 or resnet18) and training size
        cfg = {"arch": ckpt["config"].get("trunk"), "input_size": ckpt["config"].get("input_size", 224)}
    held = ckpt.get("arch") or (cfg or {}).get("arch") or models.detect_arch(models.clean_state_dict(sd))
    if arch is not None and held is not None and held != arch:
        raise CheckpointError(f"{purpose or 'this run'} needs {models.article(arch)} model, but {where} holds "
                              f"{models.article(held)}")
    try:
        model, ignored = models.from_state_dict(sd, arch or held, cfg)
    except models.StateDictError as e:
        raise CheckpointError(f"{where}: {e}") from None
    model.ignored_keys = ignored
    if ignored:
        heads = sorted({k.replace("module.", "").split(".")[0] for k in ignored})
        log.warning("%s: ignored %d keys of heads %s has no use for (%s)", where, len(ignored),
                    model.arch, ", ".join(heads))
    return model


# ---------------------------------------------------------------------------------------
# cluster assignments log: exp/clusters/epoch_00000.npy, one compact array per epoch
# ---------------------------------------------------------------------------------------
class ClusterLog:
    """Per-epoch cluster assignments, one ``.npy`` file per epoch (never rewritten).

    ``labels[i]`` is the cluster of image i (original cluster ids; uint16 when k allows).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch_{epoch:05d}.npy"

    def save(self, epoch: int, labels: np.ndarray, k: int) -> None:
        """``labels[i] == -1`` marks an image left out of the clustering (unreadable)."""
        labels = np.asarray(labels)
        dtype = np.uint16 if k <= np.iinfo(np.uint16).max and (labels.size == 0 or labels.min() >= 0) else np.int32
        atomic_np_save(self.path(epoch), np.asarray(labels).astype(dtype))

    def epochs(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.folder.glob("epoch_*.npy"))

    def load(self, epoch: int) -> np.ndarray:
        return np.load(self.path(epoch)).astype(np.int64)

    def history(self, upto: int | None = None) -> list[np.ndarray]:
        """Assignments of every stored epoch (< upto when given), in epoch order."""
        return [self.load(e) for e in self.epochs() if upto is None or e < upto]

    def truncate(self, upto: int) -> None:
        """Remove epochs >= upto (they will be recomputed after a resume)."""
        for e in self.epochs():
            if e >= upto:
                self.path(e).unlink()


def export_clusters_pickle(exp: str | os.PathLike, out: str | os.PathLike, epoch: int | None = None,
                           image_paths: Sequence[str] | None = None) -> str:
    """Convert the stored assignments to the original pickle formats.

    With ``image_paths`` (one per image, in dataset order): the released format for one epoch
    (default: the last), a list of ``(image_path, cluster_index)``. Without: the original
    ``exp/clusters`` log, a list (one entry per epoch) of ``images_lists``. A relative ``out``
    is taken inside ``exp``. Images left out of a clustering (unreadable) are left out.
    """
    clog = ClusterLog(Path(exp) / "clusters")
    epochs = clog.epochs()
    if not epochs:
        raise FileNotFoundError(f"no cluster assignments under {Path(exp) / 'clusters'}")
    out = Path(out) if Path(out).is_absolute() else Path(exp) / out
    if image_paths is not None:
        labels = clog.load(epochs[-1] if epoch is None else epoch)
        if len(image_paths) != len(labels):
            raise ValueError(f"image_paths has {len(image_paths)} entries but the assignments of "
                             f"{Path(exp) / 'clusters'} cover {len(labels)} images")
        obj: Any = [(p, int(c)) for p, c in zip(image_paths, labels) if c >= 0]
    else:
        obj = [clustering.labels_to_lists(lab, int(lab.max()) + 1) for lab in map(clog.load, epochs)]
    atomic_write(out, lambda f: pickle.dump(obj, f, protocol=2))
    return str(out)
