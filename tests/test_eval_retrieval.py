"""eval_retrieval.py: R-MAC regions, retrieval AP, ground-truth readers, end-to-end, cache, bad inputs."""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_retrieval as R
import checkpoint
import models
from test_eval_common import make_oxford, make_revisited, save_original_format, save_our_format


# ---------------------------------------------------------------------------------------
# R-MAC region grid
# ---------------------------------------------------------------------------------------
def expected_counts(W: int, H: int, L: int = 3) -> list[int]:
    """Regions per scale from the paper's definition, written independently of the code:
    l = 1 regions of side min(W, H) are placed along the long side in the number n in 2..7
    (when W != H) whose consecutive overlap 1 - (long - short) / ((n - 1) * short) is closest
    to 0.4; scale l then has (l + n - 1) x l regions (l x l for a square)."""
    short, long_ = min(W, H), max(W, H)
    extra = 0
    if W != H:
        best = min(range(2, 8), key=lambda n: abs(1 - (long_ - short) / ((n - 1) * short) - 0.4))
        extra = best - 1
    return [(l + extra) * l for l in range(1, L + 1)]


@pytest.mark.parametrize("W,H", [(10, 10), (64, 64), (4, 3), (3, 4), (64, 48), (40, 30), (30, 10), (32, 24),
                                 (20, 13)])
def test_rmac_region_counts(W, H):
    regions = R.rmac_regions(W, H, 3)
    short = min(W, H)
    per_scale = []
    for l in (1, 2, 3):
        side = math.floor(2 * short / (l + 1))
        these = [r for r in regions if r[2] == side]
        per_scale.append(len(these))
        for x, y, w, h in these:  # inside the map
            assert w == h == side and 0 <= x <= W - w and 0 <= y <= H - h
        # uniform spread: the first region touches the top-left corner, the last the bottom-right
        assert (these[0][0], these[0][1]) == (0, 0)
        assert (these[-1][0] + side, these[-1][1] + side) == (W, H)
    assert per_scale == expected_counts(W, H)


def test_rmac_known_counts():
    assert len(R.rmac_regions(10, 10, 3)) == 1 + 4 + 9       # square
    assert len(R.rmac_regions(64, 48, 3)) == 2 + 6 + 12      # 4:3 landscape: 2 regions at l=1
    assert len(R.rmac_regions(48, 64, 3)) == 2 + 6 + 12      # portrait: symmetric
    assert len(R.rmac_regions(30, 10, 3)) == 4 + 10 + 18     # 3:1
    assert R.rmac_regions(10, 10, 1) == [(0, 0, 10, 10)]


def test_region_vectors_are_max_pooled_and_normalised():
    fmap = torch.zeros(2, 4, 4)
    fmap[0, 0, 0] = 3.0
    fmap[1, 3, 3] = 4.0
    v = R.region_vectors(fmap, 1)  # a single 4x4 region
    assert v.shape == (1, 2) and torch.allclose(v[0], torch.tensor([0.6, 0.8]))


# ---------------------------------------------------------------------------------------
# retrieval AP (Oxford protocol)
# ---------------------------------------------------------------------------------------
def ap_reference(scores, pos, junk) -> float:
    """The Oxford compute_ap loop: walk the ranking, skip junk, trapezoidal precision."""
    ranking = sorted(range(len(scores)), key=lambda i: -scores[i])
    old_recall, old_precision, ap, hits, j = 0.0, 1.0, 0.0, 0, 0
    for i in ranking:
        if i in junk:
            continue
        if i in pos:
            hits += 1
        recall, precision = hits / len(pos), hits / (j + 1)
        ap += (recall - old_recall) * (old_precision + precision) / 2
        old_recall, old_precision = recall, precision
        j += 1
    return ap


def test_retrieval_ap_hand_computed():
    # ranking 0..4; positives at ranks 0 and 2 -> (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    assert R.retrieval_ap(scores, np.array([0, 2]), np.array([], int)) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    # the junk image at rank 1 is removed: both positives first -> AP 1
    assert R.retrieval_ap(scores, np.array([0, 2]), np.array([1])) == pytest.approx(1.0)
    # a positive never ranked first: rank 1 only -> (0 + 1/2)/2
    assert R.retrieval_ap(scores, np.array([1]), np.array([], int)) == pytest.approx(0.25)
    assert np.isnan(R.retrieval_ap(scores, np.array([], int), np.array([3])))


