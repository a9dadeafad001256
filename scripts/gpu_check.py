"""The first minutes on a GPU box: does every CUDA path of this repository work, and how fast?

Usage:
    scripts/gpu_check.sh                 # one GPU, under 8 minutes, no network, installs nothing
    scripts/gpu_check.sh --dry-run       # no GPU needed: every check that needs CUDA says SKIP
    python3 scripts/gpu_check.py --only decode --only clustering

Each check runs in its own process under a time box (a hung CUDA call cannot stall the rest)
and prints one line ``PASS|FAIL|SKIP name: detail``; then a throughput table (AlexNet at 224:
extraction and training img/s, fp32 / channels-last / --amp, peak GPU memory). Everything goes
to ``benchmarks/results/gpu_check.json`` (``gpu_check_dryrun.json`` for a dry run). Exit
status 1 when a check failed. The data is made here (scikit-learn's digits, synthetic JPEG
photos, synthetic features) in a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (seconds allowed, needs CUDA); in the order they run
CHECKS = {
    "environment": (60, False),
    "decode_cpu_twin": (60, False),
    "cuda_tests": (120, True),
    "decode_gpu": (60, True),
    "clustering": (60, True),
    "demo_cuda_vs_cpu": (150, True),
    "torchrun": (90, True),
    "throughput": (150, True),
}
TOTAL_BUDGET = 450.0  # seconds for all checks: the script ends inside 8 minutes
# the device of the CUDA checks; GPU_CHECK_DEVICE=cpu runs their code on the CPU (to test this
# script without a GPU: slow, and the numbers mean nothing)
DEV = os.environ.get("GPU_CHECK_DEVICE", "cuda")


def sync() -> None:
    import torch
    if DEV == "cuda":
        torch.cuda.synchronize()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="PASS/FAIL/SKIP of every CUDA path, and GPU throughput")
    g = p.add_argument_group("what to run")
    g.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="no GPU: checks that need CUDA report SKIP, the others run (tiny sizes)")
    g.add_argument("--only", action="append", choices=list(CHECKS), default=None, help="run only these checks")
    g.add_argument("--budget", type=float, default=TOTAL_BUDGET, help="seconds for all the checks together")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="JSON file (default benchmarks/results/gpu_check[_dryrun].json)")
    g.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one check in this process
    g.add_argument("--work", default=None, help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------------------
# shared data
# ---------------------------------------------------------------------------------------

def photo_folder(work: Path, n: int, size: tuple[int, int] = (375, 500)) -> Path:
    """``n`` JPEG photos (quality 90) in 4 class folders; made once per work folder."""
    import data

    root = work / f"photos{n}"
    if not (root / ".complete").exists():
        for i in range(n):
            d = root / f"c{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            data.synthetic_photo(size[0] + 7 * (i % 5), size[1] - 11 * (i % 3), i).save(d / f"{i:04d}.jpg", quality=90)
        (root / ".complete").write_text("")
    return root


def digits_folder(work: Path, per_class: int) -> Path:
    """The first ``per_class`` of each of scikit-learn's digits, as PNGs at 32 px."""
    import shutil

    import data

    full = Path(data.export_digits(work / "digits_all", size=32))
    root = work / f"digits{per_class}"
    if not root.exists():
        for cls in sorted(p for p in full.iterdir() if p.is_dir()):
            (root / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:per_class]:
                shutil.copy(f, root / cls.name / f.name)
    return root


