"""eval_linear.py: pooling table, lr decay, end-to-end on a tiny ImageFolder, resume, bad inputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_linear
import models
from conftest import make_image_folder
from test_eval_common import save_original_format


def make_texture_folder(root: Path, per_class: int, seed: int, size: int = 40) -> Path:
    """3 classes told apart by texture, not colour (a Sobel model only sees gradients):
    flat grey with faint noise, horizontal stripes, fine checkerboard."""
    from PIL import Image
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[:size, :size]
    patterns = [np.zeros((size, size)), 80.0 * ((yy // 4) % 2), 80.0 * ((yy // 2 + xx // 2) % 2)]
    for c, pat in enumerate(patterns):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            grey = 90 + pat + rng.randint(-10, 10, size=(size, size))
            arr = np.clip(np.repeat(grey[:, :, None], 3, 2) + rng.randint(0, 60, size=3), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(d / f"img{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def linear_data(module_tmp) -> Path:
    root = module_tmp.mktemp("linear") / "data"
    make_texture_folder(root / "train", per_class=10, seed=0)
    make_texture_folder(root / "val", per_class=4, seed=1)
    return root


@pytest.fixture(scope="module")
def alexnet_original(module_tmp) -> tuple[Path, models.DeepClusterNet]:
    torch.manual_seed(0)
    m = models.alexnet(sobel=True, out=10, input_size=64)
    return save_original_format(m, module_tmp.mktemp("models") / "alexnet_orig.pth.tar"), m


def args_for(data: Path, model: Path, exp: Path, *extra: str):
    return eval_linear.get_args_parser().parse_args(
        ["--data", str(data), "--model", str(model), "--exp", str(exp), "--size", "64", "--workers", "0",
         "--batch_size", "8", "--no_progress", *extra])


def test_defaults_are_the_originals():
    a = eval_linear.get_args_parser().parse_args(["--data", "d", "--model", "m"])
    assert (a.workers, a.epochs, a.batch_size, a.lr, a.momentum, a.weight_decay, a.seed, a.tencrops) == \
        (4, 90, 256, 0.01, 0.9, -4, 31, False)
    assert eval_linear.get_args_parser().parse_args(["--data", "d", "--model", "m", "--wd", "-5"]).weight_decay == -5


def test_pooling_table_alexnet_224():
    dims = eval_linear.pooled_dims("alexnet", 224)
    assert dims == {1: 9600, 2: 9216, 3: 9600, 4: 9600, 5: 9216}
    m = models.alexnet(out=0, input_size=224)
    for conv, (k, s, p) in models.ALEXNET_POOL.items():
        body = m.trunk(conv).freeze()
        pool = eval_linear.build_reglog(body, "alexnet", conv, 5, 224).pool
        assert (pool.kernel_size, pool.stride, pool.padding) == (k, s, p)  # the paper's table untouched


def test_pooling_small_input_still_works():
    dims = eval_linear.pooled_dims("alexnet", 64)
    assert all(d > 0 for d in dims.values()) and len(dims) == 5


def test_frozen_body_stays_in_eval_mode():
    m = models.alexnet(out=0, input_size=64)
    body = m.trunk(3).freeze()
    body.train()
    assert not any(mod.training for mod in body.modules())
    assert not any(p.requires_grad for p in body.parameters())


def test_end_to_end_original_checkpoint(linear_data, alexnet_original, tmp_path):
    path, model = alexnet_original
    args = args_for(linear_data, path, tmp_path / "exp", "--conv", "2", "--epochs", "4", "--lr", "0.1")
    res = eval_linear.main(args)
    assert len(res["history"]) == 4
    for r in res["history"]:
        assert 0 <= r["top1"] <= r["top5"] <= 100
    assert res["best_top1"] == max(r["top1"] for r in res["history"])
    # 3 well-separated texture classes: a linear probe on any conv features must beat chance (33%)
    assert res["best_top1"] > 50
    # per-iteration decay: 30 images / batch 8 = 4 iterations per epoch, last t = 15
    t = 4 * 4 - 1
    assert res["history"][-1]["lr"] == pytest.approx(0.1 / math.sqrt(1 + 0.1 * 1e-4 * t))
    ckpt = torch.load(tmp_path / "exp" / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["conv"] == 2
    assert ckpt["reglog"]["linear.weight"].shape == (3, res["dim"])  # the classifier is saved
    # the body is frozen: its weights are the loaded ones
    assert torch.equal(ckpt["state_dict"]["features.4.weight"], model.features[4].weight)
    assert (tmp_path / "exp" / "model_best.pth.tar").is_file()
    assert json.loads((tmp_path / "exp" / "results.json").read_text())["best_top1"] == res["best_top1"]


def test_resume_continues(linear_data, alexnet_original, tmp_path):
    path, _ = alexnet_original
    exp = tmp_path / "exp"
    first = eval_linear.main(args_for(linear_data, path, exp, "--conv", "5", "--epochs", "1"))
    w1 = torch.load(exp / "checkpoint.pth.tar", weights_only=True)["reglog"]["linear.weight"]
    res = eval_linear.main(args_for(linear_data, path, exp, "--conv", "5", "--epochs", "2",
                                    "--resume", str(exp / "checkpoint.pth.tar")))
    assert [r["epoch"] for r in res["history"]] == [0, 1]
    assert res["history"][0] == first["history"][0]
    w2 = torch.load(exp / "checkpoint.pth.tar", weights_only=True)["reglog"]["linear.weight"]
    assert not torch.equal(w1, w2)
    # resuming a conv5 run as conv3 is refused
    rc = eval_linear.run(["--data", str(linear_data), "--model", str(path), "--exp", str(exp), "--conv", "3",
                          "--size", "64", "--workers", "0", "--resume", str(exp / "checkpoint.pth.tar")])
    assert rc == 2


def test_tencrops(linear_data, alexnet_original, tmp_path):
    path, _ = alexnet_original
    res = eval_linear.main(args_for(linear_data, path, tmp_path / "exp", "--conv", "1", "--epochs", "1", "--tencrops"))
    assert len(res["history"]) == 1 and 0 <= res["history"][0]["top1"] <= 100
    assert res["dim"] == eval_linear.pooled_dims("alexnet", 64)[1]


@pytest.mark.parametrize("case", ["no_val", "bad_conv", "not_a_model", "missing_model"])
def test_bad_inputs_exit_cleanly(case, linear_data, alexnet_original, tmp_path, capsys):
    path, _ = alexnet_original
    data, model, conv = str(linear_data), str(path), "2"
    if case == "no_val":
        make_image_folder(tmp_path / "d" / "train", n_classes=2, per_class=2)
        data = str(tmp_path / "d")
    elif case == "bad_conv":
        conv = "6"
    elif case == "not_a_model":
        (tmp_path / "junk.pth.tar").write_bytes(b"not a checkpoint")
        model = str(tmp_path / "junk.pth.tar")
    else:
        model = str(tmp_path / "nope.pth.tar")
    rc = eval_linear.run(["--data", data, "--model", model, "--conv", conv, "--exp", str(tmp_path / "e"),
                          "--size", "64", "--workers", "0", "--epochs", "1", "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    expected = {"no_val": "val/", "bad_conv": "--conv 6", "not_a_model": "junk.pth.tar", "missing_model": "does not exist"}
    assert expected[case] in err
