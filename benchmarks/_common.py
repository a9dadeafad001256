"""Shared helpers of the benchmarks: environment record, RSS sampling, tables, JSON."""
from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict:
    """What the numbers were measured on (hardware, versions, machine load)."""
    env = {
        "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 2 ** 30, 1),
        "device": str(device), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
    }
    try:
        import faiss
        env["faiss"] = faiss.__version__
    except ImportError:  # pragma: no cover
        env["faiss"] = None
    return env


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but CUDA is not available")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, reps: int) -> float:
    fn()  # warm-up: first-call allocation and kernel selection
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_peak(n: int = 2048, reps: int = 10, dtype=torch.float32) -> float:
    """GFLOP/s of an (n x n) @ (n x n) product, best of ``reps`` (on a shared VM a single product
    can run at 3/4 of the machine's speed; the benchmarks measure again at the end of a run and
    keep the larger value). This is the BLAS library's speed, not the machine's: on the AMD EPYC
    of our measurements MKL's sgemm reached 134-185 GFLOP/s and oneDNN's convolutions 245-248."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / _best_seconds(lambda: a @ b, reps) / 1e9


def conv_peak(quick: bool = False, reps: int = 10) -> float:
    """GFLOP/s of a channels-last float32 3x3 convolution shaped like AlexNet's conv4 (batch 64,
    384 -> 384 channels, 13 x 13, padding 1), forward only, best of ``reps``."""
    b, c, hw = (8, 128, 13) if quick else (64, 384, 13)
    x = torch.randn(b, c, hw, hw).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c, 3, 3).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        sec = _best_seconds(lambda: torch.nn.functional.conv2d(x, w, padding=1), reps)
    return 2 * b * hw * hw * c * c * 9 / sec / 1e9


def fp32_peak(quick: bool = False) -> dict:
    """The fastest float32 throughput measured on this machine, in GFLOP/s: the larger of a
    square GEMM (n = 2048 and 4096) and a convolution (``conv_peak``). A limit derived from it is
    a floor no float32 implementation beats; the GEMM alone understates it when the convolution
    kernels are faster than the BLAS."""
    gemm = max(gemm_peak(256 if quick else 2048), gemm_peak(512 if quick else 4096, reps=3))
    conv = conv_peak(quick)
    return {"gemm_gflops": gemm, "conv_gflops": conv, "peak_gflops": max(gemm, conv)}


class PeakRSS:
    """Context manager sampling this process's RSS every ``interval`` s in a thread.

    ``peak_mb`` is the highest sample (and the end value), ``start_mb`` the RSS on entry:
    ``peak_mb - start_mb`` is what the measured block added at its peak. GPU peak memory is
    read from ``torch.cuda.max_memory_allocated`` when on CUDA.
    """

    def __init__(self, device: torch.device | None = None, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.proc = psutil.Process(os.getpid())

    def __enter__(self):
        self.start_mb = self.peak_mb = self.proc.memory_info().rss / 2 ** 20
        self._stop = threading.Event()
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.proc.memory_info().rss / 2 ** 20)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        self.peak_mb = max(self.peak_mb, self.proc.memory_info().rss / 2 ** 20)
        self.gpu_peak_mb = (torch.cuda.max_memory_allocated(self.device) / 2 ** 20
                            if self.device is not None and self.device.type == "cuda" else None)
        return False


def fmt(v, width: int = 10) -> str:
    if v is None:
        s = "-"
    elif isinstance(v, bool):
        s = "yes" if v else "no"
    elif isinstance(v, float):
        a = abs(v)
        s = f"{v:.3g}" if (a != 0 and (a < 0.01 or a >= 1e5)) else f"{v:.3f}" if a < 10 else f"{v:.1f}"
    else:
        s = str(v)
    return s.rjust(width)


def print_table(rows: list[dict], cols: list[tuple[str, str]], title: str = "") -> str:
    """Print rows as a fixed-width table; cols = [(key, header)]. Returns the text."""
    widths = [max(len(h), *(len(fmt(r.get(k), 0).strip()) for r in rows)) + 2 for k, h in cols]
    lines = []
    if title:
        lines.append(title)
    lines.append("".join(h.rjust(w) for (_, h), w in zip(cols, widths)))
    lines.append("-" * sum(widths))
    for r in rows:
        lines.append("".join(fmt(r.get(k), w) for (k, _), w in zip(cols, widths)))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, p)
    print(f"wrote {p}")


# ---------------------------------------------------------------------------------------
# speed-ups timed by the benchmarks, and memory probes
# ---------------------------------------------------------------------------------------
def autocast(device, enabled: bool = True, dtype: torch.dtype = torch.bfloat16):
    """bfloat16 autocast on ``device`` (CPU or CUDA) when enabled, else a no-op context."""
    import contextlib
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def maybe_compile(model, enabled: bool = True, mode: str | None = None):
    """``torch.compile(model)`` when enabled, else the model itself (compiled lazily, at the
    first call; the wrapper shares the parameters of ``model``)."""
    return torch.compile(model, mode=mode) if enabled else model


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss, KiB on Linux)."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def reset_peak_memory(device=None) -> None:
    dev = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (dev is None or dev.type == "cuda"):
        torch.cuda.reset_peak_memory_stats(dev)


def memory_snapshot(device=None) -> dict:
    """{'rss_mb', 'peak_rss_mb', 'gpu_peak_mb'} (gpu_peak_mb None without CUDA)."""
    rss = psutil.Process(os.getpid()).memory_info().rss
    gpu = None
    dev = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (dev is None or dev.type == "cuda"):
        gpu = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return {"rss_mb": rss / 2 ** 20, "peak_rss_mb": peak_rss_bytes() / 2 ** 20, "gpu_peak_mb": gpu}
