"""Each benchmark runs with its smallest sizes and writes a JSON with sane values.

Speed is never asserted: only that the numbers exist, are positive and finite, and that the
quality columns (objectives) of the methods agree.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_bench_clustering_smallest(tmp_path):
    out = tmp_path / "clustering.json"
    load("bench_clustering").main(["--N", "600", "--D", "48", "--k", "8", "--pca", "16", "--no_warmup",
                                   "--device", "cpu", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["benchmark"] == "clustering" and res["shape"] == [600, 48]
    for key in ("env", "rows", "targets", "table", "config"):
        assert key in res
    methods = {r["method"]: r for r in res["rows"]}
    assert set(methods) == {"original", "sklearn", "torch", "auto"}
    for r in res["rows"]:
        for key in ("time_s", "throughput_rows_s", "rss_peak_mb", "objective", "obj_ref"):
            assert positive(r[key]), (r["method"], key, r[key])
        assert r["gpu_peak_mb"] is None  # CPU run
        assert 1 <= r["nonempty"] <= 8
        assert positive(r["speedup_vs_original"]) and positive(r["speedup_vs_sklearn"])
    assert methods["original"]["speedup_vs_original"] == pytest.approx(1.0)
    # quality: every method's objective within 5% of the original's on easy blobs
    for r in res["rows"]:
        assert abs(r["obj_vs_original_pct"]) < 5.0, r
    assert any("no slower than the original" in t for t in res["targets"])


def test_bench_throughput_smallest(tmp_path):
    out = tmp_path / "throughput.json"
    load("bench_throughput").main(["--size", "64", "--batch", "2", "--batches", "1", "--warmup", "0",
                                   "--workers", "0", "--k", "10", "--bf16", "--channels_last", "--no-individual",
                                   "--cache", str(tmp_path / "cache"), "--jpeg_size", "80x60",
                                   "--device", "cpu", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["benchmark"] == "throughput"
    for key in ("env", "rows", "bounds", "targets", "table", "model"):
        assert key in res
    rows = res["rows"]
    modes = {(r["mode"], r["stage"], r["variant"]) for r in rows}
    for mode in ("memory", "jpeg"):
        for stage in ("extract", "train"):
            assert (mode, stage, "original") in modes
            assert any(m == mode and s == stage and v.startswith("ours(") for m, s, v in modes)
    assert ("jpeg", "extract:loader", "original") in modes and ("jpeg", "train:loader", "original") in modes
    for r in rows:
        assert r.get("error") is None, r
        assert r["images"] == 2 and positive(r["img_s"]) and positive(r["ratio_vs_original"])
        assert positive(r["rss_peak_mb"])
    assert any("bounded by" in b for b in res["bounds"])
    assert len(list((tmp_path / "cache").glob("jpeg_80x60_2/*.jpg"))) == 2


def test_bench_memory_smallest(tmp_path):
    out = tmp_path / "memory.json"
    load("bench_memory").main(["--N", "600", "--D", "48", "--k", "5", "--pca", "16",
                               "--configs", "original,cpu_fp16,gpu_fp32", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["benchmark"] == "memory" and res["original_matrix_bytes"] == 600 * 4096 * 4
    rows = {r["config"]: r for r in res["rows"]}
    assert {"original", "cpu_fp16"} <= set(rows)
    for r in rows.values():
        for key in ("peak_rss_mb", "rss_import_mb", "time_cluster_s", "loss", "features_mb"):
            assert positive(r[key]), (r["config"], key, r[key])
        assert r["peak_rss_mb"] >= r["rss_import_mb"] * 0.99
    assert rows["cpu_fp16"]["features_mb"] == pytest.approx(rows["original"]["features_mb"] / 2)
    assert rows["original"]["peak_rss_vs_original"] == pytest.approx(1.0)
    # same data, same k: the losses agree (faiss's and ours, fp16 storage too)
    lo = rows["original"]["loss"]
    for r in rows.values():
        assert abs(r["loss"] / lo - 1) < 0.05, r
    import torch
    if not torch.cuda.is_available():
        assert "gpu_fp32" in res["skipped"]


def test_bench_clustering_grid_quick(tmp_path):
    out = tmp_path / "grid.json"
    load("bench_clustering").main(["--grid", "quick", "--no_warmup", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["benchmark"] == "clustering_grid" and positive(res["gemm_peak_gflops"])
    assert [(r["spectrum"], r["N"], r["k"]) for r in res["rows"]] == [
        ("inv", 600, 8), ("inv", 600, 16), ("trained", 600, 8), ("trained", 600, 16)]
    for r in res["rows"]:
        assert r["eig_fallback"] is False and r["eig_solver"] in ("exact", "randomized")
        for key in ("original_s", "ours_s", "exact_s", "speedup", "wcss_ours", "wcss_exact", "cov_s_per_Mrows",
                    "kmeans_gflop", "kmeans_at_peak_s"):
            assert positive(r[key]), (key, r[key])
        assert abs(r["ours_vs_exact_pct"]) < 1.0 and abs(r["original_vs_exact_pct"]) < 5.0
        assert len(r["ours_vs_exact_pct_seeds"]) == len(r["noise_pct_seeds"]) == 4
        assert 0 <= r["row_deviation_median"] <= r["row_deviation_max"] < 0.5
        assert r["ours_vs_exact_pct_seeds"][0] == r["ours_vs_exact_pct"]
        assert abs(r["ours_vs_exact_pct_mean"]) <= max(abs(v) for v in r["ours_vs_exact_pct_seeds"]) + 1e-9
    assert any("within 0.5% of exact PCA" in t for t in res["targets"])
    assert sum("'no eigensolver fallback' " in t and "MET" in t for t in res["targets"]) == 4
    assert any("per million rows" in line for line in res["limits"])


def test_trained_spectrum_is_the_measured_one():
    mod = load("bench_clustering")
    ev = mod.trained_spectrum(4096)
    for axis, value in mod.TRAINED_FC7_SPECTRUM:
        assert float(ev[axis - 1]) == pytest.approx(value, rel=1e-9)
    assert 0.98 < float(ev[256] / ev[255]) < 1.0          # no gap at the cut
    x = mod.trained_fc7_features(64, 96, 4, 0)
    assert x.shape == (64, 96) and x.dtype == np.float32 and np.isfinite(x).all()


def test_bench_clustering_on_a_features_file(tmp_path):
    feats = tmp_path / "fc7.npy"
    np.save(feats, load("bench_clustering").trained_fc7_features(400, 64, 8, 0))
    out = tmp_path / "grid.json"
    load("bench_clustering").main(["--features", str(feats), "--grid", "300x8", "--pca", "16", "--niter", "5",
                                   "--quality_seeds", "1", "--no_warmup", "--out", str(out)])
    res = json.loads(out.read_text())
    assert [(r["spectrum"], r["N"], r["k"], r["D"]) for r in res["rows"]] == [("file", 300, 8, 64)]
    assert positive(res["rows"][0]["speedup"]) and res["rows"][0]["eig_fallback"] is False


@pytest.mark.parametrize("argv,message", [
    (["--features", "missing.npy"], "argument --features: cannot read missing.npy"),
    (["--features", "{vec}"], "expected a float (N, D) matrix"),
    (["--features", "{mat}", "--grid", "50x4"], "argument --grid: 50x4 asks for more rows than"),
    (["--spectra", "inv,flat"], "argument --spectra: invalid value 'inv,flat'"),
])
def test_bench_clustering_refuses_bad_features(tmp_path, capsys, argv, message):
    np.save(tmp_path / "vec.npy", np.zeros(10, np.float32))
    np.save(tmp_path / "mat.npy", np.zeros((10, 4), np.float32))
    argv = [a.format(vec=tmp_path / "vec.npy", mat=tmp_path / "mat.npy") for a in argv]
    with pytest.raises(SystemExit):
        load("bench_clustering").get_args(argv)
    assert message in capsys.readouterr().err


def test_bench_epoch_quick(tmp_path):
    out = tmp_path / "epoch.json"
    mod = load("bench_epoch")
    parser = mod.get_args_parser()
    args = parser.parse_args(["--quick", "--rounds", "2", "--cache", str(tmp_path / "cache"), "--out", str(out)])
    mod.check(args, parser)
    mod.main(args)
    res = json.loads(out.read_text())
    rows = {r["config"]: r for r in res["rows"]}
    for r in rows.values():   # each stage: the shortest of the two interleaved rounds
        assert len(r["rounds"]) == 2
        for key in ("features_s", "clustering_s", "training_s"):
            assert r[key] == min(x[key] for x in r["rounds"])
    assert set(rows) == {"original", "ours", "ours_amp"} and positive(res["gemm_peak_gflops"])
    for r in rows.values():
        for key in ("features_s", "clustering_s", "training_s", "epoch_s", "epoch_x"):
            assert positive(r[key]), (r["config"], key, r[key])
        assert r["epoch_s"] >= r["features_s"] + r["clustering_s"] + r["training_s"] - 1e-6
        assert r["clustering_pct"] == pytest.approx(100 * r["clustering_s"] / r["epoch_s"])
        # the clustering step again on trained-fc7-shaped features, and its share of this epoch
        c = r["clustering_trained_s"]
        assert positive(c) and r["clustering_trained_pct"] == pytest.approx(100 * c / (r["features_s"] + c + r["training_s"]))
    t = res["trained_shape_clustering"]
    assert t["shape"] == [8, 4096] and positive(t["faiss_s"]) and positive(t["auto_s"]) and not t["eig"]["fallback"]
    d = res["draft"]
    assert d["images"] == 4 and positive(d["full_img_s"]) and positive(d["draft_img_s"])
    assert 0.0 <= d["nmi"] <= 1.0 + 1e-9 and 0.0 <= d["same_cluster_pct"] <= 100.0
    assert any("2x the original" in t for t in res["targets"])
    assert any("--amp" in t for t in res["targets"])
    b = res["bound"]
    assert b["peak_gflops"] == max(b["gemm_gflops"], b["conv_gflops"]) == res["fp32_peak_gflops"]
    assert b["epoch_floor_with_loading_s"] > b["epoch_at_peak_s"] > 0
    assert positive(b["loader_features_s_per_img"]) and positive(b["loader_training_s_per_img"])
    parts = b["step_conv_ms_per_img"] + b["step_gemm_ms_per_img"] + b["step_other_ms_per_img"]
    assert positive(b["step_conv_gflops"]) and positive(b["step_gemm_gflops"])
    assert abs(parts - b["step_ms_per_img"]) < 1e-6 and b["step_other_ms_per_img"] > 0
    # the float32 limit: a training step (forward + backward) costs 2-3.5x the feature forward
    b = res["bound"]
    assert 2.0 < b["training_flop_per_img"] / b["features_flop_per_img"] < 3.5
    assert b["epoch_at_peak_s"] == pytest.approx(b["features_at_peak_s"] + rows["ours"]["clustering_s"] + b["training_at_peak_s"])
    assert b["best_possible_x_epoch_fp32"] == pytest.approx(rows["original"]["epoch_s"] / b["epoch_at_peak_s"])


@pytest.mark.parametrize("argv,message", [
    (["--grid", "8000x0"], "argument --grid: invalid value '8000x0'"),
    (["--grid", "quick", "--quality_seeds", "0"], "argument --quality_seeds: invalid value 0"),
])
def test_bench_clustering_refuses_bad_grid_arguments(capsys, argv, message):
    with pytest.raises(SystemExit):
        load("bench_clustering").get_args(argv)
    assert message in capsys.readouterr().err


def test_bench_epoch_refuses_zero_rounds(capsys):
    mod = load("bench_epoch")
    parser = mod.get_args_parser()
    args = parser.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        mod.check(args, parser)
    assert "argument --rounds: must be >= 1, got 0" in capsys.readouterr().err


def test_bench_checksum_smallest(tmp_path):
    out = tmp_path / "checksum.json"
    load("bench_checksum").main(["--scale", "0.002", "--reps", "1", "--dir", str(tmp_path), "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["benchmark"] == "checksum" and [r["payload"] for r in res["rows"]] == ["alexnet64", "alexnet224",
                                                                                       "v2bank"]
    for r in res["rows"]:
        for key in ("size_mb", "save_s", "digest_s", "digest_1thread_s", "load_s", "verify_s", "header_s",
                    "verify_mapped_s"):
            assert positive(r[key]), (r["payload"], key, r[key])
    assert not [p for p in tmp_path.iterdir() if p.name != "checksum.json"]  # its files removed
