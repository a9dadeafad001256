"""Checkpoint files: safe loading, atomic saving, RNG state, finding the newest valid one of a
run, pruning periodic copies, the per-epoch cluster log, and models loaded from checkpoints
(:func:`load_model`). Nothing here reads a script's flags: what a method stores is its own
(:mod:`deepcluster`, :mod:`deepclusterv2`), when and where the run engine's (:mod:`engine`).

Checkpoints are dicts of plain types and tensors, loadable with
``torch.load(path, weights_only=True)``, written through :func:`fileio.atomic_write`
(temporary file, then rename), so a kill at any moment leaves either the old or the new file.

A run folder records its invocations in ``args_history.jsonl`` (:mod:`runfolder`); the last
line names the current run id, and only checkpoints carrying that id are candidates for
``--resume FOLDER`` (:func:`find_checkpoint`).

``restart_from_checkpoint(path, run_variables=..., **objects)`` is the generic form used by
the evaluation scripts: every object with ``load_state_dict`` is restored from the key of
the same name, and ``run_variables`` receives the plain values.
"""
from __future__ import annotations

import logging
import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import clustering
import fileio
import models
import preempt
from fileio import atomic_np_save, atomic_torch_save, atomic_write

log = logging.getLogger("deepcluster")


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
# saving, finding, pruning
# ---------------------------------------------------------------------------------------
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


def _candidates(folder: Path) -> list[Path]:
    return [p for p in [folder / "checkpoint.pth.tar", *sorted((folder / "checkpoints").glob("checkpoint_*.pth.tar"))]
            if p.exists()]


def find_checkpoint(path: str, run_id: str | None = None, quiet: bool = False) -> str | None:
    """``--resume`` target: a file, or an experiment folder whose newest valid checkpoint of
    the run ``run_id`` (exp/checkpoint.pth.tar or a periodic copy, by epoch and iteration;
    None: of any run) is taken; corrupt files and other runs' files are skipped with a warning.
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