def python_exe() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run_boxed(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a session of its own: on timeout the whole process group (the
    command and what it started: torchrun's workers, loader workers) is killed, by its id."""
    import signal

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
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


def run_main(argv: list[str], timeout: float, torchrun: int = 0) -> subprocess.CompletedProcess:
    """main.py as a user runs it (a subprocess, from the repository root)."""
    cmd = [python_exe()]
    if torchrun:
        cmd += [str(ROOT / "launch.py"), f"--nproc_per_node={torchrun}", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}"]
    return run_boxed(cmd + ["main.py", *argv], timeout, cwd=ROOT)


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


# ---------------------------------------------------------------------------------------
# the checks: each returns (status, detail, numbers)
# ---------------------------------------------------------------------------------------
def check_environment(work: Path, dry: bool):
    import importlib

    found, missing = {}, []
    for mod in ("torch", "torchvision", "numpy", "PIL", "sklearn", "scipy", "tqdm", "pytest", "faiss"):
        try:
            found[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception:
            missing.append(mod)
    import torch

    info = {"versions": found, "missing": missing, "cuda_available": torch.cuda.is_available(),
            "cuda_build": torch.version.cuda, "python": sys.executable}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    required = [m for m in missing if m not in ("faiss", "pytest")]
    detail = (f"torch {found.get('torch')}, torchvision {found.get('torchvision')}, "
              f"{info.get('gpu', 'no GPU')}; missing: {', '.join(missing) or 'nothing'}")
    return ("FAIL" if required else "PASS"), detail, info


def _pil_and_twin(n_images: int, size: int, work: Path, device):
    """Per image and seed: the PIL path's crop and the --decode gpu path's crop on ``device``
    (same boxes by construction); returns (max abs diff, mean abs diff, boxes equal)."""
    import torch

    import clustering
    import data

    ds = data.IndexedImageFolder(photo_folder(work, n_images))
    enc = data.EncodedImages(ds)
    pil_tf, crop = data.train_transform(size, normalize=False), data.EncodedCrop(size)
    ref, samples = [], []
    for idx in range(len(ds)):
        seed = 1000 + idx
        ref.append(clustering._apply(pil_tf, ds.load(idx), seed))
        samples.append(clustering._apply(crop, enc.load(idx), seed))
    got = data.EncodedBatch(samples, size).decode(torch.device(device)).cpu()
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

    mx, mean, n = _pil_and_twin(32, 224, work, DEV)
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by about a level per
    # pixel; the crop box, the flip and the resize arithmetic are the same
    ok = mean < 2.0
    ds = data.IndexedImageFolder(photo_folder(work, 32))
    enc, crop = data.EncodedImages(ds), data.EncodedCrop(224)
    samples = [crop(enc.load(i % len(ds))) for i in range(256)]
    batch = data.EncodedBatch(samples, 224)
    batch.decode(torch.device(DEV))
    sync()
    t = time.perf_counter()
    for _ in range(3):
        batch.decode(torch.device(DEV))
    sync()
    gpu_rate = 3 * 256 / (time.perf_counter() - t)
    t = time.perf_counter()
    tf = data.train_transform(224, normalize=False)
    for i in range(64):
        tf(ds.load(i % len(ds)))
    pil_rate = 64 / (time.perf_counter() - t)
    return ("PASS" if ok else "FAIL"), (f"nvJPEG vs PIL on {n} JPEGs: max {mx}, mean {mean:.3f} levels; "
                                        f"{gpu_rate:.0f} img/s on the GPU vs {pil_rate:.0f} img/s PIL on one core"), \
        {"max_abs": mx, "mean_abs": mean, "gpu_decode_img_s": gpu_rate, "pil_one_core_img_s": pil_rate}


def check_cuda_tests(work: Path, dry: bool):
    try:
        import pytest  # noqa: F401
    except ImportError:
        return "SKIP", "pytest is not installed in this python", {}
    # -o addopts=: pytest.ini's --timeout needs the pytest-timeout plugin, which the box may lack
    res = run_boxed([python_exe(), "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-o", "addopts=",
                     "tests"],
                    CHECKS["cuda_tests"][0] - 10, cwd=ROOT)
    last = (res.stdout.strip().splitlines() or ["no output"])[-1]
    status = "PASS" if res.returncode == 0 and "passed" in last else "FAIL"
    return status, f"pytest -m cuda: {last}", {"tail": res.stdout[-2000:] + res.stderr[-1000:]}


def check_clustering(work: Path, dry: bool):
    import numpy as np
    import torch

    import clustering

    rng = np.random.RandomState(0)
    n, d, k = 20000, 512, 100
    centres = rng.randn(k, d).astype(np.float32) * 2
    x = centres[rng.randint(0, k, n)] + rng.randn(n, d).astype(np.float32)
    out = {}
    for dev in ("cpu", DEV):
        km = clustering.Kmeans(k, backend="torch", pca=64, device=torch.device(dev), seed=7)
        t = time.perf_counter()
        loss = km.cluster(x)
        out[dev] = (float(loss), clustering.arrange_clustering(km.images_lists), time.perf_counter() - t)
    nmi = clustering.nmi(out["cpu"][1], out[DEV][1])
    rel = abs(out["cpu"][0] - out[DEV][0]) / abs(out["cpu"][0])
    ok = nmi > 0.95 and rel < 0.01
    return ("PASS" if ok else "FAIL"), (f"{n}x{d}, k={k}: NMI(GPU, CPU) {nmi:.4f}, objective differs by {rel:.2e}; "
                                        f"{out['cpu'][2]:.1f} s CPU, {out[DEV][2]:.2f} s GPU"), \
        {"nmi": nmi, "objective_rel_diff": rel, "time_cpu_s": out["cpu"][2], "time_gpu_s": out[DEV][2]}


def check_demo_cuda_vs_cpu(work: Path, dry: bool):
    from sklearn.metrics import adjusted_rand_score

    import numpy as np

    digits = digits_folder(work, 20)  # 200 images
    recs, clusters = {}, {}
    for dev in (DEV, "cpu"):
        exp = work / f"demo_{dev}"
        res = run_main([str(digits), "--exp", str(exp), "--overwrite", "--device", dev, "--size", "64", "--k", "10",
                        "--pca", "32", "--batch", "32", "--workers", "2", "--epochs", "1", "--sobel", "--no_progress",
                        "--cluster_backend", "torch", "--deterministic"], timeout=CHECKS["demo_cuda_vs_cpu"][0] / 2 - 5)
        if res.returncode != 0:
            return "FAIL", f"main.py --device {dev} exited {res.returncode}: {error_line(res.stderr)}", \
                {"stderr": res.stderr[-2000:]}
        recs[dev] = read_log(exp)[-1]
        clusters[dev] = np.load(exp / "clusters" / "epoch_00000.npy", allow_pickle=False)
    ari = adjusted_rand_score(clusters["cpu"], clusters[DEV])
    la, lb = recs["cpu"]["train_loss"], recs[DEV]["train_loss"]
    rel = abs(la - lb) / abs(la)
    ok = ari > 0.95 and rel < 0.02
    return ("PASS" if ok else "FAIL"), (f"200 digits, --deterministic: epoch-0 clusters ARI {ari:.4f}, train loss "
                                        f"{lb:.4f} (CUDA) vs {la:.4f} (CPU)"), {"ari": ari, "loss_rel_diff": rel}


def check_torchrun(work: Path, dry: bool):
    photos = photo_folder(work, 64, size=(180, 240))
    exp = work / "torchrun"
    res = run_main([str(photos), "--exp", str(exp), "--overwrite", "--device", DEV, "--size", "224", "--k", "8",
                    "--pca", "16", "--batch", "32", "--workers", "4", "--epochs", "1", "--no_progress",
                    "--decode", "gpu", "--knn_every", "0"], timeout=CHECKS["torchrun"][0] - 10, torchrun=1)
    if res.returncode != 0:
        return "FAIL", f"torchrun exited {res.returncode}: {error_line(res.stderr)}", {"stderr": res.stderr[-3000:]}
    rec = read_log(exp)[-1]
    return "PASS", (f"torchrun --nproc_per_node=1, --decode gpu, 64 JPEGs at 224: epoch 0 train loss "
                    f"{rec['train_loss']:.3f} (one process: no process group; NCCL collectives need 2+ GPUs)"), rec


def check_throughput(work: Path, dry: bool):
    import torch

    import models

    dev = torch.device(DEV)
    torch.backends.cudnn.benchmark = True
    cuda = dev.type == "cuda"
    batch, rows = 256 if DEV == "cuda" else 16, []
    x8 = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 10000, (batch,), device=dev)
    for name, cl, amp in (("fp32", False, False), ("fp32 channels-last", True, False),
                          ("amp bf16", False, True), ("amp bf16 channels-last", True, True)):
        torch.manual_seed(0)
        model = models.alexnet(sobel=True, bn=True, out=10000, input_size=224).to(dev)
        x = x8.float().div_(255)
        if cl:
            model, x = models.to_channels_last(model), x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.body_parameters() + list(model.top_layer.parameters()), lr=0.01, momentum=0.9,
                              fused=True)
        if cuda:
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

        rate = {}
        for what, fn in (("extract", extract), ("train", train)):
            model.train(what == "train")
            for _ in range(3 if cuda else 1):
                fn()
            sync()
            t, n = time.perf_counter(), 10 if cuda else 1
            for _ in range(n):
                fn()
            sync()
            rate[what] = n * batch / (time.perf_counter() - t)
        rows.append({"config": name, "extract_img_s": rate["extract"], "train_img_s": rate["train"],
                     "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else float("nan")})
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    cl_gain = rows[1]["train_img_s"] / rows[0]["train_img_s"]
    return "PASS", (f"AlexNet 224, batch {batch}: fp32 train {rows[0]['train_img_s']:.0f} img/s; channels-last "
                    f"{cl_gain:.2f}x of NCHW for training (auto keeps it off on CUDA unless > 1.05x)"), \
        {"rows": rows, "channels_last_train_speedup": cl_gain}


RUNNERS = {name: globals()[f"check_{name}"] for name in CHECKS}


# ---------------------------------------------------------------------------------------
def run_one(name: str, work: Path, dry: bool) -> None:
    """Child process: run a check, print its result as the last line (JSON)."""
    try:
        status, detail, numbers = RUNNERS[name](work, dry)
    except Exception as e:  # a crash is a FAIL with its reason, not a traceback in the table
        import traceback
        status, detail, numbers = "FAIL", f"{type(e).__name__}: {e}".splitlines()[0][:300], \
            {"traceback": traceback.format_exc()[-3000:]}
    print(json.dumps({"status": status, "detail": detail, "numbers": numbers}, default=str))


def cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def table(rows: list[dict]) -> str:
    lines = ["| config | extraction img/s | training img/s | peak GPU memory GiB |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['extract_img_s']:.0f} | {r['train_img_s']:.0f} | {r['peak_gib']:.2f} |"
              for r in rows]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.one:
        run_one(args.one, Path(args.work), args.dry_run)
        return 0
    start = time.time()
    has_cuda = (cuda_available() or DEV == "cpu") and not args.dry_run
    names = [n for n in CHECKS if args.only is None or n in args.only]
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for name in names:
            limit, needs_cuda = CHECKS[name]
            left = args.budget - (time.time() - start)
            if needs_cuda and not has_cuda:
                res = {"status": "SKIP", "detail": "dry run" if args.dry_run else "no CUDA device"}
            elif left < 15:
                res = {"status": "SKIP", "detail": f"time budget spent ({args.budget:.0f} s)"}
            else:
                t = time.time()
                try:
                    p = run_boxed([python_exe(), str(Path(__file__).resolve()), "--one", name, "--work", work]
                                  + (["--dry-run"] if args.dry_run else []), min(limit, left), cwd=ROOT)
                    out = p.stdout.strip().splitlines()
                    res = json.loads(out[-1]) if out and out[-1].startswith("{") else \
                        {"status": "FAIL", "detail": f"exit {p.returncode}: " + (p.stderr.strip().splitlines()
                                                                                 or ["no output"])[-1][:300]}
                except subprocess.TimeoutExpired:
                    res = {"status": "FAIL", "detail": f"timed out after {min(limit, left):.0f} s"}
                res["seconds"] = round(time.time() - t, 1)
            results[name] = res
            print(f"{res['status']} {name}: {res['detail']}", flush=True)
    rows = (results.get("throughput", {}).get("numbers") or {}).get("rows")
    if rows:
        print("\n" + table(rows))
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        "gpu_check_dryrun.json" if args.dry_run else "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "gpu_check", "dry_run": args.dry_run, "seconds": round(time.time() - start, 1),
                               "checks": results}, indent=1, default=str))
    failed = [n for n, r in results.items() if r["status"] == "FAIL"]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks did not fail; "
          f"{time.time() - start:.0f} s; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
