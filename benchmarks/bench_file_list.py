"""Memory and build time of a ``--file_list`` index (file_list.FileList) against a Python list of paths.

Usage:
    python benchmarks/bench_file_list.py                          # 10,000,000 generated lines
    python benchmarks/bench_file_list.py --lines 1000000 --workers 2 --out benchmarks/results/cpu_file_list.json

A list of ``--lines`` paths (with a label after a tab, like ``train/n01440764/n01440764_10026.JPEG``)
is generated once (no images needed). For each index: the build time from the file, the memory it
adds to the parent, and, for each of ``--workers`` forked processes that read every path of their
share (as DataLoader workers do, images r, r + W, ...), the private memory the worker gains
(Private_Clean + Private_Dirty of /proc/self/smaps_rollup: the pages copied from the parent).
A Python list of N str is touched by every access (reference counts), so its pages are copied
into each worker; the numpy buffers of file_list.FileList are only read, so they stay shared.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, environment, print_table, write_json  # noqa: E402

sys.path.insert(0, str(ROOT))

import file_list  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lines", type=int, default=10_000_000, help="number of lines of the generated list")
    p.add_argument("--workers", type=int, default=2, help="forked readers (DataLoader workers)")
    p.add_argument("--out", default=None, help="JSON output path")
    return p


def private_bytes() -> int:
    """Pages of this process not shared with any other (copied on write or allocated here)."""
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def generate(path: Path, n: int) -> None:
    """n lines ``train/nXXXXXXXX/nXXXXXXXX_<i>.JPEG<TAB>nXXXXXXXX`` (1,000 classes), in chunks."""
    with open(path, "w") as f:
        for s in range(0, n, 1_000_000):
            f.write("".join(f"train/n{(i % 1000):08d}/n{(i % 1000):08d}_{i}.JPEG\tn{(i % 1000):08d}\n"
                            for i in range(s, min(n, s + 1_000_000))))


def python_list(path: Path) -> list[str]:
    """The Python-object index: one str per image (as a walked folder gives)."""
    root = str(path.parent)
    with open(path) as f:
        return [os.path.join(root, line.rstrip("\n").rsplit("\t", 1)[0]) for line in f]


def worker_growth(index, workers: int) -> list[int]:
    """Private bytes each forked reader gains reading its share of ``index``."""
    pids = []
    rfds = []
    for w in range(workers):
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: read every path of its share, report the pages it now owns
            os.close(r)
            before = private_bytes()
            n = 0
            for i in range(w, len(index), workers):
                n += len(index[i])
            os.write(wfd, str(private_bytes() - before).encode())
            os._exit(0)
        os.close(wfd)
        pids.append(pid)
        rfds.append(r)
    out = []
    for pid, r in zip(pids, rfds):
        out.append(int(os.read(r, 64).decode()))
        os.close(r)
        os.waitpid(pid, 0)
    return out


def main(args: argparse.Namespace) -> dict:
    import gc

    import torch
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "list.txt"
        t0 = time.perf_counter()
        generate(path, args.lines)
        print(f"generated {args.lines:,} lines ({path.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        for name, build in (("numpy (file_list.FileList)", lambda: file_list.FileList(path)),
                            ("python list of str", lambda: python_list(path))):
            gc.collect()
            base = rss_bytes()
            t0 = time.perf_counter()
            index = build()
            secs = time.perf_counter() - t0
            held = rss_bytes() - base
            t0 = time.perf_counter()
            growth = worker_growth(index, args.workers)
            rows.append({"index": name, "lines": len(index), "build_s": secs, "parent_gib": held / 2**30,
                         "worker_growth_mib": [g / 2**20 for g in growth],
                         "max_worker_growth_mib": max(growth) / 2**20, "read_s": time.perf_counter() - t0})
            print(rows[-1], flush=True)
            del index
    print_table(rows, [("index", "index"), ("lines", "lines"), ("build_s", "build s"), ("parent_gib", "parent GiB"),
                       ("max_worker_growth_mib", "worker growth MiB"), ("read_s", "read s")],
                title=f"--file_list index, {args.workers} forked readers")
    payload = {"benchmark": "file_list", "args": vars(args), "environment": environment(torch.device("cpu")),
               "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main(get_args_parser().parse_args())
