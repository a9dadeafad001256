"""eval_voc_classif.py: devkit parsing, masked loss, frozen layers, end-to-end, bad inputs."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_voc_classif as voc_eval
import checkpoint
import models
from test_eval_common import VOC_CLASSES, make_voc, save_original_format, save_our_format


@pytest.fixture(scope="module")
def voc(module_tmp) -> Path:
    return make_voc(module_tmp.mktemp("voc"), n_per_split=8)


@pytest.fixture(scope="module")
def alexnet_files(module_tmp) -> dict[str, Path]:
    torch.manual_seed(0)
    d = module_tmp.mktemp("models")
    return {"original": save_original_format(models.alexnet(sobel=True, out=10, input_size=64), d / "orig.pth.tar"),
            "ours": save_our_format(models.alexnet(sobel=False, out=0, input_size=64), d / "ours.pth.tar")}


def voc_args(vocdir: Path, model: Path, exp: Path, *extra: str):
    return voc_eval.get_args_parser().parse_args(
        ["--vocdir", str(vocdir), "--model", str(model), "--exp", str(exp), "--size", "64", "--workers", "0",
         "--nit", "4", "--batch_size", "4", "--no_progress", *extra])


def test_defaults_are_the_originals():
    a = voc_eval.get_args_parser().parse_args(["--vocdir", "v", "--model", "m"])
    assert (a.split, a.nit, a.fc6_8, a.train_batchnorm, a.eval_random_crops, a.stepsize, a.lr, a.wd,
            a.min_scale, a.max_scale, a.seed, a.batch_size) == \
        ("train", 80000, 1, 0, 1, 5000, 0.003, 1e-6, 0.1, 0.5, 31, 16)
    assert voc_eval.VOC_CLASSES == VOC_CLASSES


def test_read_split_labels_and_difficult(voc):
    ids, labels = voc_eval.read_split(voc, "train")
    assert labels.shape == (len(ids), 20)
    text = (voc / "ImageSets" / "Main" / "dog_train.txt").read_text().split()
    assert ids == text[0::2] and labels[:, VOC_CLASSES.index("dog")].tolist() == [int(v) for v in text[1::2]]
    assert set(np.unique(labels)) <= {-1, 0, 1} and (labels == 0).any()


def test_find_voc2007_accepts_devkit_root(voc):
    assert voc_eval.find_voc2007(str(voc.parent)) == voc
    assert voc_eval.find_voc2007(str(voc)) == voc


def test_masked_bce_ignores_difficult():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    labels = torch.tensor([[1, -1, 0], [-1, 0, 1]])
    bce = lambda x, y: float(torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(y)))
    # sum over the non-difficult entries, divided by the batch size (2)
    expected = (bce(2.0, 1.0) + bce(-1.0, 0.0) + bce(0.0, 0.0) + bce(-2.0, 1.0)) / 2
    assert float(voc_eval.masked_bce(logits, labels)) == pytest.approx(expected, rel=1e-6)
    # changing a difficult entry's logit changes nothing
    logits2 = logits.clone()
    logits2[0, 2] = 100.0
    assert float(voc_eval.masked_bce(logits2, labels)) == pytest.approx(expected, rel=1e-6)


def test_per_class_ap_and_table():
    rng = np.random.RandomState(0)
    labels = rng.choice([-1, 0, 1], size=(30, 20), p=[0.6, 0.1, 0.3])
    labels[0] = 1
    scores = rng.randn(30, 20)
    scores_perfect = np.where(labels > 0, 10.0, 0.0) + 0.01 * rng.randn(30, 20)
    assert np.allclose(voc_eval.per_class_ap(scores_perfect, labels), 1.0)
    aps = voc_eval.per_class_ap(scores, labels)
    assert aps.shape == (20,) and np.all((aps >= 0) & (aps <= 1))
    table = voc_eval.format_table(aps)
    assert "aeroplane" in table and "tvmonitor" in table and f"{100 * aps.mean():6.2f}" in table.splitlines()[-1]


def _capture_model(monkeypatch) -> dict:
    seen: dict = {}
    orig = voc_eval.prepare_model

    def spy(model, args):
        seen["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen["model"] = model
        return orig(model, args)
    monkeypatch.setattr(voc_eval, "prepare_model", spy)
    return seen


def test_end_to_end_fc6_8_original_checkpoint(voc, alexnet_files, tmp_path, monkeypatch, capsys):
    seen = _capture_model(monkeypatch)
    res = voc_eval.main(voc_args(voc, alexnet_files["original"], tmp_path / "exp", "--split", "trainval"))
    assert res["test_split"] == "test" and len(res["ap"]) == 20
    _, test_labels = voc_eval.read_split(voc, "test")
    for c, cls in enumerate(VOC_CLASSES):  # AP is defined exactly for the classes with positives
        assert (0 <= res["ap"][cls] <= 100) if (test_labels[:, c] == 1).any() else res["ap"][cls] is None
    assert np.isclose(res["mAP"], np.mean([a for a in res["ap"].values() if a is not None]))
    m, before = seen["model"], seen["before"]
    assert m.top_layer.out_features == 20
    # conv layers (and BN, train_batchnorm 0) frozen; fc layers trained
    for k, v in m.features.state_dict().items():
        assert torch.equal(v.cpu(), before["features." + k]), k
    assert not torch.equal(m.classifier[1].weight.cpu(), before["classifier.1.weight"])
    out = capsys.readouterr().out
    assert "mAP" in out and "tvmonitor" in out
    # strict JSON: a class without positives (cow: none in this data) is null, named in a warning
    text = (tmp_path / "exp" / "results.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds a bare {c}"))
    assert saved["mAP"] == pytest.approx(res["mAP"])
    assert saved["ap"]["cow"] is None and "cow" in saved["undefined_ap"]
    assert "class cow has no positive image in the test split" in out
    # what was evaluated and how: the model file (hash, size), the layers trained, the protocol
    model = alexnet_files["original"]
    assert saved["model"] == {"path": os.path.abspath(model), "size": model.stat().st_size,
                              "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
    assert (saved["layer"], saved["lr"], saved["iterations"], saved["epochs"]) == ("fc6-8", 0.003, 4, 4 * 4 / 16)
    assert "trainval" in saved["protocol"] and "standard AP" in saved["protocol"]


def test_end_to_end_all_layers_tencrop(voc, alexnet_files, tmp_path, monkeypatch):
    seen = _capture_model(monkeypatch)
    res = voc_eval.main(voc_args(voc, alexnet_files["ours"], tmp_path / "exp", "--fc6_8", "0",
                                 "--eval_random_crops", "0", "--stepsize", "2"))
    assert res["test_split"] == "val" and np.isfinite(res["mAP"])
    m, before = seen["model"], seen["before"]
    assert not torch.equal(m.features[0].weight.cpu(), before["features.0.weight"])  # fine-tuned


def test_train_batchnorm_trains_only_bn_in_features(alexnet_files):
    m = checkpoint.load_model(alexnet_files["ours"])
    args = voc_args(Path("."), alexnet_files["ours"], Path("."), "--train_batchnorm", "1")
    params = voc_eval.prepare_model(m, args)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("features.")} == \
        {f"features.{i}.{w}" for i, mod in enumerate(m.features) if isinstance(mod, torch.nn.BatchNorm2d)
         for w in ("weight", "bias")}
    assert len(params) == len(trainable)


def test_lr_halves_every_stepsize_and_grad_clipped(monkeypatch):
    lrs, norms = [], []
    orig_step = torch.optim.SGD.step

    def step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        norms.append(float(torch.cat([p.grad.flatten() for p in self.param_groups[0]["params"]]).norm()))
        return orig_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 20))
    with torch.no_grad():
        net[1].weight.mul_(1000)  # huge logits -> huge gradients before clipping
    loader = [(1000 * torch.randn(4, 3, 2, 2), torch.ones(4, 20, dtype=torch.long)) for _ in range(2)]
    args = voc_args(Path("."), Path("m"), Path("."), "--stepsize", "2", "--nit", "5", "--lr", "0.004", "--fc6_8", "0")
    losses = voc_eval.train(net, list(net.parameters()), loader, torch.device("cpu"), args)
    assert len(losses) == 5  # cycles over the 2-batch loader
    assert lrs == pytest.approx([0.004, 0.004, 0.002, 0.002, 0.001])
    assert max(norms) <= 10.0 + 1e-3


@pytest.mark.parametrize("case", ["missing_split", "no_vocdir", "missing_image", "wrong_size"])
def test_bad_inputs_exit_cleanly(case, voc, alexnet_files, tmp_path, capsys):
    vocdir, extra = voc, []
    if case == "missing_split":
        vocdir = make_voc(tmp_path / "v", n_per_split=2, splits=("train", "trainval", "test"))  # no val split
    elif case == "no_vocdir":
        vocdir = tmp_path / "nowhere"
    elif case == "missing_image":
        vocdir = make_voc(tmp_path / "v", n_per_split=2)
        (vocdir / "JPEGImages" / "000001.jpg").unlink()  # a train (and trainval) image: read by every run
    else:
        extra = ["--size", "96"]
    rc = voc_eval.run(["--vocdir", str(vocdir), "--model", str(alexnet_files["ours"]), "--exp", str(tmp_path / "e"),
                       "--size", "64", "--workers", "0", "--nit", "1", "--no_progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err
    expected = {"missing_split": "aeroplane_val.txt", "no_vocdir": "does not exist",
                "missing_image": "missing from JPEGImages", "wrong_size": "--size is 96"}
    assert expected[case] in err


@pytest.mark.parametrize("flags", [("--fc6_8", "0"), ("--fc6_8", "1", "--train_batchnorm", "1")])
def test_bn_always_eval_mode_and_head_init_as_original(flags, voc, alexnet_files, tmp_path, monkeypatch):
    """While training, no BatchNorm ever runs in train mode (running statistics untouched), and
    the re-initialised fc6 / fc7 / 20-way top layer start with biases 0.1."""
    seen: dict = {}
    orig = voc_eval.prepare_model

    def spy(model, args):
        params = orig(model, args)
        seen["start"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen["modes"] = modes = []
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.register_forward_pre_hook(lambda mod, inp: modes.append((mod.training, torch.is_grad_enabled())))
        seen["model"] = model
        return params
    monkeypatch.setattr(voc_eval, "prepare_model", spy)
    voc_eval.main(voc_args(voc, alexnet_files["ours"], tmp_path / "exp", "--nit", "2", *flags))
    m, start = seen["model"], seen["start"]
    fcs = [k for k, mod in m.classifier.named_children() if isinstance(mod, torch.nn.Linear)]
    assert len(fcs) == 2
    for name in [f"classifier.{k}.bias" for k in fcs] + ["top_layer.bias"]:
        assert torch.all(start[name] == 0.1), name
    assert m.top_layer.out_features == 20
    assert abs(float(start["top_layer.weight"].abs().max()) - 1 / 64) < 1e-3  # U(-1/sqrt(4096), +)
    for k in fcs:
        assert float(start[f"classifier.{k}.weight"].std()) == pytest.approx(0.01, rel=0.05)
    train_fw = [t for t, grad in seen["modes"] if grad]
    assert train_fw and not any(train_fw)  # BN forwards during training, all in eval mode
    for k, v in m.state_dict().items():
        if "running_" in k or "num_batches" in k:
            assert torch.equal(v.cpu(), start[k].cpu()), k
    bn_w = [k for k, mod in m.features.named_children() if isinstance(mod, torch.nn.BatchNorm2d)][0]
    assert not torch.equal(m.features.get_submodule(bn_w).weight.detach().cpu(), start[f"features.{bn_w}.weight"])


def test_ap_ties_count_against_positives():
    # one class: 0.9 (+), 0.5 + d (+), 0.5 (-), 0.5 (difficult, ignored), 0.1 (-).
    # The original lowers positives by 1e-5 before ranking: a positive ahead of a negative by
    # less than that (or tied with it) ranks after it: +, -, +, - -> AP = (1 + 2/3) / 2 = 5/6.
    labels = np.array([[1], [1], [-1], [0], [-1]])

    def ap(d: float) -> float:
        return float(voc_eval.per_class_ap(np.array([[0.9], [0.5 + d], [0.5], [0.5], [0.1]]), labels)[0])
    assert ap(5e-6) == pytest.approx(5 / 6)   # raw scores would rank +, +, -, -: AP 1
    assert ap(0.0) == pytest.approx(5 / 6)
    assert ap(1e-3) == pytest.approx(1.0)


def test_training_visits_one_fixed_shuffled_order_every_pass(voc, alexnet_files, tmp_path, monkeypatch):
    import eval_common
    seen: dict[int, list[int]] = {}
    get = eval_common.LabeledImages.__getitem__
    monkeypatch.setattr(eval_common.LabeledImages, "__getitem__",
                        lambda self, i: seen.setdefault(id(self), []).append(i) or get(self, i))
    sizes = []
    bce = voc_eval.masked_bce
    monkeypatch.setattr(voc_eval, "masked_bce", lambda lo, la: sizes.append(len(la)) or bce(lo, la))
    # 8 train images, batch 3: passes of 3 + 3 + 2 images (no image dropped), same order each time
    voc_eval.main(voc_args(voc, alexnet_files["ours"], tmp_path / "exp", "--nit", "4", "--batch_size", "3"))
    train = next(iter(seen.values()))  # the training set is read first
    assert sizes == [3, 3, 2, 3]
    assert sorted(train[:8]) == list(range(8)) and train[:8] != list(range(8))
    assert train[8:11] == train[:3]
