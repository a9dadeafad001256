"""What a new user trips on (issue 25): each case through the scripts' CLI (``run(argv)`` in-process,
or the launcher in a subprocess), asserting the one ``error:`` line, the exit code and that nothing
was written or lost."""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_image_folder, make_split_folder

import checkpoint
import cli
import data
import deepcluster as dc
import distributed
import engine
import eval_knn
import eval_linear
import eval_retrieval
import eval_voc_classif
import export
import fileio
import knn
import launch
import main
import main_deepclusterv2
import models
import preempt
import runfolder
import util
from test_resume import small_model
from test_survival import torchrun
from test_visu import ar
from visu import gradient_ascent, report


@pytest.fixture(scope="module")
def images36(module_tmp) -> str:
    return str(make_image_folder(module_tmp.mktemp("img36") / "images", n_classes=3, per_class=12, size=16))


@pytest.fixture(scope="module")
def knn_dir(module_tmp) -> Path:
    return make_split_folder(module_tmp.mktemp("knn") / "data", size=32)


@pytest.fixture(scope="module")
def ckpt64(module_tmp) -> Path:
    """An AlexNet + Sobel checkpoint trained at 64 px (our layout, with its model_config)."""
    torch.manual_seed(0)
    model = models.build_model("alexnet", sobel=True, out=3, input_size=64)
    path = module_tmp.mktemp("ckpt") / "checkpoint.pth.tar"
    torch.save({"epoch": 1, "arch": "alexnet", "state_dict": model.state_dict(), "model_config": model.config()},
               path)
    return path


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) >= 1 and lines[-1].count("error:") == 1 and "Traceback" not in err, err
    return lines[-1]


def run(mod, argv: list[str]) -> int:
    """A script's exit code for ``argv``, in-process (the visu scripts have no ``run``)."""
    return mod.run(argv) if hasattr(mod, "run") else cli.run_cli(mod.main, mod.get_args_parser(), argv)


def parse_error(capsys, argv: list[str]) -> str:
    """main.py's flag check: argparse's usage, then one error line, exit 2."""
    with pytest.raises(SystemExit) as e:
        main.run(argv)
    assert e.value.code == 2
    return error_line(capsys)


