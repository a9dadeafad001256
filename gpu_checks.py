"""The checks of scripts/gpu_check.py (the first minutes on a GPU box), as a library: every
command line they launch (:func:`command_lines`, parsed by the scripts' own parsers in
:func:`parse_command` and :func:`preflight`), the data they make, and one ``check_NAME(work, dry)``
function per check returning ``(status, detail, numbers)``, status PASS, FAIL or SKIP.

``GPU_CHECK_DEVICE=cpu`` runs the CUDA checks' code on the CPU with tiny data (to test them
without a GPU: the numbers mean nothing). Heavy imports (torch, the repository's modules) happen
inside the functions: the driver stays light and a missing package fails one check, not all.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# the device of the CUDA checks; GPU_CHECK_DEVICE=cpu runs their code on the CPU (to test this
# script without a GPU: tiny sizes, and the numbers mean nothing)
DEV = os.environ.get("GPU_CHECK_DEVICE", "cuda")
CPU = DEV == "cpu"


@dataclass
class Check:
    seconds: float                      # time box on a GPU box (x SLOW with GPU_CHECK_DEVICE=cpu)
    cuda: str = ""                      # why it needs CUDA ("" = runs anywhere, dry run included)
    needs: tuple[str, ...] = ()         # optional packages it cannot run without


# in the order they run: the most informative first (the budget cuts the tail)
CHECKS = {
    "environment": Check(20),
    "nccl_one": Check(100, "NCCL"),
    "sync_audit": Check(60, "torch.cuda.set_sync_debug_mode is CUDA-only"),
    "v2_cuda": Check(120, "the CUDA paths of DeepCluster-v2"),
    "v2_nccl_one": Check(60, "NCCL"),
    "pca": Check(45, "the GPU eigensolver"),
    "decode_train": Check(80, "nvJPEG"),
    "memory": Check(120, "GPU memory"),
    "loader": Check(40),
    "decode_gpu": Check(30, "nvJPEG"),
    "kmeans": Check(40, "the GPU k-means"),
    "torchrun2": Check(80, "two GPUs"),
    "cuda_tests": Check(60, "pytest -m cuda: CUDA-only tests", needs=("pytest",)),
    "decode_cpu_twin": Check(30),
}
TOTAL_BUDGET = 450.0  # seconds for all checks: the script ends inside 8 minutes on one GPU
SLOW = 4.0 if CPU else 1.0  # a 2-core CPU standing in for the GPU
OPTIONAL = ("tqdm", "sklearn", "scipy", "matplotlib", "tensorboard", "faiss", "pytest")
REQUIRED = ("torch", "torchvision", "numpy", "PIL")
SIZES = {  # images, their size (h, w), training resolution, batch: real shapes on a GPU, tiny on the CPU
    "cuda": dict(n=256, hw=(375, 500), size=224, batch=32, v2_crops=("2", "2", "160", "96"), v2_batch=32,
                 workers="6"),
    "cpu": dict(n=48, hw=(120, 160), size=64, batch=8, v2_crops=("2", "1", "32", "16"), v2_batch=8, workers="1"),
}


def sizes(dev: str = DEV) -> dict:
    return SIZES["cpu" if dev == "cpu" else "cuda"]


def sync() -> None:
    import torch
    if DEV == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------
# every command line the checks launch: built here, parsed by the scripts' own parsers
# ---------------------------------------------------------------------------------------
@dataclass
class Command:
    script: str                          # repository-relative script: main.py, main_deepclusterv2.py
    argv: list[str]
    nproc: int = 0                       # > 0: started by launch.py --nproc_per_node=nproc
    env: dict[str, str] = field(default_factory=dict)

    def launcher_argv(self, port: int = 29500) -> list[str]:
        return [f"--nproc_per_node={self.nproc}", "--master_addr=127.0.0.1", f"--master_port={port}"]


FORCE = {"DEEPCLUSTER_FORCE_DISTRIBUTED": "1"}   # distributed.init_runtime: a process group of one
AUDIT = {"DEEPCLUSTER_SYNC_DEBUG": "error"}      # distributed.SyncAudit: a host sync raises


def command_lines(work: Path, dev: str = DEV) -> dict[str, Command]:
    """Every command line of the checks, by name (``work``: the check's data folder)."""
    s = sizes(dev)
    photos, d = str(work / f"photos{s['n']}"), "cpu" if dev == "cpu" else "cuda"

    def v1(exp: str, *extra: str, batch: int = s["batch"]) -> list[str]:
        return [photos, "--exp", str(work / exp), "--overwrite", "--device", d, "--size", str(s["size"]),
                "--k", "8", "--pca", "16", "--batch", str(batch), "--workers", s["workers"], "--epochs", "1",
                "--no_progress", "--cluster_backend", "torch", "--seed", "5", *extra]

    def v2(exp: str, *extra: str, batch: int = s["v2_batch"]) -> list[str]:
        c = s["v2_crops"]
        return [photos, "--exp", str(work / exp), "--device", d, "--arch", "resnet50" if d == "cuda" else "resnet18",
                "--nmb_crops", c[0], c[1], "--size_crops", c[2], c[3], "--min_scale_crops", "0.14", "0.05",
                "--max_scale_crops", "1", "0.14", "--batch_size", str(batch), "--nmb_prototypes", "6", "5",
                "--epochs", "1", "--warmup_epochs", "0", "--base_lr", "0.3", "--final_lr", "0.003",
                "--freeze_prototypes_niters", "2", "--workers", s["workers"], "--checkpoint_iters", "2", "--seed", "5",
                *extra]

    dev_feats = ("--features_on", "device", "--features_dtype", "float16", "--deterministic")
    return {
        # one process against a process group of one (DDP, synced BatchNorm, sharded k-means, the RNG gather)
        "v1_plain": Command("main.py", v1("plain", *dev_feats)),
        "v1_group_of_one": Command("main.py", v1("group_of_one", *dev_feats), env=dict(FORCE)),
        # 20+ steps audited for host syncs, in the group of one (the production path of W GPUs), --amp
        "v1_sync_audit": Command("main.py", v1("audit", "--amp", batch=s["batch"] // 4), env={**FORCE, **AUDIT}),
        "v1_decode_cpu": Command("main.py", v1("decode_cpu", "--decode", "cpu", "--deterministic")),
        "v1_decode_gpu": Command("main.py", v1("decode_gpu", "--decode", "gpu", "--deterministic")),
        "v1_torchrun2": Command("main.py", v1("torchrun2", "--decode", "gpu"), nproc=2),
        "v2_fp32": Command("main_deepclusterv2.py", v2("v2_fp32")),
        "v2_amp": Command("main_deepclusterv2.py", v2("v2_amp", *(["--amp"] if d == "cuda" else []))),
        # killed at step 3 (after the checkpoint of step 2), then --resume continues it
        "v2_killed": Command("main_deepclusterv2.py", v2("v2_resume", *(["--amp"] if d == "cuda" else [])),
                             env={"DEEPCLUSTER_FAULT": "dcv2_train:3"}),
        "v2_resume": Command("main_deepclusterv2.py", v2("v2_resume", *(["--amp"] if d == "cuda" else []),
                                                         "--resume", str(work / "v2_resume"))),
        # 32 steps on a GPU, audited for host syncs (engine.run_steps: distributed.SyncAudit)
        "v2_group_of_one": Command("main_deepclusterv2.py", v2("v2_group", *(["--amp"] if d == "cuda" else []),
                                                               batch=s["v2_batch"] // (4 if d == "cuda" else 1)),
                                   env={**FORCE, **AUDIT}),
    }


def parse_command(cmd: Command) -> argparse.Namespace:
    """Parse ``cmd`` with its script's own parser (and launch.py's torchrun flags): a flag the
    script lacks raises SystemExit(2) or ScriptError, as the script itself would."""
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(max(cmd.nproc, 1))  # main.py checks --batch against the processes
    try:
        if cmd.nproc:
            from torch.distributed import run as torchrun
            torchrun.parse_args(cmd.launcher_argv() + [cmd.script] + cmd.argv)
        if cmd.script == "main.py":
            import main
            return main.parse_args(cmd.argv)
        if cmd.script == "main_deepclusterv2.py":
            import main_deepclusterv2 as m2
            args = m2.get_args_parser().parse_args(cmd.argv)
            m2.check_args(args)
            return args
        raise ValueError(f"no parser known for {cmd.script}")
    finally:
        if old is None:
            os.environ.pop("WORLD_SIZE")
        else:
            os.environ["WORLD_SIZE"] = old


# ---------------------------------------------------------------------------------------
# shared data and process helpers
# ---------------------------------------------------------------------------------------
def photo_folder(work: Path, n: int | None = None, hw: tuple[int, int] | None = None) -> Path:
    """``n`` JPEG photos (quality 90, about ``hw``), flat (no class folders: no NMI with labels,
    so scikit-learn is not needed); made once per work folder. At most 64 distinct photos are
    drawn (by threads: PIL's encoder releases the GIL), the rest are byte copies of them under
    other names (the crops, drawn per image and seed, still differ)."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    import data

    s = sizes()
    n, (h, w) = n or s["n"], hw or s["hw"]
    root = work / f"photos{n}"
    if not (root / ".complete").exists():
        root.mkdir(parents=True, exist_ok=True)
        distinct = min(n, 64)

        def draw(i: int) -> None:
            data.synthetic_photo(h + 7 * (i % 5), w - 11 * (i % 3), i).save(root / f"{i:05d}.jpg", quality=90)
        with ThreadPoolExecutor(max(1, min(distinct, os.cpu_count() or 1))) as pool:
            list(pool.map(draw, range(distinct)))
        for i in range(distinct, n):
            shutil.copyfile(root / f"{i % distinct:05d}.jpg", root / f"{i:05d}.jpg")
        (root / ".complete").write_text("")
    return root


def python_exe() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


TQDM_STAND_IN = '''"""A stand-in for tqdm (gpu_check: the package is not installed): no progress bars."""
class tqdm:
    def __init__(self, iterable=None, *args, initial=0, **kwargs):
        self.iterable, self.disable, self.n = iterable, True, initial
    def __iter__(self):
        return iter(self.iterable)
    def __len__(self):
        return len(self.iterable)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return False
    def __getattr__(self, name):  # set_postfix, update, close...: nothing to show
        return lambda *args, **kwargs: None
'''


def tqdm_shim(work: Path) -> Path | None:
    """A folder holding the tqdm stand-in when tqdm is not installed (None when it is)."""
    if importlib.util.find_spec("tqdm") is not None:
        return None
    shim = work / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "tqdm.py").write_text(TQDM_STAND_IN)
    return shim


def child_env(work: Path | None, extra: dict | None = None) -> dict:
    """Environment of a launched process: the tqdm stand-in on the path when tqdm is missing."""
    env = dict(os.environ, **(extra or {}))
    shim = tqdm_shim(work) if work is not None else None
    if shim is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(shim), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_boxed(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a session of its own: on timeout the whole process group (the
    command and what it started: torchrun's workers, loader workers) is killed, by its id."""
    import signal

    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_command(name: str, work: Path, timeout: float) -> subprocess.CompletedProcess:
    """Command ``name`` of :func:`command_lines`, as a user runs it (from the repository root)."""
    cmd = command_lines(work)[name]
    argv = [python_exe()]
    if cmd.nproc:
        argv += [str(ROOT / "launch.py"), *cmd.launcher_argv(free_port())]
    return run_boxed(argv + [cmd.script, *cmd.argv], timeout, cwd=ROOT, env=child_env(work, cmd.env))


def error_line(text: str) -> str:
    """The line that says what went wrong in a failed run's stderr (its ``error:`` line, else the
    last exception line, else the last line)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for pick in (lambda l: l.startswith("error:"), lambda l: "Error" in l.split(":")[0]):
        found = [line for line in lines if pick(line)]
        if found:
            return found[-1][:300]
    return lines[-1][:300] if lines else "no output"


def read_log(exp: Path) -> list[dict]:
    return [json.loads(line) for line in (exp / "log.jsonl").read_text().splitlines() if line.strip()]


def runs(names: list[str], work: Path, seconds: float) -> tuple[dict | None, str]:
    """Run the commands in turn within ``seconds`` in all; ({name: last log record}, "") or
    (None, why the first failed)."""
    end = time.time() + seconds
    photo_folder(work)
    out = {}
    for name in names:
        t = time.time()
        res = run_command(name, work, max(end - t, 1))
        if res.returncode != 0:
            return None, f"{name} exited {res.returncode}: {error_line(res.stderr)}"
        exp = Path(command_lines(work)[name].argv[command_lines(work)[name].argv.index("--exp") + 1])
        out[name] = {**read_log(exp)[-1], "seconds": round(time.time() - t, 1)}
    return out, ""


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


# ---------------------------------------------------------------------------------------
# the checks: each returns (status, detail, numbers)
# ---------------------------------------------------------------------------------------
def package_versions() -> tuple[dict, list[str]]:
    """({package: version} of the required and optional packages found, [missing ones]), without
    importing the optional ones (a broken install is then reported by the check that uses it)."""
    from importlib import metadata

    dist_name = {"PIL": "pillow", "sklearn": "scikit-learn", "faiss": "faiss-cpu"}
    found, missing = {}, []
    for mod in REQUIRED + OPTIONAL:
        if importlib.util.find_spec(mod) is None:
            missing.append(mod)
            continue
        try:
            found[mod] = metadata.version(dist_name.get(mod, mod))
        except metadata.PackageNotFoundError:
            found[mod] = "?"
    return found, missing


def check_environment(work: Path, dry: bool):
    import platform

    import torch

    found, missing = package_versions()
    info = {"versions": found, "missing": missing, "python": platform.python_version(), "cores": os.cpu_count(),
            "cuda_available": torch.cuda.is_available(), "cuda_build": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "nccl": str(torch.cuda.nccl.version()) if torch.cuda.is_available() else None}  # int or tuple
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    gpu_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    bad = [m for m in missing if m in REQUIRED]
    detail = (f"python {info['python']}, torch {found.get('torch')} (CUDA {info['cuda_build']}, cuDNN "
              f"{info['cudnn']}, NCCL {info['nccl']}), torchvision {found.get('torchvision')}, "
              f"{info.get('gpus', 0)} x {info.get('gpu', 'no GPU')}, {info['cores']} cores; "
              f"missing: {', '.join(missing) or 'nothing'}")
    return ("FAIL" if bad else "PASS"), detail, info


def _labels_agree(work: Path, a: str, b: str) -> float:
    """Fraction of images with the same epoch-0 cluster in runs ``a`` and ``b`` (same algorithm,
    seed and features: the same ids, no matching needed)."""
    import numpy as np

    cl = [np.load(work / exp / "clusters" / "epoch_00000.npy", allow_pickle=False) for exp in (a, b)]
    return float((cl[0] == cl[1]).mean())


def check_nccl_one(work: Path, dry: bool):
    recs, why = runs(["v1_plain", "v1_group_of_one"], work, CHECKS["nccl_one"].seconds * SLOW - 5)
    if recs is None:
        return "FAIL", why, {}
    agree = _labels_agree(work, "plain", "group_of_one")
    la, lb = recs["v1_plain"]["train_loss"], recs["v1_group_of_one"]["train_loss"]
    # the group of one trains with the all-reduce BatchNorm on CUDA (float64 statistics) and
    # DDP's bucketed gradients: the same optimisation up to float rounding over one epoch
    ok = agree >= 0.99 and rel(la, lb) < 0.02
    return ("PASS" if ok else "FAIL"), (
        f"{'NCCL' if DEV == 'cuda' else 'gloo'} group of one (DDP, synced BN, sharded k-means, --features_on device "
        f"float16) vs one process: epoch-0 clusters {agree:.1%} equal, train loss {lb:.4f} vs {la:.4f} "
        f"(rel {rel(la, lb):.1e}, tolerance 2e-2)"), {"labels_equal": agree, "loss_rel_diff": rel(la, lb), **recs}


def _sync_frame(stderr: str) -> str:
    """The innermost repository line of the traceback of a sync the audit refused."""
    frames = [line.strip() for line in stderr.splitlines() if line.strip().startswith("File ") and str(ROOT) in line
              and "/.venv/" not in line]
    return frames[-1].replace(str(ROOT) + "/", "") if frames else "?"


def check_sync_audit(work: Path, dry: bool):
    photo_folder(work)
    cmd = command_lines(work)["v1_sync_audit"]
    res = run_command("v1_sync_audit", work, CHECKS["sync_audit"].seconds * SLOW - 5)
    steps = sizes()["n"] // int(cmd.argv[cmd.argv.index("--batch") + 1])
    if res.returncode != 0:
        line = error_line(res.stderr)
        where = f" at {_sync_frame(res.stderr)}" if "synchroniz" in res.stderr else ""
        return "FAIL", f"main.py under DEEPCLUSTER_SYNC_DEBUG=error: {line}{where}", {"stderr": res.stderr[-3000:]}
    return "PASS", (f"main.py, {steps} steps (audited from step 3), --amp, group of one (DDP + synced BN): no host "
                    f"sync outside the documented ones"), {"steps": steps, "audited": steps - 2}


def check_v2_cuda(work: Path, dry: bool):
    end = time.time() + CHECKS["v2_cuda"].seconds * SLOW - 5
    recs, why = runs(["v2_fp32", "v2_amp"], work, end - time.time())
    if recs is None:
        return "FAIL", why, {}
    killed = run_command("v2_killed", work, end - time.time())
    if killed.returncode not in (-9, 137):
        return "FAIL", f"v2 killed at step 3 exited {killed.returncode}, not SIGKILL: {error_line(killed.stderr)}", {}
    more, why = runs(["v2_resume"], work, end - time.time())
    if more is None:
        return "FAIL", why, {}
    recs.update(more)
    la, lb, lr = (recs[k]["train_loss"] for k in ("v2_fp32", "v2_amp", "v2_resume"))
    # AMP rounds the forward to float16 and GradScaler skips the first steps while its scale
    # falls to the gradients' range; cuDNN's kernels are not deterministic: the same recipe, not
    # the same bits (10% between fp32 and --amp); the resumed run lands with the uninterrupted one (5%)
    ok = all(x == x and abs(x) < 1e3 for x in (la, lb, lr)) and rel(lb, la) < 0.1 and rel(lb, lr) < 0.05
    amp = "--amp" if DEV == "cuda" else "fp32 (no --amp on the CPU)"
    return ("PASS" if ok else "FAIL"), (
        f"ResNet-{'50' if DEV == 'cuda' else '18'} multi-crop: loss fp32 {la:.4f}, {amp} {lb:.4f}, killed at step 3 "
        f"and resumed from the step-2 checkpoint {lr:.4f} (tolerances: 10% fp32 vs --amp, 5% resumed)"), recs


def check_v2_nccl_one(work: Path, dry: bool):
    wired = "SyncAudit" in (ROOT / "engine.py").read_text()  # both trainers' step loop
    recs, why = runs(["v2_group_of_one"], work, CHECKS["v2_nccl_one"].seconds * SLOW - 5)
    if recs is None:
        where = f" at {_sync_frame(why)}" if "synchroniz" in why else ""
        return "FAIL", why + where, {}
    audit = "steps audited for host syncs: none" if wired else \
        "not audited (engine.run_steps does not call distributed.SyncAudit)"
    return "PASS", (f"DeepCluster-v2 in a {'NCCL' if DEV == 'cuda' else 'gloo'} group of one (DDP, synced BN, "
                    f"sharded spherical k-means, bank gather): loss {recs['v2_group_of_one']['train_loss']:.4f}; "
                    f"{audit}"), {"audited": wired, **recs}


def check_pca(work: Path, dry: bool):
    import torch

    import pca

    dev = torch.device(DEV)
    n, d, k = (2048, 512, 64) if CPU else (8192, 4096, 256)
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.linalg.qr(torch.randn(d, d, generator=g).to(dev))[0]
    spectrum = (1.0 / torch.arange(1, d + 1, dtype=torch.float32)).sqrt().to(dev)   # 1/i variances
    x = (torch.randn(n, d, generator=g).to(dev) * spectrum) @ q.T                      # (N, D), N > D
    sync()
    t = time.perf_counter()
    cov = pca.covariance(x, x.mean(0), 4096)
    sync()
    t_cov = time.perf_counter() - t
    out = {}
    for solver in ("randomized", "exact"):
        t = time.perf_counter()
        evals, evecs, info = pca.top_eigh(cov, k, solver)
        sync()
        out[solver] = (evals, evecs, info, time.perf_counter() - t)
    (er, vr, info, tr), (ee, ve, _, te) = out["randomized"], out["exact"]
    val_err = float(((er - ee).abs() / ee).max())
    energy = float(torch.trace(vr.T @ cov @ vr) / torch.trace(ve.T @ cov @ ve))  # variance kept by the axes
    ok = info["solver"] == "randomized" and not info["fallback"] and val_err < 1e-3 and energy > 1 - 1e-4
    return ("PASS" if ok else "FAIL"), (
        f"N={n} > D={d}, top {k}, 1/i spectrum: randomized ({info['iterations']} iterations, {info['precision']}) "
        f"{tr:.2f} s vs exact {te:.2f} s (covariance {t_cov:.2f} s); eigenvalues within {val_err:.1e}, variance "
        f"kept {energy:.6f} of the exact axes'"), {"eig_rel_err": val_err, "energy_ratio": energy, "time_rand_s": tr,
                                                   "time_exact_s": te, "time_cov_s": t_cov, "info": info}


def check_decode_train(work: Path, dry: bool):
    recs, why = runs(["v1_decode_cpu", "v1_decode_gpu"], work, CHECKS["decode_train"].seconds * SLOW - 5)
    if recs is None:
        return "FAIL", why, {}
    agree = _labels_agree(work, "decode_cpu", "decode_gpu")
    la, lb = recs["v1_decode_cpu"]["train_loss"], recs["v1_decode_gpu"]["train_loss"]
    # same crop boxes and flips by construction; the pixels differ by nvJPEG's IDCT (about a
    # level): one epoch of SGD on them stays within 5% of the loss
    ok = agree >= 0.99 and rel(la, lb) < 0.05
    s = sizes()
    return ("PASS" if ok else "FAIL"), (
        f"{s['n']} JPEGs at {s['size']}, --deterministic: train loss --decode gpu {lb:.4f} vs cpu {la:.4f} (rel "
        f"{rel(la, lb):.1e}, tolerance 5e-2); epoch-0 clusters {agree:.1%} equal; train "
        f"{recs['v1_decode_gpu']['time_train']:.1f} s vs {recs['v1_decode_cpu']['time_train']:.1f} s"), \
        {"labels_equal": agree, "loss_rel_diff": rel(la, lb), **recs}


def _rate(fn, batch: int, n: int) -> float:
    for _ in range(2):   # cuDNN autotuning, allocations
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return n * batch / (time.perf_counter() - t)


def _convnet_row(arch: str, batch: int, size: int, cl: bool, amp: bool, rt=None) -> dict:
    """Extraction and training img/s and peak memory of one convnet at ``batch`` (``rt``: its
    BatchNorm layers synchronised over that process group, distributed.AllReduceBatchNorm)."""
    import torch

    import distributed
    import models

    dev = torch.device(DEV)
    torch.manual_seed(0)
    out = 100 if CPU else 10000  # the CPU stand-in only runs the code
    model = models.build_model(arch, sobel=arch != "resnet50", bn=True, out=out, input_size=size).to(dev)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=dev).float().div_(255)
    y = torch.randint(0, out, (batch,), device=dev)
    if cl:
        model, x = models.to_channels_last(model), x.contiguous(memory_format=torch.channels_last)
    if rt is not None:
        model = distributed.sync_batchnorm(model, True, rt)
    opt = torch.optim.SGD(model.body_parameters() + list(model.top_layer.parameters()), lr=0.01, momentum=0.9,
                          fused=True)
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)

    def extract():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            model.forward_features(x)

    def train():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.eval()
    ext = _rate(extract, batch, 1 if CPU else 8)
    model.train()
    tr = _rate(train, batch, 1 if CPU else 8)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if DEV == "cuda" else float("nan")
    name = f"{arch}{' channels-last' if cl else ''}{' amp bf16' if amp else ''}{' synced BN' if rt else ''}"
    return {"config": name, "batch": batch,
            "extract_img_s": ext, "train_img_s": tr, "peak_gib": peak}


def _v2_row(batch: int) -> dict:
    """DeepCluster-v2's recipe (ResNet-50, 2x224 + 6x96 crops, 3 x 3000 prototypes, --amp):
    training img/s and peak memory of one process at ``batch`` images."""
    import torch

    from models.deepclusterv2 import DeepClusterV2Net, dcv2_loss

    dev = torch.device(DEV)
    crops = [(2, 224), (6, 96)] if not CPU else [(2, 32), (1, 16)]
    k = 30 if CPU else 3000
    model = DeepClusterV2Net("resnet50" if not CPU else "resnet18", nmb_prototypes=[k] * 3).to(dev)
    xs = [torch.rand(batch, 3, s, s, device=dev) for n, s in crops for _ in range(n)]
    targets = torch.randint(0, k, (3, batch), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(DEV, enabled=DEV == "cuda")
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.float16, enabled=DEV == "cuda"):
            _, out = model(xs)
        loss = dcv2_loss([o.float() for o in out], targets, len(xs), 0.1)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    rate = _rate(step, batch, 1 if CPU else 5)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if DEV == "cuda" else float("nan")
    return {"config": f"v2 {'+'.join(f'{n}x{s}' for n, s in crops)} amp fp16", "batch": batch,
            "extract_img_s": float("nan"), "train_img_s": rate, "peak_gib": peak}


def check_memory(work: Path, dry: bool):
    import torch

    import distributed

    torch.backends.cudnn.benchmark = True
    batch, size = (4, 64) if CPU else (256, 224)
    rows = [_convnet_row("alexnet", batch, size, cl, False) for cl in (False, True)]
    rows += [_convnet_row(arch, batch, size, False, False) for arch in ("vgg16", "resnet50")]  # the paper's batch
    rows += [_convnet_row("resnet50", batch, size, True, True), _v2_row(2 if CPU else 64)]
    # the all-reduce BatchNorm (its float64 two-pass statistics) against cuDNN's, in a group of one
    os.environ["DEEPCLUSTER_FORCE_DISTRIBUTED"] = "1"
    rows.append(_convnet_row("resnet50", batch, size, False, False, rt=distributed.init_runtime(DEV)))
    cl_gain = rows[1]["train_img_s"] / rows[0]["train_img_s"]
    bn_cost = rows[3]["train_img_s"] / rows[-1]["train_img_s"]
    text = "; ".join(f"{r['config']} {r['train_img_s']:.0f} img/s {r['peak_gib']:.1f} GiB" for r in rows)
    return "PASS", (f"training at batch {batch} ({size} px), peak memory: {text}; channels-last AlexNet "
                    f"{cl_gain:.2f}x of NCHW; ResNet-50 with the synced BatchNorm {bn_cost:.2f}x slower"), \
        {"rows": rows, "channels_last_train_speedup": cl_gain, "synced_bn_slowdown": bn_cost}


def check_loader(work: Path, dry: bool):
    import torch

    import clustering
    import data
    import gpu_decode

    n = 16 if dry else 48 if CPU else 2048
    root = photo_folder(work, n, (375, 500))  # ImageNet-like 500x375 JPEGs
    ds, workers = data.IndexedImageFolder(root), max(1, os.cpu_count() or 1)
    out = {}
    tfs = {"pil": (data.train_transform(224, normalize=False), None)}
    if hasattr(data, "EncodedImages") and hasattr(data, "CollateEncoded"):  # --decode gpu: the workers' part
        tfs["bytes"] = (gpu_decode.EncodedCrop(224), gpu_decode.CollateEncoded(224))
    for name, (tf, collate) in tfs.items():
        src = gpu_decode.EncodedImages(ds) if name == "bytes" else ds  # the training set of main.py, one cluster
        loader = torch.utils.data.DataLoader(clustering.cluster_assign([list(range(n))], src, tf),
                                             batch_size=8 if n < 100 else 64, num_workers=workers, collate_fn=collate)
        t = time.perf_counter()
        seen = 0
        for i, batch in enumerate(loader):
            if i == 0:  # worker start-up excluded
                t, seen = time.perf_counter(), 0
            else:
                seen += len(batch[0])
        out[name] = seen / max(time.perf_counter() - t, 1e-9)
    text = ", ".join(f"{k} {v:.0f} img/s" for k, v in out.items())
    return "PASS", f"{n} JPEGs 500x375 -> 224 crops, {workers} workers: {text} (pil: --decode cpu; bytes: the " \
                   f"--decode gpu workers)", {"img_s": out, "workers": workers, "images": n}


def _pil_and_twin(n_images: int, size: int, work: Path, device):
    """Per image and seed: the PIL path's crop and the --decode gpu path's crop on ``device``
    (same boxes by construction); returns (max abs diff, mean abs diff, images)."""
    import torch

    import clustering
    import data
    import gpu_decode

    ds = data.IndexedImageFolder(photo_folder(work, n_images, (375, 500)))
    enc = gpu_decode.EncodedImages(ds)
    pil_tf, crop = data.train_transform(size, normalize=False), gpu_decode.EncodedCrop(size)
    ref, samples = [], []
    for idx in range(len(ds)):
        seed = 1000 + idx
        ref.append(clustering._apply(pil_tf, ds.load(idx), seed))
        samples.append(clustering._apply(crop, enc.load(idx), seed))
    got = gpu_decode.EncodedBatch(samples, size).decode(torch.device(device)).cpu()
    diff = (torch.stack(ref).int() - got.int()).abs()
    return int(diff.max()), float(diff.float().mean()), len(ds)


def check_decode_cpu_twin(work: Path, dry: bool):
    mx, mean, n = _pil_and_twin(8 if dry else 32, 64 if dry else 224, work, "cpu")
    ok = mx <= 1 and mean < 0.25  # same libjpeg-turbo decode; only the resize rounding differs
    return ("PASS" if ok else "FAIL"), f"{n} JPEGs, torchvision on CPU vs PIL: max {mx}, mean {mean:.3f} levels", \
        {"max_abs": mx, "mean_abs": mean}


def check_decode_gpu(work: Path, dry: bool):
    import torch

    import data
    import gpu_decode

    mx, mean, n = _pil_and_twin(32, 224, work, DEV)
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by about a level per
    # pixel; the crop box, the flip and the resize arithmetic are the same
    ok = mean < 2.0
    ds = data.IndexedImageFolder(photo_folder(work, 32, (375, 500)))
    enc, crop = gpu_decode.EncodedImages(ds), gpu_decode.EncodedCrop(224)
    batch = gpu_decode.EncodedBatch([crop(enc.load(i % len(ds))) for i in range(256 if not CPU else 32)], 224)
    rate = _rate(lambda: batch.decode(torch.device(DEV)), len(batch), 1 if CPU else 3)
    return ("PASS" if ok else "FAIL"), (f"nvJPEG vs PIL on {n} JPEGs: max {mx}, mean {mean:.3f} levels; "
                                        f"{rate:.0f} img/s decoded, cropped and resized on the device"), \
        {"max_abs": mx, "mean_abs": mean, "decode_img_s": rate}


def check_kmeans(work: Path, dry: bool):
    import numpy as np
    import torch

    import clustering

    rng = np.random.RandomState(0)
    n, d, k = (4000, 128, 20) if CPU else (20000, 512, 100)
    centres = rng.randn(k, d).astype(np.float32) * 2
    x = centres[rng.randint(0, k, n)] + rng.randn(n, d).astype(np.float32)
    out = {}
    for dev in ("cpu", DEV):
        km = clustering.Kmeans(k, backend="torch", pca=64, device=torch.device(dev), seed=7)
        t = time.perf_counter()
        loss = km.cluster(x)
        out[dev] = (float(loss), clustering.arrange_clustering(km.images_lists), time.perf_counter() - t)
    same = float((out["cpu"][1] == out[DEV][1]).mean())
    r = rel(out["cpu"][0], out[DEV][0])
    ok = same > 0.95 and r < 0.01
    return ("PASS" if ok else "FAIL"), (f"{n}x{d}, k={k}: labels equal on {same:.1%} of the rows (GPU vs CPU), "
                                        f"objective differs by {r:.1e}; {out['cpu'][2]:.1f} s CPU, "
                                        f"{out[DEV][2]:.2f} s GPU"), \
        {"labels_equal": same, "objective_rel_diff": r, "time_cpu_s": out["cpu"][2], "time_gpu_s": out[DEV][2]}


def check_torchrun2(work: Path, dry: bool):
    import torch

    if DEV == "cuda" and torch.cuda.device_count() < 2:
        return "SKIP", f"{torch.cuda.device_count()} GPU: two NCCL processes need two", {}
    recs, why = runs(["v1_torchrun2"], work, CHECKS["torchrun2"].seconds * SLOW - 5)
    if recs is None:
        return "FAIL", why, {}
    rec = recs["v1_torchrun2"]
    return "PASS", (f"launch.py --nproc_per_node=2, --decode gpu: epoch 0 train loss {rec['train_loss']:.3f}, "
                    f"world size {rec['world_size']}"), rec


def check_cuda_tests(work: Path, dry: bool):
    # -o addopts=: pytest.ini's --timeout needs the pytest-timeout plugin, which the box may lack
    res = run_boxed([python_exe(), "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-o", "addopts=",
                     "tests"], CHECKS["cuda_tests"].seconds * SLOW - 10, cwd=ROOT, env=child_env(work))
    last = (res.stdout.strip().splitlines() or ["no output"])[-1]
    status = "PASS" if res.returncode == 0 and "passed" in last else "FAIL"
    return status, f"pytest -m cuda: {last}", {"tail": res.stdout[-2000:] + res.stderr[-1000:]}


RUNNERS = {name: globals()[f"check_{name}"] for name in CHECKS}


def preflight(work: Path) -> dict:
    """Every command line parsed by its script's parser before anything runs."""
    bad = {}
    for dev in ("cuda", "cpu"):
        for name, cmd in command_lines(work, dev).items():
            try:
                parse_command(cmd)
            except BaseException as e:  # SystemExit(2) from argparse, ScriptError from check_args
                bad[f"{name} ({dev})"] = f"{type(e).__name__}: {e}"
    n = 2 * len(command_lines(work))
    return {"status": "FAIL", "detail": f"{len(bad)} of {n} command lines refused: {bad}"} if bad else \
        {"status": "PASS", "detail": f"{n} command lines (main.py, main_deepclusterv2.py, launch.py) parsed by the "
                                     f"scripts' own parsers"}


def skip_reason(check: Check, has_cuda: bool, dry: bool, missing: list[str]) -> str | None:
    if check.cuda and not has_cuda:
        return f"needs CUDA ({check.cuda}): " + ("dry run" if dry else "no CUDA device")
    if check.cuda and CPU and "CUDA-only" in check.cuda:
        return f"CUDA-only ({check.cuda}), GPU_CHECK_DEVICE=cpu"
    lacking = [m for m in check.needs if m in missing]
    return f"needs {', '.join(lacking)} (not installed)" if lacking else None
