"""Tests of visu/: gradient ascent, activation retrieval, training report (CPU, small sizes)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, make_image_folder

import cli
import data
import models
from visu import common
from visu import gradient_ascent as ga
from visu import report, training_report


def load_activ_retrieval():
    """visu/activ-retrieval.py has a dash in its name: load it by path."""
    spec = importlib.util.spec_from_file_location("activ_retrieval", ROOT / "visu" / "activ-retrieval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ar = load_activ_retrieval()


def save_checkpoint(model: models.DeepClusterNet, path: Path) -> Path:
    """The released checkpoint layout: {'epoch', 'arch', 'state_dict'}."""
    torch.save({"epoch": 0, "arch": model.arch, "state_dict": model.state_dict()}, path)
    return path


def png(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 0, f"{path} missing or empty"
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def run_script(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "visu" / script), *argv], capture_output=True,
                          text=True, cwd="/", timeout=120)


# ---------------------------------------------------------------------------------------
# gradient ascent
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,sobel,conv,idim", [("alexnet", False, 2, 64), ("alexnet", True, 4, 64),
                                                  ("vgg16", False, 3, 32)])
def test_gradient_ascent_raises_target_filter(arch, sobel, conv, idim):
    torch.manual_seed(0)
    model = common.freeze(models.build_model(arch, sobel=sobel, out=10, input_size=idim))
    trunk = model.trunk(conv)
    x0 = torch.randn(3, 3, idim, idim)
    with torch.no_grad():  # after the ReLU, a filter silent on the start gets no gradient
        alive = (trunk(x0).mean(dim=(2, 3)) > 0).all(dim=0).nonzero().flatten().tolist()
    filters = [alive[0], alive[len(alive) // 2], alive[-1]]
    x0_copy = x0.clone()
    before = ga.target_stats(trunk, x0, filters)
    x = ga.ascend(trunk, filters, idim=idim, niter=10, lr=3.0, step=5, sig=0.3, x0=x0)
    after = ga.target_stats(trunk, x, filters)
    assert x.shape == x0.shape and torch.isfinite(x).all()
    for j in range(len(filters)):
        # the filter's own activation grows, and grows against the other filters of the layer
        assert after["activation"][j] > before["activation"][j] + 1e-3, (j, before, after)
        assert after["share"][j] > before["share"][j], (j, before, after)
    assert torch.equal(x0, x0_copy)  # the start is not modified in place


def test_gradient_ascent_pre_relu_wakes_a_silent_filter():
    torch.manual_seed(0)
    model = common.freeze(models.alexnet(sobel=True, out=0, input_size=64))
    post, pre = model.trunk(4), model.trunk(4, relu=False)
    x0 = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        silent = (post(x0).mean(dim=(2, 3))[0] == 0).nonzero().flatten().tolist()
    assert silent, "expected some conv4 filter to be zero everywhere on the noise"
    f = silent[0]
    x = ga.ascend(pre, [f], idim=64, niter=10, x0=x0)
    assert ga.target_stats(pre, x, [f])["activation"][0] > ga.target_stats(pre, x0, [f])["activation"][0]


def test_gradient_ascent_weight_decay_alone_shrinks_image():
    """With a huge weight decay the step follows -x: the image norm must go down."""
    model = common.freeze(models.alexnet(out=0, input_size=64))
    trunk = model.trunk(1)
    x0 = torch.randn(1, 3, 48, 48) * 5
    x = ga.ascend(trunk, [0], idim=48, niter=5, lr=10.0, wd=1e6, sig=0.0, step=0, x0=x0)
    assert x.norm() < x0.norm() - 40  # 5 steps of length 10, all towards 0


def test_gaussian_blur_matches_scipy():
    from scipy.ndimage import gaussian_filter

    x = torch.randn(2, 3, 20, 17, dtype=torch.float64)
    for sigma in (0.3, 1.0, 6.0):  # scipy's defaults, as the original calls it (6.0: radius 24 > size)
        got = ga.gaussian_blur(x, sigma).numpy()
        np.testing.assert_allclose(got, gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma)), atol=1e-10)
    assert torch.equal(ga.gaussian_blur(x, 0.0), x)
    const = torch.full((1, 3, 9, 9), 0.7)
    assert torch.allclose(ga.gaussian_blur(const, 0.3), const)


def test_gradient_ascent_cli_writes_one_png_per_filter(tmp_path):
    torch.manual_seed(0)
    ckpt = save_checkpoint(models.alexnet(sobel=True, out=7, input_size=64), tmp_path / "model.pth.tar")
    out = tmp_path / "ga"
    args = ga.get_args_parser().parse_args([
        "--model", str(ckpt), "--arch", "alexnet", "--conv", "1", "--filters", "0-2,10", "--niter", "10",
        "--idim", "48", "--exp", str(out), "--device", "cpu", "--no_progress", "--batch", "3", "--lr", "30"])
    summary = ga.main(args)
    assert sorted(summary["filters"]) == ["0", "1", "10", "2"]
    for f in (0, 1, 2, 10):
        img = png(out / "conv1" / f"filter_{f:04d}.png")
        assert img.shape == (48, 48, 3) and img.std() > 0
        s = summary["filters"][str(f)]
        assert s["final_share"] > s["start_share"]  # the target gains against the layer's other filters
    assert not (out / "conv1" / "filter_0003.png").exists()
    sheet = png(out / "conv1_filters.png")
    assert sheet.shape[0] >= 2 * 48 and sheet.shape[1] >= 2 * 48  # 4 tiles on a 2x2 grid
    assert json.loads((out / "conv1_summary.json").read_text())["conv"] == 1


def test_gradient_ascent_defaults_are_the_originals(tmp_path, monkeypatch):
    a = ga.get_args_parser().parse_args([])
    assert (a.lr, a.wd, a.sig, a.step, a.niter, a.idim, a.init_mean, a.init_std, a.fallback, a.display) == \
        (3.0, 1e-5, 0.3, 5, 1000, 224, 128.0, 20.0, 1, "stretch")
    # through the CLI: the start is raw-pixel noise N(128, 20^2), saved contrast-stretched
    ckpt = save_checkpoint(models.alexnet(out=3, input_size=64), tmp_path / "m.pth.tar")
    starts = []
    real = ga.ascend

    def spy(*args, **kw):
        starts.append(kw["x0"].clone())
        return real(*args, **kw)
    monkeypatch.setattr(ga, "ascend", spy)
    ga.main(ga.get_args_parser().parse_args(["--model", str(ckpt), "--conv", "1", "--filters", "0,1", "--niter", "0",
                                             "--idim", "32", "--exp", str(tmp_path / "o"), "--no_progress"]))
    x0 = starts[0]
    assert abs(float(x0.mean()) - 128) < 1.0 and abs(float(x0.std()) - 20) < 1.0
    assert np.array_equal(png(tmp_path / "o" / "conv1" / "filter_0001.png"), np.asarray(ga.contrast_stretch(x0[1])))


def test_contrast_stretch_hand_computed():
    # values 0 and 2 in every channel: mean 1, std 1 -> 0.5 -/+ 0.1 / (1 + 1e-5) -> x 255, truncated
    x = torch.tensor([0.0, 2.0]).view(1, 1, 2).expand(3, 1, 2)
    assert np.asarray(ga.contrast_stretch(x))[0].tolist() == [[102, 102, 102], [152, 152, 152]]


def test_gradient_ascent_silent_filter_climbs_pre_bn_conv_output():
    """One step, no blur: a filter zero everywhere after its ReLU follows the gradient of the
    cross-entropy over the conv outputs before BatchNorm; a live filter the post-ReLU one."""
    torch.manual_seed(0)
    model = common.freeze(models.alexnet(sobel=False, out=0, input_size=64))
    with torch.no_grad():  # BN statistics that shift the responses: the pre-BN output differs
        for m in model.features:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-2, 2)
                m.running_var.uniform_(0.5, 2)
    trunk = model.trunk(2)
    conv_at = [i for i, m in enumerate(model.features) if isinstance(m, torch.nn.Conv2d)][1]
    x0 = torch.randn(1, 3, 40, 40) * 20 + 128
    with torch.no_grad():
        act = trunk(x0).mean(dim=(2, 3))[0]
    silent, alive = int((act == 0).nonzero()[0]), int((act > 0).nonzero()[0])

    def expected(f: int, layer: torch.nn.Module) -> torch.Tensor:
        x = x0.clone().requires_grad_(True)
        logits = layer(x).mean(dim=(2, 3))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([f])) + 1e-5 * x.pow(2).sum()
        (g,) = torch.autograd.grad(loss, x)
        return x0 - 3.0 * g / (g.norm() + 1e-8)
    got = ga.ascend(trunk, [silent, alive], niter=1, step=0, x0=x0.expand(2, -1, -1, -1))
    torch.testing.assert_close(got[0:1], expected(silent, model.features[:conv_at + 1]))
    assert not torch.allclose(expected(silent, model.features[:conv_at + 1]), expected(silent, trunk))
    torch.testing.assert_close(got[1:2], expected(alive, trunk))
    assert not torch.allclose(got[0:1], x0, atol=1e-3)  # the silent filter's image did move


def test_gradient_ascent_blurs_at_iterations_0_step_2step(monkeypatch):
    calls, steps = [], []
    real = ga.gaussian_blur
    monkeypatch.setattr(ga, "gaussian_blur", lambda x, s: calls.append(len(steps)) or real(x, s))
    trunk = common.freeze(models.alexnet(out=0, input_size=64)).trunk(1)
    ga.ascend(trunk, [0], idim=32, niter=11, step=5, on_step=lambda: steps.append(1))
    assert calls == [0, 5, 10]


def test_gradient_ascent_clear_errors(tmp_path, capsys):
    parser = ga.get_args_parser()
    missing = tmp_path / "nope.pth.tar"
    rc = cli.run_cli(ga.main, parser, ["--model", str(missing), "--exp", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "\n" not in err and str(missing) in err
    ckpt = save_checkpoint(models.alexnet(out=3, input_size=64), tmp_path / "m.pth.tar")
    rc = cli.run_cli(ga.main, parser, ["--model", str(ckpt), "--conv", "6", "--exp", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "--conv 6" in err and "1..5" in err
    rc = cli.run_cli(ga.main, parser, ["--model", str(ckpt), "--arch", "vgg16", "--exp", str(tmp_path / "o")])
    assert rc != 0 and "alexnet" in capsys.readouterr().err


def test_parse_filters():
    assert common.parse_filters("", 4) == [0, 1, 2, 3]
    assert common.parse_filters("3,0-1,1", 4) == [0, 1, 3]
    with pytest.raises(common.VisuError):
        common.parse_filters("4", 4)
    with pytest.raises(common.VisuError):
        common.parse_filters("a", 4)


# ---------------------------------------------------------------------------------------
# activation retrieval
# ---------------------------------------------------------------------------------------
def brute_force_top(trunk, folder: Path, size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    ds = data.IndexedImageFolder(folder, transform=data.eval_transform(size))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        means = trunk(x).mean(dim=(2, 3)).t().numpy()  # (C, N)
    order = np.argsort(-means, axis=1, kind="stable")[:, :count]
    return order, np.take_along_axis(means, order, axis=1)


def test_activation_retrieval_matches_brute_force(tmp_path):
    torch.manual_seed(0)
    folder = make_image_folder(tmp_path / "imgs", n_classes=3, per_class=7, size=40)
    model = common.freeze(models.alexnet(out=5, input_size=64))
    trunk = model.trunk(3)
    want_idx, want_val = brute_force_top(trunk, folder, 64, count=4)

    ds = data.IndexedImageFolder(folder, transform=data.eval_transform(64))
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=data.default_collate_indexed)
    val, idx = ar.top_images(trunk, loader, count=4)  # 5 batches: the merge is exercised
    assert idx.shape == (trunk.n_filters, 4)
    np.testing.assert_array_equal(idx.numpy(), want_idx)
    np.testing.assert_allclose(val.numpy(), want_val, rtol=1e-4, atol=1e-6)
    # top images differ between filters: it is not one global ranking
    assert len({tuple(r) for r in idx.numpy().tolist()}) > 1

    # the command line: per-filter grids, contact sheet, JSON consistent with brute force
    ckpt = save_checkpoint(model, tmp_path / "m.pth.tar")
    out = tmp_path / "ar"
    args = ar.get_args_parser().parse_args([
        "--model", str(ckpt), "--conv", "3", "--data", str(folder), "--count", "4", "--filters", "0-5",
        "--exp", str(out), "--workers", "0", "--tile", "32", "--no_progress", "--device", "cpu"])
    result = ar.main(args)
    paths = data.scan_image_folder(folder)[0]
    for f in range(6):
        assert [p for p, _ in result[str(f)]] == [paths[i] for i in want_idx[f]]
        grid = png(out / "conv3" / f"filter_{f:04d}.png")
        assert grid.shape[0] >= 2 * 32 and grid.std() > 0
    assert not (out / "conv3" / "filter_0006.png").exists()
    png(out / "conv3_top4.png")
    saved = json.loads((out / "conv3_top4.json").read_text())
    assert saved["filters"]["2"][0][0] == paths[want_idx[2][0]]


def test_merge_topk_keeps_earlier_image_on_ties():
    v, i = ar.merge_topk(torch.tensor([[2.0, 1.0]]), torch.tensor([[3, 1]]),
                         torch.tensor([[1.0, 5.0, 2.0]]), torch.tensor([[7, 8, 9]]), count=3)
    assert v.tolist() == [[5.0, 2.0, 2.0]] and i.tolist() == [[8, 3, 9]]


def test_activation_retrieval_errors(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "imgs", n_classes=1, per_class=3, size=40)
    ckpt = save_checkpoint(models.alexnet(out=3, input_size=64), tmp_path / "m.pth.tar")
    parser = ar.get_args_parser()
    rc = cli.run_cli(ar.main, parser, ["--model", str(ckpt), "--data", str(folder), "--count", "9",
                                          "--exp", str(tmp_path / "o"), "--workers", "0"])
    assert rc != 0 and "--count 9" in capsys.readouterr().err
    rc = cli.run_cli(ar.main, parser, ["--model", str(tmp_path / "x.pth"), "--data", str(folder),
                                          "--exp", str(tmp_path / "o")])
    assert rc != 0 and "x.pth" in capsys.readouterr().err
    rc = cli.run_cli(ar.main, parser, ["--model", str(ckpt), "--data", str(tmp_path / "none"),
                                          "--exp", str(tmp_path / "o")])
    assert rc != 0 and "none" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# training report
# ---------------------------------------------------------------------------------------
def make_experiment(root: Path, n_epochs: int = 4, k: int = 5, with_labels: bool = True) -> Path:
    """A folder shaped like main.py's output, without training."""
    images = make_image_folder(root / "images", n_classes=3, per_class=6, size=24)
    n = len(data.scan_image_folder(images)[0])
    exp = root / "exp"
    (exp / "clusters").mkdir(parents=True)
    (exp / "args.json").write_text(json.dumps({"data": str(images), "arch": "alexnet", "nmb_cluster": k,
                                               "size": 64, "clustering": "Kmeans"}))
    rng = np.random.RandomState(0)
    with open(exp / "log.jsonl", "w") as f:
        for e in range(n_epochs):
            labels = rng.randint(0, k - 1, size=n)  # cluster k-1 stays empty
            labels[:6] = 0  # cluster 0 is the largest
            np.save(exp / "clusters" / f"epoch_{e:05d}.npy", labels.astype(np.uint16))
            f.write(json.dumps({"epoch": e, "clustering_loss": 10.0 - e, "train_loss": 3.0 - 0.1 * e,
                                "nmi_prev": None if e == 0 else 0.5 + 0.1 * e,
                                "nmi_labels": (0.3 + 0.05 * e) if with_labels else None,
                                "n_clusters": k, "n_empty": 1, "iterations": 3}) + "\n")
    return exp