# ---------------------------------------------------------------------------------------
# 1, 2, 4: --resume EXP continues that run; small data is adapted and warned about; the bar
# ---------------------------------------------------------------------------------------
def test_resume_folder_continues_that_run_with_its_flags(images36, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dc, "build_model", small_model)
    monkeypatch.setattr(cli, "progress", lambda disable: False)  # bars shown, as on a terminal
    monkeypatch.setattr(engine, "SHOW_EVERY_S", 0.0)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "alex"
    first = [images36, "--exp", str(folder), "--size", "64", "--k", "18", "--batch", "8",
             "--workers", "0", "--epochs", "1", "--lr", "0.02", "--checkpoints", "1000", "--seed", "7"]
    assert main.run(first) == 0
    out, err = capsys.readouterr()
    # 2: 36 images: --pca 256 adapted to 9 (a quarter of them), --k 18 warned (2 images per cluster)
    assert "--pca 256 is more than half the 36 images" in out and "--pca 9 instead" in out
    assert "--k 18 for 36 images: 2.0 images per cluster" in out
    assert json.loads((folder / "args.json").read_text())["pca"] == 9
    # 4: the training bar never shows a 0.000 that no loss was read for
    assert "loss=-" in err and "loss=0.000" not in err

    # as one writes it after a break: no --exp, no --size/--k, a new --epochs
    assert main.run(["--resume", str(folder), "--epochs", "2", "--workers", "0", "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "exp").exists() and not (tmp_path / "exp_demo").exists()
    assert torch.load(folder / "checkpoint.pth.tar", weights_only=True)["epoch"] == 2
    assert [r["epoch"] for r in fileio.read_jsonl(folder / "log.jsonl")] == [0, 1]
    assert f"flags of the run in {folder}, except --epochs 2 (the run's: 1)" in out
    last = runfolder.read_history(folder)[-1]["args"]
    assert (last["batch"], last["lr"], last["seed"], last["nmb_cluster"], last["pca"], last["sobel"]) == \
        (8, 0.02, 7, 18, 9, False)
    # given explicitly, a flag the checkpoint fixes is still checked against it
    before = (folder / "log.jsonl").read_bytes()
    assert main.run(["--resume", str(folder), "--epochs", "3", "--size", "72", "--no_progress"]) == 2
    assert "--size 64" in error_line(capsys) and (folder / "log.jsonl").read_bytes() == before


def test_resume_parse_takes_the_run_folder_and_flags(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recorded = vars(main.parse_args(["data_dir", "--sobel", "--size", "96", "--k", "50", "--batch", "32"]))
    (run / "args.json").write_text(json.dumps({**recorded, "exp": "elsewhere"}))
    for target in (run, run / "checkpoint.pth.tar", run / "checkpoints" / "checkpoint_3.pth.tar"):
        args = main.parse_args(["--resume", str(target), "--workers", "99"])
        assert (args.exp, args.data, args.sobel, args.size, args.nmb_cluster, args.batch, args.workers) == \
            (str(run), "data_dir", True, 96, 50, 32, 99)
        assert not args.demo and f"--workers 99 (the run's: {recorded['workers']})" in args.resume_note
    # an explicit --exp wins; a checkpoint outside any run folder keeps the defaults
    assert main.parse_args(["d", "--resume", str(run), "--exp", "other"]).exp == "other"
    plain = tmp_path / "released.pth.tar"
    args = main.parse_args(["d", "--resume", str(plain)])
    assert (args.exp, args.size, args.nmb_cluster) == ("exp", 224, 10000) and args.resume_note is None


def test_device_loss_meter_peek_reads_without_moving_the_sums():
    meter = util.AverageMeter()
    on_device = distributed.DeviceLossMeter(torch.device("cpu"), meter)
    assert on_device.peek() != on_device.peek()  # NaN before any step
    on_device.add(torch.tensor(2.0), 4)
    on_device.add(torch.tensor(4.0), 4)
    assert on_device.peek() == 3.0 and meter.count == 0
    on_device.step = 2
    assert on_device.read().avg == 3.0 and on_device.peek() == 3.0


def test_one_class_folder_logs_no_nmi(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dc, "build_model", small_model)
    images = make_image_folder(tmp_path / "one", n_classes=1, per_class=16, size=16)
    exp = tmp_path / "exp"
    assert main.run([str(images), "--exp", str(exp), "--size", "64", "--k", "4", "--pca", "4", "--batch", "8",
                     "--workers", "0", "--epochs", "1", "--no_progress"]) == 0
    assert fileio.read_jsonl(exp / "log.jsonl")[0]["nmi_labels"] is None
    assert "NMI labels   -" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# 3, 9: exponents and seeds
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("wd", ["1e-5", "0", "3"])
def test_weight_decay_exponent_must_be_negative(wd, tmp_path, capsys):
    line = parse_error(capsys, [str(tmp_path), "--exp", str(tmp_path / "exp"), "--wd", wd])
    assert "--wd" in line and "exponent" in line and "-5" in line
    exp = tmp_path / "lin"
    assert eval_linear.run(["--data", str(tmp_path), "--model", "m", "--exp", str(exp), "--wd", wd]) == 2
    line = error_line(capsys)
    assert "--weight_decay" in line and "exponent" in line and not exp.exists()
    assert "exponent" in eval_linear.get_args_parser().format_help()
    assert "exponent" in main.get_args_parser().format_help()


@pytest.mark.parametrize("seed", ["-1", "99999999999"])
def test_seed_out_of_range_is_one_line(seed, tmp_path, capsys):
    line = parse_error(capsys, [str(tmp_path), "--exp", str(tmp_path / "exp"), "--seed", seed])
    assert f"--seed: invalid value {seed}" in line and not (tmp_path / "exp").exists()
    for mod, argv in ((eval_linear, ["--data", "d", "--model", "m"]),
                      (eval_voc_classif, ["--vocdir", "d", "--model", "m"]),
                      (gradient_ascent, ["--model", "m", "--conv", "1"])):
        assert run(mod, [*argv, "--exp", str(tmp_path / "e"), "--seed", seed]) == 2
        assert "--seed" in error_line(capsys) and not (tmp_path / "e").exists()


def launcher(script: str, env: dict, *argv: str) -> list[str]:
    """The command line a launcher would run (PYTHON=echo prints it instead)."""
    out = subprocess.run(["bash", str(ROOT / script), *argv], env={**os.environ, "PYTHON": "echo", **env},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return out.split()


def test_main_sh_verbose_only_when_asked():
    assert "--verbose" not in launcher("main.sh", {"DIR": "/data"})
    assert "--verbose" in launcher("main.sh", {"DIR": "/data", "VERBOSE": "1"})


# ---------------------------------------------------------------------------------------
# 10: torchrun (launch.py, as main.sh runs it): one line, rank 0's, the worker's exit code
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_error_is_one_line_from_rank_0(images36, tmp_path):
    exp = tmp_path / "exp"
    (exp / "checkpoints").mkdir(parents=True)
    torch.save({"epoch": 1, "iteration": 0}, exp / "checkpoint.pth.tar")  # what --resume EXP would load
    base = ["--exp", str(exp), "--size", "64", "--workers", "0", "--no_progress"]
    cases = [  # argv, env, torchrun's monitor interval (s), --max-restarts, the line
        # a bad flag value: argparse's usage, then its error line, rank 0's only
        (["--lr", "-1", images36], {}, 0.1, 0, "main.py: error: argument --lr"),
        # before the process group: rank 1 outlives its 3 s grace (torchrun looks after 10 s), the
        # counter in torchrun's store keeps it quiet (without the store: a second line, measured)
        (["--device", "cuda", images36], {"CUDA_VISIBLE_DEVICES": ""}, 10.0, 0, "error: rank 0: --device cuda"),
        # after it, with a checkpoint to resume from; exit 2 is not restarted
        ([str(tmp_path / "missing")], {}, 0.1, 1, "error: rank 0: data directory"),
    ]
    for argv, env, monitor, restarts, start in cases:
        res, _ = torchrun(base + argv, restarts=restarts, launch=True, monitor=monitor, **env)
        lines = [ln for ln in res.stderr.splitlines() if "error:" in ln]
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith(start), res.stderr
        assert not re.search("ChildFailedError|Traceback|elastic|FAILED", res.stderr), res.stderr
    assert lines[0].endswith(f"--resume {exp} continues from {exp / 'checkpoint.pth.tar'}")
    assert sorted(p.name for p in exp.iterdir()) == ["checkpoint.pth.tar", "checkpoints"]


def test_launcher_exit_code_is_the_reporting_workers(tmp_path, monkeypatch, capsys):
    """launch.py reads the code a worker left with its report (preempt.record_for_launcher) in
    torchrun's error file; with none, the first failure's, a signal as 128 + its number."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def failure(rank: int, code: int, report: int | None = None) -> ProcessFailure:
        path = tmp_path / f"error_{rank}_{code}.json"
        if report is not None:
            monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
            preempt.record_for_launcher(report, f"rank {rank}: it went wrong")
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file=str(path))

    # rank 1 reported a bad input (2); rank 0, stopped by torchrun's SIGTERM, left 75 quietly
    assert launch.exit_code({0: failure(0, 75), 1: failure(1, 2, report=2)}) == 2
    assert capsys.readouterr().err == ""
    assert launch.exit_code({0: failure(0, -9), 1: failure(1, -15)}) == 128 + 9  # no report: it says so
    assert capsys.readouterr().err.strip() == "error: rank 0: killed by SIGKILL (pid 100)"
    assert (launch.signal_code(signal.SIGTERM), launch.signal_code(signal.SIGINT)) == (preempt.EXIT_PREEMPTED, 130)


def test_torchrun_hint_only_where_a_resume_helps(tmp_path, monkeypatch):
    """Under torchrun a known error gets the resume hint when a checkpoint exists, not "no
    checkpoint yet" (bad input is fixed, not rerun as is); a bug gets it either way."""
    args = argparse.Namespace(exp=str(tmp_path))
    for hint, known, shown in [("--resume E continues from F", True, True), ("no checkpoint yet: run again", True, False),
                               ("no checkpoint yet: run again", False, True)]:
        e = data.DataError("bad input") if known else ValueError("a bug")
        code, msg = cli._outcome(e, args, None, None, None, lambda a: hint, 2)
        assert code == (2 if known else 1) and (hint in msg) == shown, msg
        code, msg = cli._outcome(e, None, None, None, None, lambda a: hint, 2)  # refused while parsing
        assert hint not in msg


# ---------------------------------------------------------------------------------------
# 5: eval_knn at the checkpoint's size
# ---------------------------------------------------------------------------------------
def test_eval_knn_size_defaults_to_the_checkpoints(knn_dir, ckpt64, tmp_path, capsys):
    exp = tmp_path / "knn"
    argv = ["--data", str(knn_dir), "--model", str(ckpt64), "--exp", str(exp), "--workers", "0", "--no_progress"]
    assert eval_knn.run(argv + ["--size", "224"]) == 2
    line = error_line(capsys)
    assert "takes 64 px inputs" in line and "--size is 224" in line and not exp.exists()
    assert eval_knn.run(argv) == 0
    out = capsys.readouterr().out
    res = json.loads((exp / "results.json").read_text())
    assert res["n_classes"] == 3 and "_S64_" in " ".join(p.name for p in (exp / "cache").iterdir())
    # 16: three classes: no top-5 (always 100 there)
    assert all(r["top5"] is None for r in res["results"].values()) and "|      -" in out


# ---------------------------------------------------------------------------------------
# 7: an unwritable --exp is refused before any work, by every script, creating nothing
# ---------------------------------------------------------------------------------------
def test_unwritable_exp_is_refused_first_everywhere(tmp_path, knn_dir, ckpt64, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad = str(blocker / "exp")
    model = str(ckpt64)
    cases = [(eval_knn, ["--data", str(knn_dir), "--model", model, "--exp", bad]),
             (eval_linear, ["--data", str(knn_dir), "--model", model, "--conv", "2", "--exp", bad]),
             (eval_voc_classif, ["--vocdir", str(knn_dir), "--model", model, "--exp", bad]),
             (eval_retrieval, ["--data", str(knn_dir), "--model", model, "--exp", bad]),
             (gradient_ascent, ["--model", model, "--conv", "1", "--exp", bad]),
             (ar, ["--model", model, "--conv", "1", "--data", str(knn_dir / "train"), "--exp", bad]),
             (report, [str(tmp_path), "--out", bad])]
    for mod, argv in cases:
        assert run(mod, argv) == 2, mod.__name__
        line = error_line(capsys)
        assert f"{bad!r} is not writable" in line, (mod.__name__, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_refused_runs_leave_no_output_folder(tmp_path, knn_dir, ckpt64, images36, capsys):
    """Every eval/visu/export script with one bad input found inside main(): exit 2, one error
    line, and its output folder (EXP, --out) is not created: no empty folder, no empty log."""
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"not a checkpoint")
    run_dir = tmp_path / "run"  # a finished training run, as export.py and visu/report.py read it
    checkpoint.ClusterLog(run_dir / "clusters").save(0, torch.arange(36).numpy() % 3, 3)
    (run_dir / "args.json").write_text(json.dumps({"data": images36}))
    (run_dir / "log.jsonl").write_text(json.dumps({"epoch": 0, "clustering_loss": 1.0}) + "\n")
    model, missing, out = str(ckpt64), str(tmp_path / "missing"), tmp_path / "out"
    common = ["--workers", "0", "--no_progress"]
    cases = [(eval_knn, ["--data", str(knn_dir), "--model", str(garbage)], "garbage"),
             (eval_linear, ["--data", missing, "--model", model, "--conv", "2"], "missing"),
             (eval_linear, ["--data", str(knn_dir), "--model", model, "--conv", "2", "--resume", str(garbage)],
              "garbage"),
             (eval_voc_classif, ["--vocdir", missing, "--model", model], "missing"),
             (eval_voc_classif, ["--vocdir", str(knn_dir), "--model", str(garbage)], "VOC2007"),
             (eval_retrieval, ["--data", missing, "--model", model], "missing"),
             (gradient_ascent, ["--model", str(garbage), "--conv", "1"], "garbage"),
             (ar, ["--model", model, "--conv", "1", "--data", str(knn_dir / "train"), "--batch", "0"], "--batch"),
             (export, [str(run_dir), "--features", "--model", str(garbage), "--out", str(out)], "garbage"),
             (report, [str(run_dir), "--epoch", "3", "--out", str(out)], "--epoch 3")]
    for mod, argv, named in cases:
        exp = ["--exp", str(out)] if mod not in (export, report) else []
        extra = [] if mod is report else common[2:] if mod in (eval_retrieval, gradient_ascent) else common
        assert run(mod, argv + exp + extra) == 2, (mod.__name__, argv)
        line = error_line(capsys)
        assert named in line and not out.exists(), (mod.__name__, line)
    assert not (run_dir / "export").exists() and not (run_dir / "report").exists()


def test_launcher_help_creates_no_folder(tmp_path):
    exp = tmp_path / "exp_knn_fc7"
    res = subprocess.run(["bash", str(ROOT / "eval_knn.sh"), "--help"], env={**os.environ, "EXP": str(exp)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--data DATA" in res.stdout and "(required)" in res.stdout
    assert not exp.exists()


# ---------------------------------------------------------------------------------------
# 8: unreadable evaluation images, all named up front
# ---------------------------------------------------------------------------------------
def test_bad_evaluation_images_are_all_named_first(knn_dir, ckpt64, tmp_path, capsys):
    import shutil
    root = tmp_path / "knn"
    shutil.copytree(knn_dir, root)
    bad = [root / "train" / "class0" / "img001.jpg", root / "val" / "class2" / "img000.jpg"]
    for p in bad:
        p.write_bytes(b"not an image")
    exp = tmp_path / "exp"
    argv = ["--data", str(root), "--model", str(ckpt64), "--exp", str(exp), "--workers", "0", "--no_progress"]
    assert eval_knn.run(argv) == 2
    line = error_line(capsys)
    assert "2 unreadable image(s) in --data" in line and all(str(p) in line for p in bad)
    assert "--bad_images skip" in line and not list(exp.glob("cache/*"))
    assert len((exp / "bad_images.txt").read_text().splitlines()) == 2
    assert eval_knn.run(argv + ["--bad_images", "skip"]) == 0
    res = json.loads((exp / "results.json").read_text())
    assert (res["n_train"], res["n_val"]) == (11, 5)
    capsys.readouterr()
    # the kNN monitor: named before training, without the training data's hints
    with pytest.raises(data.DataError) as e:
        knn.KnnMonitor(str(root), 100, 100, size=64, load=False)
    msg = cli.one_line(e.value)
    assert all(str(p) in msg for p in bad) and "--knn_data" in msg and "--resume" not in msg
    # activ-retrieval: all named before the dataset pass, or left out with --bad_images skip
    out = tmp_path / "top"
    argv = ["--model", str(ckpt64), "--conv", "1", "--data", str(root / "train"), "--exp", str(out),
            "--workers", "0", "--no_progress", "--count", "2", "--filters", "0", "--batch", "4"]
    assert run(ar, argv) == 2
    assert str(bad[0]) in error_line(capsys) and not out.exists()
    assert run(ar, argv + ["--bad_images", "skip"]) == 0


# ---------------------------------------------------------------------------------------
# 16: help and wording
# ---------------------------------------------------------------------------------------
def test_help_says_required_and_shows_no_empty_defaults():
    """Every script's --help: no "(default: None)" or "(default: )", and a flag whose help states
    its default or when it is required gets no second "(default: ...)"."""
    for mod in (main, main_deepclusterv2, export, eval_knn, eval_linear, eval_voc_classif, eval_retrieval,
                gradient_ascent, ar, report):
        parser = mod.get_args_parser()
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: )" not in text, mod.__name__
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help in (None, argparse.SUPPRESS):
                continue
            shown = formatter._expand_help(action)
            said = re.findall(r"\bdefault\b|\brequired\b", shown, re.I)
            assert len(said) <= 1, (mod.__name__, action.dest, shown)
    assert "(required)" in eval_knn.get_args_parser().format_help()
    text = " ".join(export.get_args_parser().format_help().split())
    assert "(default: EXP/checkpoint.pth.tar)" in text and "(required unless --read)" in text
    assert "(default: 64)" in text  # a plain default is still shown


def test_visu_launchers_take_the_checkpoints_arch():
    for script in ("visu/gradient_ascent.sh", "visu/activ-retrieval.sh"):
        assert "--arch" not in launcher(script, {})
        cmd = launcher(script, {"ARCH": "vgg16"})
        assert cmd[cmd.index("--arch") + 1] == "vgg16"


def test_articles(ckpt64):
    assert (models.article("alexnet"), models.article("vgg16")) == ("an alexnet", "a vgg16")
    with pytest.raises(checkpoint.CheckpointError, match="needs a vgg16 model, but .* holds an alexnet"):
        checkpoint.load_model(ckpt64, arch="vgg16", purpose="retrieval")
