"""Shared tiny data and model files for the evaluation tests (imported by test_eval_*.py), and the
AP tests of eval_common."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import checkpoint
import models

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]


def save_original_format(model: models.DeepClusterNet, path: Path) -> Path:
    """The released checkpoints' layout: {'epoch', 'arch', 'state_dict'}, DataParallel-style
    ``features.module.N.*`` keys, no BN ``num_batches_tracked``, with top_layer.* and sobel.*."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.startswith("features."):
            k = "features.module." + k[len("features."):]
        sd[k] = v.clone()
    torch.save({"epoch": 500, "arch": model.arch, "state_dict": sd}, path)
    return path


def save_our_format(model: models.DeepClusterNet, path: Path) -> Path:
    torch.save({"epoch": 1, "arch": model.arch, "state_dict": model.state_dict(),
                "model_config": model.config()}, path)
    return path


def make_voc(root: Path, n_per_split: int = 12, size: int = 72, seed: int = 0,
             splits=("train", "val", "trainval", "test")) -> Path:
    """A VOC2007 devkit tree: JPEGImages/, ImageSets/Main/<cls>_<split>.txt, Annotations/.

    Image colour encodes its first class; labels include difficult (0) entries.
    """
    rng = np.random.RandomState(seed)
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "Annotations").mkdir(parents=True)
    ids_of = {}
    n = 0
    for split in ("train", "val", "test"):
        ids = []
        for _ in range(n_per_split):
            n += 1
            iid = f"{n:06d}"
            ids.append(iid)
            cls = rng.randint(0, 4)  # few classes really present
            base = np.array([60 * cls, 255 - 60 * cls, (97 * cls) % 255])
            arr = np.clip(base + rng.randint(-25, 25, size=(size, size + 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(voc / "JPEGImages" / f"{iid}.jpg")
            lab = -np.ones(20, dtype=int)
            lab[cls] = 1
            if n % 3 == 0:
                lab[rng.randint(4, 20)] = 0  # a difficult object
            (voc / "Annotations" / f"{iid}.xml").write_text(f"<annotation><filename>{iid}.jpg</filename></annotation>")
            ids_of.setdefault(split, []).append((iid, lab))
    ids_of["trainval"] = ids_of["train"] + ids_of["val"]
    for split in splits:
        for c, cls in enumerate(VOC_CLASSES):
            lines = [f"{iid} {lab[c]:2d}" for iid, lab in ids_of[split]]
            (voc / "ImageSets" / "Main" / f"{cls}_{split}.txt").write_text("\n".join(lines) + "\n")
    return voc


def _texture(rng: np.random.RandomState, h: int, w: int) -> np.ndarray:
    small = rng.randint(0, 255, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.NEAREST))


def make_oxford(root: Path, prefix: str = "oxc1_", seed: int = 0, n_landmarks: int = 2, per_landmark: int = 4,
                n_distractors: int = 3, W: int = 96, H: int = 72) -> Path:
    """An Oxford5k-style tree: jpg/*.jpg and gt/<q>_{query,good,ok,junk}.txt.

    Each landmark is a texture; its images are noisy shifted copies. The first image of a
    landmark is its query (box = its central part); good/ok/junk split the others.
    """
    rng = np.random.RandomState(seed)
    (root / "jpg").mkdir(parents=True)
    (root / "gt").mkdir()
    for lm in range(n_landmarks):
        tex = _texture(rng, H + 16, W + 16)
        names = []
        for i in range(per_landmark):
            dx, dy = rng.randint(0, 16, size=2)
            arr = np.clip(tex[dy:dy + H, dx:dx + W].astype(int) + rng.randint(-20, 20, (H, W, 3)), 0, 255)
            name = f"landmark{lm}_{i:06d}"
            Image.fromarray(arr.astype(np.uint8)).save(root / "jpg" / f"{name}.jpg")
            names.append(name)
        q = f"landmark{lm}_1"
        (root / "gt" / f"{q}_query.txt").write_text(f"{prefix}{names[0]} 10.0 8.5 {W - 10}.0 {H - 8}.0\n")
        (root / "gt" / f"{q}_good.txt").write_text("\n".join(names[:2]) + "\n")
        (root / "gt" / f"{q}_ok.txt").write_text("\n".join(names[2:3]) + "\n")
        (root / "gt" / f"{q}_junk.txt").write_text("\n".join(names[3:]) + "\n")
    for i in range(n_distractors):
        Image.fromarray(_texture(rng, H, W)).save(root / "jpg" / f"distractor_{i:06d}.jpg")
    return root


def make_revisited(root: Path, name: str = "roxford5k", seed: int = 1) -> Path:
    """A revisited-style set: jpg/ + gnd_<name>.pkl with imlist, qimlist, gnd (bbx/easy/hard/junk)."""
    make_oxford(root, seed=seed)
    imlist = sorted(p.stem for p in (root / "jpg").glob("*.jpg"))
    idx = {n: i for i, n in enumerate(imlist)}
    qimlist, gnd = [], []
    for lm in range(2):
        qimlist.append(f"landmark{lm}_000000")
        gnd.append({"bbx": [10.0, 8.5, 86.0, 64.0], "easy": [idx[f"landmark{lm}_000000"], idx[f"landmark{lm}_000001"]],
                    "hard": [idx[f"landmark{lm}_000002"]], "junk": [idx[f"landmark{lm}_000003"]]})
    with open(root / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return root


# ---------------------------------------------------------------------------------------
# tests: average precision (VOC classification) of eval_common
# ---------------------------------------------------------------------------------------
import pytest  # noqa: E402
from sklearn.metrics import average_precision_score  # noqa: E402

import eval_common  # noqa: E402


def test_ap_hand_computed():
    # ranking: + - + -  -> precisions at the positives 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    ap = eval_common.average_precision([0.9, 0.8, 0.7, 0.1], [1, -1, 1, -1])
    assert ap == pytest.approx((1 + 2 / 3) / 2)


def test_ap_ignores_difficult():
    # the difficult item (label 0) ranked first must not count as a false positive
    with_difficult = eval_common.average_precision([0.95, 0.9, 0.8, 0.7, 0.1], [0, 1, -1, 1, -1])
    assert with_difficult == pytest.approx((1 + 2 / 3) / 2)
    # counted as a negative it would lower AP: (1/2 + 2/4) / 2
    as_negative = eval_common.average_precision([0.95, 0.9, 0.8, 0.7, 0.1], [-1, 1, -1, 1, -1])
    assert as_negative == pytest.approx(0.5)


def test_ap_no_positive_is_nan():
    assert np.isnan(eval_common.average_precision([0.3, 0.2], [-1, 0]))


def test_ap_matches_sklearn_random_and_ties():
    rng = np.random.RandomState(0)
    for trial in range(20):
        n = rng.randint(5, 60)
        labels = rng.choice([-1, 0, 1], size=n, p=[0.6, 0.1, 0.3])
        labels[0] = 1
        scores = rng.randn(n) if trial % 2 else rng.randint(0, 4, size=n).astype(float)  # ties when even
        keep = labels != 0
        ref = average_precision_score(labels[keep] > 0, scores[keep])
        assert eval_common.average_precision(scores, labels) == pytest.approx(ref, abs=1e-12)


def test_ap_voc07_eleven_point():
    # perfect ranking -> 1; one positive ranked second of two -> precision 1/2 at every recall
    assert eval_common.average_precision_voc07([0.9, 0.1], [1, -1]) == pytest.approx(1.0)
    assert eval_common.average_precision_voc07([0.9, 0.1], [-1, 1]) == pytest.approx(0.5)


def test_original_format_checkpoint_loads(tmp_path):
    m = models.alexnet(sobel=True, out=7, input_size=64)
    p = save_original_format(m, tmp_path / "orig.pth.tar")
    sd = torch.load(p, weights_only=True)["state_dict"]
    assert "features.module.0.weight" in sd and "sobel.0.weight" in sd and "top_layer.weight" in sd
    assert not any(k.endswith("num_batches_tracked") for k in sd)
    loaded = checkpoint.load_model(p)
    assert loaded.sobel is not None and loaded.top_layer.out_features == 7
    assert torch.equal(loaded.features[0].weight, m.features[0].weight)
