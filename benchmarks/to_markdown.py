"""Render benchmark JSON files (written with --out) as Markdown, for the README's Performance section.

    python benchmarks/to_markdown.py exp_bench/clustering.json exp_bench/throughput.json ...
"""
from __future__ import annotations

import json
import sys


def render(path: str) -> str:
    res = json.loads(open(path).read())
    env = res.get("env", {})
    cfg = res.get("config", {})
    lines = [f"### {res['benchmark']}: `{path}`", "",
             f"Hardware: {env.get('cpu')} ({env.get('cpu_cores')} cores, {env.get('ram_gb')} GB RAM), "
             f"GPU: {env.get('gpu') or 'none'}; torch {env.get('torch')}, faiss {env.get('faiss')}; "
             f"1-min load average at start: {env.get('loadavg_1min_at_start')}.", ""]
    if cfg.get("real"):  # synthetic sizes do not apply to --real
        cfg = {k: v for k, v in cfg.items() if k not in ("N", "D", "true_k")}
    flags = " ".join(f"--{k} {v}" for k, v in cfg.items() if not isinstance(v, (list, dict)) and v not in (None, False))
    lines += [f"Configuration: `{flags}`", "", "```", res["table"].strip("\n"), "```", ""]
    for key in ("bounds", "targets", "notes"):
        for item in res.get(key, []) or []:
            lines.append(f"* {item}")
    for k, why in (res.get("skipped") or {}).items():
        line = f"* skipped {k}: {why}"
        if line not in lines:
            lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print("\n".join(render(p) for p in sys.argv[1:]))
