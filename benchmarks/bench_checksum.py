"""Cost of the checkpoint checksum (fileio.payload_digest) against the save and load it guards.

Usage:
    python benchmarks/bench_checksum.py                                   # the three payloads below
    python benchmarks/bench_checksum.py --payloads alexnet64 --out benchmarks/results/cpu_checksum.json
    python benchmarks/bench_checksum.py --scale 0.01 --reps 1             # seconds, the test suite's run

Payloads, shaped as the real checkpoints (random values; the digest's cost depends on the bytes only):
* ``alexnet64``: AlexNet-Sobel at 64 px, weights and SGD momentum (the 173 MB checkpoints of the tests);
* ``alexnet224``: AlexNet-Sobel at 224 px with the ImageNet head (k = 10,000), weights and momentum;
* ``v2bank``: DeepCluster-v2's ImageNet memory bank (2 crops x 1,281,167 images x 128 float32,
  1.3 GB) with its index, and a ResNet-50's weights and momentum.

Per payload: ``torch.save`` to a file (the baseline of a write), the digest added to it (all
cores, and one thread), a full ``torch.load`` (the baseline of a load) and the digest that
verifies it, a header-only load (``mmap=True``, what ``find_checkpoint`` reads of every
candidate: never verified) and the verification of the candidate it picks, through the map.
Best of ``--reps``; the file is in the page cache (written just before).
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
import torch  # noqa: E402

import fileio  # noqa: E402

ALEXNET_CONVS = [(96, 2, 11, 11), (256, 96, 5, 5), (384, 256, 3, 3), (384, 384, 3, 3), (256, 384, 3, 3)]


def alexnet(fc6_in: int, k: int) -> list[tuple[int, ...]]:
    shapes = [(1, 3, 1, 1), (1,), (2, 1, 3, 3), (2,)]
    for s in ALEXNET_CONVS:
        shapes += [s, (s[0],), (s[0],), (s[0],), (s[0],), (s[0],)]
    return shapes + [(4096, fc6_in), (4096,), (4096, 4096), (4096,), (k, 4096), (k,)]


def resnet50() -> list[tuple[int, ...]]:
    """25.6 M parameters in 161 tensors, as torchvision's (the exact split does not matter here)."""
    return [(2048, 1024, 1, 1)] * 3 + [(512, 512, 3, 3)] * 3 + [(256, 256, 3, 3)] * 4 + [(1024, 256, 1, 1)] * 6 + \
        [(64, 3, 7, 7), (1000, 2048)] + [(256,)] * 145


def payload(name: str, scale: float) -> dict:
    g = torch.Generator().manual_seed(0)

    def tensors(shapes):
        return {f"t{i}": torch.randn(*[max(1, int(round(d * scale))) if j == 0 else d for j, d in enumerate(s)],
                                     generator=g) for i, s in enumerate(shapes)}
    state = {"epoch": 3, "iteration": 120, "arch": name, "run_id": "abc", "args": {"lr": 0.05, "k": 10000}}
    if name == "v2bank":
        n = max(1, int(1_281_167 * scale))
        state["state_dict"], state["optimizer"] = tensors(resnet50()), {"state": tensors(resnet50())}
        state["bank_index"] = torch.arange(n)
        state["bank"] = torch.randn(2, n, 128, generator=g)
    else:
        shapes = alexnet(256, 5) if name == "alexnet64" else alexnet(9216, 10000)
        state["state_dict"], state["optimizer"] = tensors(shapes), {"state": tensors(shapes)}
    return state


def best(fn, reps: int) -> tuple[float, object]:
    out, t_best = None, float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        t_best = min(t_best, time.perf_counter() - t)
    return t_best, out


def measure(name: str, scale: float, reps: int, folder: str) -> dict:
    state = payload(name, scale)
    path = os.path.join(folder, f"{name}.pth.tar")
    t_save, _ = best(lambda: torch.save(state, path), reps)
    t_digest, digest = best(lambda: fileio.payload_digest(state), reps)
    cores = os.cpu_count

    os.cpu_count = lambda: 1  # the digest's thread count follows os.cpu_count
    try:
        t_digest1, digest1 = best(lambda: fileio.payload_digest(state), reps)
    finally:
        os.cpu_count = cores
    assert digest1 == digest
    torch.save(fileio.with_checksum(state), path)
    del state
    t_load, loaded = best(lambda: torch.load(path, weights_only=True), reps)
    t_verify, bad = best(lambda: fileio.checksum_mismatch(loaded), reps)
    del loaded
    t_header, mapped = best(lambda: torch.load(path, weights_only=True, mmap=True)["epoch"], reps)
    t_verify_mapped, bad_mapped = best(lambda: fileio.checksum_mismatch(torch.load(path, weights_only=True,
                                                                                   mmap=True)), reps)
    assert not bad and not bad_mapped
    size = os.path.getsize(path)
    os.unlink(path)
    return {"payload": name, "size_mb": round(size / 1e6, 1), "save_s": t_save, "digest_s": t_digest,
            "digest_1thread_s": t_digest1, "digest_gb_s": size / 1e9 / t_digest,
            "save_overhead_pct": 100 * t_digest / t_save, "load_s": t_load, "verify_s": t_verify,
            "load_overhead_pct": 100 * t_verify / t_load, "header_s": t_header, "verify_mapped_s": t_verify_mapped}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--payloads", nargs="+", default=["alexnet64", "alexnet224", "v2bank"],
                   choices=["alexnet64", "alexnet224", "v2bank"])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of each payload's first dimensions")
    p.add_argument("--reps", type=int, default=3, help="best of this many runs of each step")
    p.add_argument("--dir", default=None, help="folder of the temporary files (default: the system's)")
    p.add_argument("--out", default=None, help="JSON output path")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        rows = [measure(name, args.scale, args.reps, folder) for name in args.payloads]
    text = print_table(rows, [("payload", "payload"), ("size_mb", "MB"), ("save_s", "save s"),
                              ("digest_s", "digest s"), ("digest_1thread_s", "1 thread s"),
                              ("save_overhead_pct", "+% save"), ("load_s", "load s"), ("verify_s", "verify s"),
                              ("load_overhead_pct", "+% load"), ("header_s", "header s"),
                              ("verify_mapped_s", "verify mmap s")],
                       title="checkpoint checksum (sha256 of 16 MiB chunks) against torch.save / torch.load")
    result = {"benchmark": "checksum", "env": environment(torch.device("cpu")), "config": vars(args),
              "rows": rows, "table": text}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
