"""Hostile data: broken, odd and dangerous files are converted, skipped or refused by name."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import main
import checkpoint
from conftest import make_image_folder


def _jpeg_bytes(seed: int = 0, size: int = 32) -> bytes:
    arr = np.random.RandomState(seed).randint(0, 255, (size, size, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _png_bytes(seed: int = 0, size: int = 32) -> bytes:
    arr = np.random.RandomState(seed).randint(0, 255, (size, size, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def broken_files(tmp_path) -> dict[str, Path]:
    d = tmp_path / "broken"
    d.mkdir()
    files = {
        "zero": d / "zero.jpg",
        "truncated_jpeg": d / "truncated.jpg",
        "truncated_png": d / "truncated.png",
        "corrupt_png": d / "corrupt.png",
        "text": d / "notes.jpg",
        "bomb": d / "bomb.png",
    }
    files["zero"].write_bytes(b"")
    files["truncated_jpeg"].write_bytes(_jpeg_bytes()[:300])
    files["truncated_png"].write_bytes(_png_bytes()[:200])
    png = bytearray(_png_bytes())
    png[60:80] = b"\xff" * 20  # inside the IDAT chunk: CRC / zlib failure
    files["corrupt_png"].write_bytes(bytes(png))
    files["text"].write_text("this is a text file with an image extension\n")
    # 1-bit 12000 x 12000 = 144 Mpx: small on disk, above PIL's 89 Mpx bomb threshold
    Image.new("1", (12000, 12000)).save(files["bomb"], optimize=True)
    return files


def test_each_broken_file_is_refused_by_name(broken_files):
    for kind, path in broken_files.items():
        with pytest.raises(data.BadImageError) as e:
            data.load_rgb(str(path))
        assert path.name in str(e.value), kind
        assert data.check_image(str(path)) is not None, kind
    # the cheap header check already catches the empty, text and bomb files
    for kind in ("zero", "text", "bomb"):
        assert data.check_image(str(broken_files[kind]), full=False) is not None, kind


def test_odd_but_valid_modes_are_converted_to_rgb(tmp_path):
    rng = np.random.RandomState(0)
    imgs = {
        "gray.png": Image.fromarray(rng.randint(0, 255, (20, 24)).astype(np.uint8), mode="L"),
        "rgba.png": Image.fromarray(rng.randint(0, 255, (20, 24, 4)).astype(np.uint8), mode="RGBA"),
        "cmyk.jpg": Image.fromarray(rng.randint(0, 255, (20, 24, 4)).astype(np.uint8), mode="CMYK"),
        "palette.png": Image.fromarray(rng.randint(0, 255, (20, 24, 3)).astype(np.uint8)).convert("P"),
        "gray16.png": Image.fromarray(rng.randint(0, 65535, (20, 24)).astype(np.uint16)),
    }
    for name, img in imgs.items():
        img.save(tmp_path / name)
        out = data.load_rgb(str(tmp_path / name))
        assert out.mode == "RGB" and out.size == (24, 20), name
    g16 = np.asarray(data.load_rgb(str(tmp_path / "gray16.png")))
    assert g16.max() > 100  # 16-bit values were rescaled, not clipped to white/black


def test_unreadable_permissions_are_named(tmp_path, monkeypatch):
    p = tmp_path / "secret.jpg"
    p.write_bytes(_jpeg_bytes())
    real_open = open

    def guarded_open(file, *a, **kw):
        if str(file) == str(p):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **kw)
    monkeypatch.setattr("builtins.open", guarded_open)
    with pytest.raises(data.BadImageError, match="secret.jpg.*Permission denied"):
        data.load_rgb(str(p))


def test_symlink_loop_and_empty_folders(tmp_path):
    root = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=3)
    os.symlink(root / "class0", root / "class0" / "loop")  # class0/loop -> class0
    paths, targets, classes = data.scan_image_folder(root)
    assert len(paths) == 6 and classes == ["class0", "class1"] and sorted(set(targets)) == [0, 1]
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "readme.txt").write_text("no images here")
    with pytest.raises(data.DataError, match="no images"):
        data.scan_image_folder(tmp_path / "empty")


def test_fuzzed_files_never_escape_as_other_errors(tmp_path):
    """Random byte damage to real JPEG/PNG files: a decoded RGB image or a BadImageError."""
    rng = np.random.RandomState(1234)
    sources = [_jpeg_bytes(s) for s in range(3)] + [_png_bytes(s) for s in range(3)]
    outcomes = {"ok": 0, "refused": 0}
    for trial in range(300):
        buf = bytearray(sources[trial % len(sources)])
        action = trial % 3
        if action == 0:      # flip random bytes
            for pos in rng.randint(0, len(buf), size=rng.randint(1, 20)):
                buf[pos] = rng.randint(0, 256)
        elif action == 1:    # truncate
            buf = buf[:rng.randint(0, len(buf))]
        else:                # splice garbage in the middle
            pos = rng.randint(0, len(buf))
            buf[pos:pos] = rng.bytes(rng.randint(1, 64))
        f = io.BytesIO(bytes(buf))
        path = str(tmp_path / "fuzz_sample.bin")
        Path(path).write_bytes(f.getvalue())
        try:
            img = data.load_rgb(path)
            assert img.mode == "RGB"
            outcomes["ok"] += 1
        except data.BadImageError as e:
            assert "fuzz_" in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 50 and outcomes["ok"] > 10  # both paths exercised


def test_main_refuses_then_skips_broken_files(tmp_path, broken_files, capsys):
    root = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=6, size=40)
    for kind in ("zero", "truncated_jpeg", "text"):
        target = root / "class1" / broken_files[kind].name
        target.write_bytes(broken_files[kind].read_bytes())
    exp = tmp_path / "exp"
    args = [str(root), "--exp", str(exp), "--size", "64", "--k", "3", "--pca", "8", "--batch", "4",
            "--workers", "0", "--epochs", "1", "--no_progress"]
    assert main.run(args) == 2
    err = capsys.readouterr().err
    assert "3 unreadable image(s)" in err and "--bad_images skip" in err
    listed = (exp / "bad_images.txt").read_text()
    assert all(n in listed for n in ("zero.jpg", "truncated.jpg", "notes.jpg"))
    assert main.run(args + ["--bad_images", "skip"]) == 0
    assert len(checkpoint.ClusterLog(exp / "clusters").load(0)) == 12  # trained on the 12 good images


def test_reduced_size_jpeg_decoding(tmp_path):
    """draft: a JPEG >= 2x the resize target decodes smaller but still >= the target; smaller
    JPEGs, PNGs and the training path (dataset.load) decode in full."""
    rng = np.random.RandomState(0)
    arr = rng.randint(0, 255, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=90)
    Image.fromarray(arr[:120, :160]).save(tmp_path / "small.jpg", quality=90)
    Image.fromarray(arr).save(tmp_path / "big.png")
    assert data.load_rgb(str(tmp_path / "big.jpg"), draft=73).size == (100, 75)  # 1/4 scale, >= 73
    assert data.load_rgb(str(tmp_path / "big.jpg"), draft=140).size == (200, 150)  # 1/2
    assert data.load_rgb(str(tmp_path / "small.jpg"), draft=73).size == (160, 120)  # < 2x: full
    assert data.load_rgb(str(tmp_path / "big.png"), draft=73).size == (400, 300)
    assert data.load_rgb(str(tmp_path / "big.jpg")).size == (400, 300)
    ds = data.IndexedImageFolder(tmp_path, transform=lambda im: im.size, draft=73)
    big = ds.paths.index(str(tmp_path / "big.jpg"))
    assert ds[big] == ((100, 75), big) and ds.load(big).size == (400, 300)