def test_retrieval_ap_matches_reference_loop():
    rng = np.random.RandomState(0)
    for _ in range(30):
        n = rng.randint(5, 40)
        perm = rng.permutation(n)
        npos, njunk = rng.randint(1, n // 2 + 1), rng.randint(0, n // 4 + 1)
        pos, junk = perm[:npos], perm[npos:npos + njunk]
        scores = rng.randn(n)
        assert R.retrieval_ap(scores, pos, junk) == pytest.approx(ap_reference(scores, set(pos), set(junk)))


def test_mean_ap_skips_queries_without_positives():
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    gts = [{"pos": np.array([1]), "junk": np.array([0])}, {"pos": np.array([], int), "junk": np.array([], int)}]
    m, aps = R.mean_ap(scores, gts)
    assert m == pytest.approx(100.0) and np.isnan(aps[1])


# ---------------------------------------------------------------------------------------
# ground truth readers
# ---------------------------------------------------------------------------------------
def test_load_standard_strips_prefix(tmp_path):
    rset = R.load_dataset(str(make_oxford(tmp_path / "ox")), None)
    assert len(rset.queries) == 2 and list(rset.protocols) == ["standard"]
    q = rset.queries[0]
    assert Path(q.path).name == "landmark0_000000.jpg" and q.box == (10.0, 8.5, 86.0, 64.0)
    g = rset.protocols["standard"][0]
    names = [rset.db_names[i] for i in g["pos"]]
    assert names == ["landmark0_000000", "landmark0_000001", "landmark0_000002"]  # good + ok
    assert [rset.db_names[i] for i in g["junk"]] == ["landmark0_000003"]


def test_load_revisited_protocols(tmp_path):
    rset = R.load_dataset(str(make_revisited(tmp_path / "rox")), None)
    assert set(rset.protocols) == {"easy", "medium", "hard"}
    e, m, h = (rset.protocols[k][0] for k in ("easy", "medium", "hard"))
    assert len(e["pos"]) == 2 and len(h["pos"]) == 1 and len(m["pos"]) == 3
    assert set(h["pos"]) <= set(e["junk"]) and set(e["pos"]) <= set(h["junk"])


# ---------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vgg_original(module_tmp) -> Path:
    torch.manual_seed(0)
    m = models.vgg16(sobel=True, out=10, input_size=32)
    return save_original_format(m, module_tmp.mktemp("vgg") / "vgg16_orig.pth.tar")


@pytest.fixture(scope="module")
def datasets(module_tmp) -> dict[str, Path]:
    root = module_tmp.mktemp("retrieval")
    return {"oxford": make_oxford(root / "oxford5k", seed=0),
            "paris": make_oxford(root / "paris6k", prefix="", seed=1),
            "roxford": make_revisited(root / "roxford5k", seed=2)}


def r_args(data: Path, model: Path, exp: Path, *extra: str):
    return R.get_args_parser().parse_args(["--data", str(data), "--model", str(model), "--exp", str(exp),
                                           "--S", "48", "--no_progress", *extra])


@pytest.fixture(scope="module")
def shared_exp(module_tmp) -> Path:
    return module_tmp.mktemp("exp_retrieval")


def test_end_to_end_oxford_whitened_on_paris_and_cache(datasets, vgg_original, shared_exp, monkeypatch):
    args = r_args(datasets["oxford"], vgg_original, shared_exp, "--whiten_data", str(datasets["paris"]))
    res = R.main(args)
    assert res["dataset"] == "oxford5k" and res["whiten"] == "paris6k"
    mAP = res["mAP"]["standard"]
    assert 0 <= mAP <= 100  # a random VGG: no quality to expect, see the synthetic tests below
    cache = sorted(p.name for p in (shared_exp / "cache").glob("*.npz"))
    assert len(cache) == 3 and any(n.startswith("paris6k_db") for n in cache)

    # a second run only re-scores: extraction must not be called
    def boom(*a, **k):
        raise AssertionError("features recomputed despite the cache")
    monkeypatch.setattr(R, "extract", boom)
    again = R.main(args)
    assert again["mAP"]["standard"] == pytest.approx(mAP)


def test_end_to_end_revisited(datasets, vgg_original, shared_exp):
    res = R.main(r_args(datasets["roxford"], vgg_original, shared_exp, "--whiten_data",
                        str(datasets["paris"]), "--dim", "16"))
    assert set(res["mAP"]) == {"easy", "medium", "hard"} and res["dim"] == 16
    assert all(0 <= v <= 100 for v in res["mAP"].values())


def test_pca_whitening_and_aggregation():
    rng = np.random.RandomState(0)
    x = rng.randn(500, 6) @ rng.randn(6, 6) + 3.0             # correlated, off-centre
    mean, P = R.learn_pca_whitening(x.astype(np.float32), 4)
    w = (x - mean) @ P.T
    assert P.shape == (4, 6)
    assert np.allclose(np.cov(w, rowvar=False, bias=True), np.eye(4), atol=1e-3)  # whitened
    # images = sums of whitened, normalised regions: unit norm, and an image matches itself best
    regions = rng.randn(30, 6).astype(np.float32)
    offsets = np.array([0, 10, 20, 30])
    db = R.aggregate(regions, offsets, mean, P)
    assert np.allclose(np.linalg.norm(db, axis=1), 1, atol=1e-5)
    q = R.aggregate(regions[10:20], np.array([0, 10]), mean, P)
    scores = q @ db.T
    assert scores.argmax() == 1 and scores[0, 1] == pytest.approx(1, abs=1e-5)
    assert R.mean_ap(scores, [{"pos": np.array([1]), "junk": np.array([], int)}])[0] == pytest.approx(100)


def test_features_are_conv5_3_after_relu(vgg_original):
    m = checkpoint.load_model(vgg_original)
    net = m.trunk(13).freeze()
    assert isinstance(net.body[-1], torch.nn.ReLU) and len([x for x in net.body if isinstance(x, torch.nn.Conv2d)]) == 13
    out = net(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 512, 4, 6) and (out >= 0).all()  # 4 max-pools, not 5


@pytest.mark.parametrize("case", ["alexnet", "box_outside", "no_gt", "no_dir", "bad_gnd"])
def test_bad_inputs_exit_cleanly(case, datasets, vgg_original, tmp_path, capsys):
    data, model = datasets["oxford"], vgg_original
    if case == "alexnet":
        model = save_our_format(models.alexnet(out=0, input_size=64), tmp_path / "alex.pth.tar")
    elif case == "box_outside":
        data = make_oxford(tmp_path / "ox")
        (data / "gt" / "landmark1_1_query.txt").write_text("oxc1_landmark1_000000 200 150 260 190\n")
    elif case == "no_gt":
        data = tmp_path / "empty"
        (data / "jpg").mkdir(parents=True)
        (data / "jpg" / "a.jpg").write_bytes((datasets["oxford"] / "jpg" / "distractor_000000.jpg").read_bytes())
    elif case == "no_dir":
        data = tmp_path / "nowhere"
    else:
        data = make_oxford(tmp_path / "rox")
        with open(data / "gnd_roxford5k.pkl", "wb") as f:
            pickle.dump({"imlist": ["x"]}, f)
    rc = R.run(["--data", str(data), "--model", str(model), "--exp", str(tmp_path / "e"), "--S", "48",
                "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err
    expected = {"alexnet": "needs a vgg16", "box_outside": "lies outside", "no_gt": "gt/",
                "no_dir": "does not exist", "bad_gnd": "gnd_roxford5k.pkl"}
    assert expected[case] in err


# ---------------------------------------------------------------------------------------
# details as the original
# ---------------------------------------------------------------------------------------
def test_corrupt_paris_images_excluded_by_name(tmp_path, caplog):
    root = make_oxford(tmp_path / "paris6k", prefix="", n_landmarks=1, n_distractors=1)
    src = root / "jpg" / "distractor_000000.jpg"
    for n in ("paris_louvre_000136", "paris_triomphe_000867"):
        (root / "jpg" / f"{n}.jpg").write_bytes(src.read_bytes())
    (root / "jpg" / "paris_louvre_000137.jpg").write_bytes(src.read_bytes())  # a neighbour name stays
    with open(root / "gt" / "landmark0_1_junk.txt", "a") as f:
        f.write("paris_louvre_000136\n")
    (root / "gt").rename(root / "lab")  # the original's name for the ground-truth folder
    caplog.set_level("INFO")
    rset = R.load_standard(root)
    assert "paris_louvre_000137" in rset.db_names
    assert not {"paris_louvre_000136", "paris_triomphe_000867"} & set(rset.db_names)
    assert len(rset.db_names) == len(rset.db_paths) == 4 + 1 + 1
    logs = caplog.text
    assert "2 known-corrupt Paris6k image(s) excluded" in logs and "paris_louvre_000136.jpg" in logs
    assert "not in jpg/" not in logs  # the excluded junk entry is not reported as missing
    assert len(R.CORRUPT_PARIS6K) == 20


def test_resize_is_bilinear_and_query_box_rounded():
    from PIL import Image
    rng = np.random.RandomState(0)
    img = Image.fromarray(rng.randint(0, 255, (30, 50, 3)).astype(np.uint8))
    out, r = R.resize_longest(img, 20)
    assert out.size == (20, 12) and r == pytest.approx(0.4)
    assert np.array_equal(np.asarray(out), np.asarray(img.resize((20, 12), Image.BILINEAR)))
    # box (3.6, 2.4, 41.2, 27.6) * 0.4 = (1.44, 0.96, 16.48, 11.04) -> rounded (1, 1, 16, 11)
    crop = R.crop_query(img, (3.6, 2.4, 41.2, 27.6), 20, "q")
    assert np.array_equal(np.asarray(crop), np.asarray(out)[1:11, 1:16])


def test_pca_whitening_floors_small_eigenvalues():
    rng = np.random.RandomState(1)
    x = np.zeros((200, 5))
    x[:, :3] = rng.randn(200, 3) * [3.0, 2.0, 1.0]   # two directions without variance
    mean, P = R.learn_pca_whitening(x.astype(np.float32), 5)
    assert P.shape == (5, 5)  # all requested dims kept, as the original
    lam = np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True)).max()
    # the two flat directions are scaled by 1 / sqrt(1e-5 * largest eigenvalue)
    norms = np.sort(np.linalg.norm(P, axis=1))
    assert norms[-1] == pytest.approx(1 / np.sqrt(1e-5 * lam), rel=1e-3)
    assert norms[-2] == pytest.approx(1 / np.sqrt(1e-5 * lam), rel=1e-3)
    w = (x - mean) @ P.T
    assert np.allclose(np.cov(w[:, :3], rowvar=False, bias=True), np.eye(3), atol=1e-3)
