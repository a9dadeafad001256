"""Shared fixtures: the repo on sys.path, small image folders in the real formats."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "2")
# Checkpoints are written and renamed as always, without the flush to the disk that only a power
# loss needs (fileio.fsync_enabled; subprocesses inherit it); test_fsync_by_default checks the default.
os.environ["DEEPCLUSTER_FSYNC"] = "0"


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
    """scikit-learn's 1,797 digits exported as an ImageFolder (class folders 0..9), 32 px."""
    import data

    return data.export_digits(tmp_path_factory.mktemp("digits") / "digits", size=32)


class ModuleTmp:
    """``mktemp(name)`` for module-scoped fixtures; everything made is removed with the module.

    The suite writes full-size AlexNet/VGG checkpoints (100-500 MB each). pytest.ini removes a
    passed test's ``tmp_path`` at its teardown; this does the same for module-level data, so that
    the disk used at any moment stays near one module's worth instead of the whole suite's.
    """

    def __init__(self, factory: pytest.TempPathFactory, name: str):
        self.root = factory.mktemp(name)

    def mktemp(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    tmp = ModuleTmp(tmp_path_factory, request.module.__name__.rsplit(".", 1)[-1])
    yield tmp
    shutil.rmtree(tmp.root, ignore_errors=True)


def make_image_folder(root: Path, n_classes: int = 3, per_class: int = 8, size: int = 40,
                      ext: str = "jpg", seed: int = 0) -> Path:
    """Generate a small ImageFolder of random-colour images, one colour family per class."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    for c in range(n_classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.randint(0, 255, size=3)
        for i in range(per_class):
            arr = np.clip(base + rng.randint(-30, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"img{i:03d}.{ext}")
    return root


def make_split_folder(root: Path, n_classes: int = 3, train_per_class: int = 4, val_per_class: int = 2,
                      size: int = 40) -> Path:
    """``root/train`` and ``root/val`` class folders (the layout of the evaluations' --data);
    val images drawn with another seed."""
    make_image_folder(root / "train", n_classes=n_classes, per_class=train_per_class, size=size)
    make_image_folder(root / "val", n_classes=n_classes, per_class=val_per_class, size=size, seed=1)
    return root


@pytest.fixture
def tiny_image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


def digits_subset(digits_dir: str, root: Path, per_class: int) -> str:
    """The first ``per_class`` digits of each class, copied under ``root`` (fast end-to-end runs)."""
    import shutil

    for cls in sorted(Path(digits_dir).iterdir()):
        if cls.is_dir():
            (root / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:per_class]:
                shutil.copy(f, root / cls.name / f.name)
    return str(root)