def test_report_writes_pictures(tmp_path):
    exp = make_experiment(tmp_path)
    # exactly the call main.py makes with --report
    written = report.main(report.get_args_parser().parse_args([str(exp)]))
    names = sorted(p.name for p in written)
    assert names == ["cluster_sizes_epoch_00003.png", "clusters_epoch_00003.png", "training_curves.png"]
    for p in written:
        assert p.parent == exp / "report"
        img = png(p)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0

    out = tmp_path / "r2"
    written = report.main(report.get_args_parser().parse_args(
        [str(exp), "--epoch", "1", "--out", str(out), "--n_largest", "2", "--n_random", "1"]))
    assert {p.name for p in written} >= {"cluster_sizes_epoch_00001.png", "clusters_epoch_00001.png"}


def test_report_choose_clusters():
    sizes = np.array([3, 0, 9, 1, 5, 2])
    rows = training_report.choose_clusters(sizes, 2, 10, np.random.RandomState(0))
    assert rows[:2] == [("largest", 2), ("largest", 4)]
    rand = [c for kind, c in rows if kind == "random"]
    assert sorted(rand) == [0, 3, 5]  # every other non-empty cluster, never the empty one


def test_report_series_skips_missing_values():
    recs = [{"epoch": 0, "nmi_prev": None}, {"epoch": 1, "nmi_prev": 0.4}, {"epoch": 2, "nmi_prev": 0.6}]
    e, v = training_report.series(recs, "nmi_prev")
    assert e.tolist() == [1, 2] and v.tolist() == [0.4, 0.6]
    assert len(training_report.series(recs, "nmi_labels")[0]) == 0


