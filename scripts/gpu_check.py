"""The first minutes on a GPU box: does every CUDA path of this repository work, and how fast?

Usage:
    scripts/gpu_check.sh                       # one GPU, under 8 minutes, no network, installs nothing
    scripts/gpu_check.sh --dry-run             # no GPU needed: every check that needs CUDA says SKIP
    python3 scripts/gpu_check.py --only nccl_one --only sync_audit
    GPU_CHECK_DEVICE=cpu python3 scripts/gpu_check.py   # the CUDA checks' code on the CPU (tiny sizes)

Each check runs in its own process under a time box (a hung CUDA call cannot stall the rest)
and prints one line ``PASS|FAIL|SKIP name: detail`` with its numbers; a missing optional
package is one ``SKIP package_NAME`` line (and the checks that need it SKIP), never a crash.
Everything goes to ``benchmarks/results/gpu_check.json`` (``gpu_check_dryrun.json`` for a dry
run, ``gpu_check_cpu.json`` with GPU_CHECK_DEVICE=cpu). Exit status 1 when a check failed. The
data is made here (synthetic JPEG photos, synthetic features) in a temporary folder.

The checks, in this order (the budget cuts the tail): environment (versions, GPU, cores);
nccl_one (main.py in an NCCL process group of one against one process); sync_audit (32 steps
under DEEPCLUSTER_SYNC_DEBUG=error); v2_cuda (DeepCluster-v2 fp32, --amp, killed and resumed);
v2_nccl_one; pca (randomized against exact eigensolver, D=4096, N>D); decode_train (--decode gpu
against cpu); memory (peak memory and img/s: AlexNet, VGG-16, ResNet-50 at 256, synced BN, v2's
recipe); loader (img/s on 500x375 JPEGs); decode_gpu; kmeans; torchrun2 (2 GPUs); cuda_tests;
decode_cpu_twin.

The checks themselves are in the library module ``gpu_checks`` (one ``check_NAME`` function
each). Every command line a check launches (main.py, main_deepclusterv2.py, launch.py) is built
by ``gpu_checks.command_lines`` and parsed by that script's own parser before anything runs (the
``commands`` line; tests/test_gpu_check.py does the same in CI), so a flag that does not exist
is a FAIL here and in CI, not a check that can never pass.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gpu_checks as gc  # noqa: E402  (the checks, the command lines, the data)
from gpu_checks import CHECKS, CPU, SLOW, TOTAL_BUDGET  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="PASS/FAIL/SKIP of every CUDA path, and GPU throughput")
    g = p.add_argument_group("what to run")
    g.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="no GPU: checks that need CUDA report SKIP, the others run (tiny sizes)")
    g.add_argument("--only", action="append", choices=list(CHECKS), default=None, help="run only these checks")
    g.add_argument("--budget", type=float, default=None,
                   help=f"seconds for all the checks together (default {TOTAL_BUDGET:.0f}, x{SLOW:.0f} on the CPU)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="JSON file (default benchmarks/results/gpu_check[_dryrun|_cpu].json)")
    g.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one check in this process
    g.add_argument("--work", default=None, help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------------------
def run_one(name: str, work: Path, dry: bool) -> None:
    """Child process: run a check, print its result as the last line (JSON)."""
    try:
        status, detail, numbers = gc.RUNNERS[name](work, dry)
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


def run_checks(names: list[str], work: str, args, budget: float, start: float) -> dict:
    has_cuda = (cuda_available() or CPU) and not args.dry_run
    _, missing = gc.package_versions()
    shim = gc.tqdm_shim(Path(work))
    if shim is not None:  # the parsers import main.py, which imports tqdm
        sys.path.insert(0, str(shim))
    results = {"commands": gc.preflight(Path(work))}
    print(f"{results['commands']['status']} commands: {results['commands']['detail']}", flush=True)
    for mod in missing:
        if mod in gc.OPTIONAL:
            what = "a stand-in runs (no progress bars)" if mod == "tqdm" else "the checks that need it SKIP"
            results[f"package_{mod}"] = {"status": "SKIP", "detail": f"{mod} is not installed: {what}"}
            print(f"SKIP package_{mod}: {results[f'package_{mod}']['detail']}", flush=True)
    for name in names:
        check, left = CHECKS[name], budget - (time.time() - start)
        limit = check.seconds * SLOW
        why = gc.skip_reason(check, has_cuda, args.dry_run, missing)
        if why is None and left < min(limit, 20):
            why = f"time budget spent ({budget:.0f} s)"
        if why is not None:
            res = {"status": "SKIP", "detail": why}
        else:
            t = time.time()
            try:
                p = gc.run_boxed([gc.python_exe(), str(Path(__file__).resolve()), "--one", name, "--work", work]
                                 + (["--dry-run"] if args.dry_run else []), min(limit, left), cwd=ROOT,
                                 env=gc.child_env(Path(work)))
                out = p.stdout.strip().splitlines()
                res = json.loads(out[-1]) if out and out[-1].startswith("{") else \
                    {"status": "FAIL", "detail": f"exit {p.returncode}: {gc.error_line(p.stderr)}"}
            except subprocess.TimeoutExpired:
                res = {"status": "FAIL", "detail": f"timed out after {min(limit, left):.0f} s"}
            res["seconds"] = round(time.time() - t, 1)
        results[name] = res
        print(f"{res['status']} {name}: {res['detail']}" + (f" [{res['seconds']} s]" if "seconds" in res else ""),
              flush=True)
    return results


def table(rows: list[dict]) -> str:
    lines = ["| config | batch | extraction img/s | training img/s | peak GPU memory GiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['batch']} | {r['extract_img_s']:.0f} | {r['train_img_s']:.0f} | "
              f"{r['peak_gib']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.one:
        run_one(args.one, Path(args.work), args.dry_run)
        return 0
    start = time.time()
    budget = args.budget if args.budget is not None else TOTAL_BUDGET * SLOW
    names = [n for n in CHECKS if args.only is None or n in args.only]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        results = run_checks(names, work, args, budget, start)
    rows = (results.get("memory", {}).get("numbers") or {}).get("rows")
    if rows:
        print("\n" + table(rows))
    kind = "_dryrun" if args.dry_run else "_cpu" if CPU else ""
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"gpu_check{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "gpu_check", "dry_run": args.dry_run, "device": gc.DEV,
                               "seconds": round(time.time() - start, 1), "checks": results}, indent=1, default=str))
    failed = [n for n, r in results.items() if r["status"] == "FAIL"]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks did not fail; "
          f"{time.time() - start:.0f} s; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