def test_report_without_dataset_or_labels(tmp_path, caplog):
    exp = make_experiment(tmp_path, n_epochs=1, with_labels=False)
    args = json.loads((exp / "args.json").read_text())
    args["data"] = str(tmp_path / "moved")
    (exp / "args.json").write_text(json.dumps(args))
    written = report.main(report.get_args_parser().parse_args([str(exp)]))
    assert sorted(p.name for p in written) == ["cluster_sizes_epoch_00000.png", "training_curves.png"]
    assert "not found" in caplog.text
    png(exp / "report" / "training_curves.png")
    # --data points the report at the moved dataset
    written = report.main(report.get_args_parser().parse_args([str(exp), "--data", str(tmp_path / "images")]))
    assert "clusters_epoch_00000.png" in {p.name for p in written}


def test_report_rejects_a_folder_that_is_not_an_experiment(tmp_path):
    (tmp_path / "notexp").mkdir()
    with pytest.raises(training_report.ReportError, match="log.jsonl"):
        report.main(report.get_args_parser().parse_args([str(tmp_path / "notexp")]))
    exp = make_experiment(tmp_path)
    with pytest.raises(training_report.ReportError, match="--epoch 9"):
        report.main(report.get_args_parser().parse_args([str(exp), "--epoch", "9"]))
    # from the command line: one line on stderr, non-zero exit, nothing written
    res = run_script("report.py", str(tmp_path / "notexp"))
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1 and "log.jsonl" in res.stderr
    assert not (tmp_path / "notexp" / "report").exists()
