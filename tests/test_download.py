"""download_model.sh against a loopback HTTP server (no machine here reaches the internet).

The server (``http.server`` in a thread) serves generated files in the release's layout, with
Range support (what ``curl -C -`` and ``wget -c`` send to resume), and can cut a response short
after a number of bytes, as a dropped connection does. Runs with curl and with wget.
"""
from __future__ import annotations

import hashlib
import http.server
import os
import pickle
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

import models

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "download_model.sh"


class Handler(http.server.BaseHTTPRequestHandler):
    """GET with ``Range: bytes=N-``; ``server.cut[path] = n`` sends only n bytes of the next response."""

    def log_message(self, *a):  # quiet
        pass

    def do_HEAD(self):
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[len("bytes="):].split("-")[0] or 0)
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = self.server.cut.pop(self.path, None)
        payload = body[start:] if cut is None else body[start:start + cut]
        try:
            self.wfile.write(payload)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        if cut is not None:
            self.close_connection = True
            self.connection.shutdown(2)  # the client sees fewer bytes than Content-Length


@pytest.fixture(scope="module")
def release(module_tmp):
    """The release's alexnet files, small: a real (64 px) AlexNet checkpoint, a prototxt, a
    caffemodel-sized blob and a Python-2 style assignment pickle."""
    d = module_tmp.mktemp("release")
    model = models.build_model("alexnet", sobel=True, bn=True, out=10, input_size=64)
    torch.save({"state_dict": model.state_dict(), "arch": "alexnet"}, d / "ckpt")
    # Python 2 pickles store str as bytes (SHORT_BINSTRING 'U'): [("img/a.jpg", 3), ("img/b.jpg", 7)]
    py2 = b"\x80\x02]q\x00(U\timg/a.jpgK\x03\x86q\x01U\timg/b.jpgK\x07\x86q\x02e."
    files = {"/alexnet/checkpoint.pth.tar": (d / "ckpt").read_bytes(),
             "/alexnet/model.prototxt": b'name: "alexnet"\nlayer { name: "conv1" }\n',
             "/alexnet/model.caffemodel": os.urandom(1_200_000),
             "/alexnet/alexnet_cluster_assignment.pickle": py2}
    assert pickle.loads(py2, encoding="latin1") == [("img/a.jpg", 3), ("img/b.jpg", 7)]
    return files


@pytest.fixture
def server(release):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.cut, srv.requests = dict(release), {}, []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def download(srv, root: Path, *models_: str, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, MODELROOT=str(root), BASE_URL=f"http://127.0.0.1:{srv.server_port}", **env)
    return subprocess.run(["bash", str(SCRIPT), *models_], env=e, capture_output=True, text=True, timeout=300)


needs = pytest.mark.parametrize("tool", [t for t in ("curl", "wget") if shutil.which(t)])


@pytest.mark.slow
@needs
def test_fetch_interrupted_resumed_verified(server, tmp_path, tool):
    root = tmp_path / "models"
    ck = "/alexnet/checkpoint.pth.tar"
    server.cut[ck] = 1_000_000  # the first transfer of the checkpoint drops after 1 MB
    r = download(server, root, "alexnet", DOWNLOADER=tool)
    assert r.returncode == 0, r.stderr
    d = root / "alexnet"
    for name in ("checkpoint.pth.tar", "model.prototxt", "model.caffemodel", "alexnet_cluster_assignment.pickle"):
        assert (d / name).read_bytes() == server.files[f"/alexnet/{name}"], name
    assert not list(d.glob("*.part"))
    # the retry asked for the rest only, from the byte where the cut left it
    ranges = [rng for path, rng in server.requests if path == ck]
    assert ranges[0] is None and ranges[1] == "bytes=1000000-", ranges
    assert "resuming" in r.stdout
    # run again: everything is there and verified, nothing is fetched
    n = len(server.requests)
    r = download(server, root, "alexnet", DOWNLOADER=tool)
    assert r.returncode == 0 and len(server.requests) == n and r.stdout.count("already there") == 4


@pytest.mark.slow
def test_transfer_stopped_then_resumed_by_the_next_run(server, tmp_path, tool="curl"):
    root = tmp_path / "models"
    ck = "/alexnet/checkpoint.pth.tar"
    body = server.files[ck]
    (root / "alexnet").mkdir(parents=True)
    (root / "alexnet" / "checkpoint.pth.tar.part").write_bytes(body[:4321])  # left by a killed run
    r = download(server, root, "alexnet", DOWNLOADER=tool, NO_CAFFE="1")
    assert r.returncode == 0, r.stderr
    assert [rng for p, rng in server.requests if p == ck] == ["bytes=4321-"]
    assert (root / "alexnet" / "checkpoint.pth.tar").read_bytes() == body
    assert not (root / "alexnet" / "model.caffemodel").exists()  # NO_CAFFE
    # a .part already complete (killed before its check): the server answers the resume 416
    (root / "vgg16").mkdir()
    server.files["/vgg16/model.prototxt"] = server.files["/alexnet/model.prototxt"]
    server.files["/vgg16/vgg16_cluster_assignment.pickle"] = server.files["/alexnet/alexnet_cluster_assignment.pickle"]
    (root / "vgg16" / "model.prototxt.part").write_bytes(server.files["/vgg16/model.prototxt"])
    r = download(server, root, "vgg16", DOWNLOADER=tool)  # no vgg16 checkpoint served: exit 1
    assert (root / "vgg16" / "model.prototxt").read_bytes() == server.files["/vgg16/model.prototxt"]
    assert "vgg16/checkpoint.pth.tar: cannot be fetched" in r.stderr and r.returncode == 1


@pytest.mark.slow
def test_corrupt_file_refused_and_missing_file_named(server, tmp_path):
    root = tmp_path / "models"
    ck = "/alexnet/checkpoint.pth.tar"
    body = server.files[ck]
    server.files[ck] = b"\0" * 4096 + body[4096:]  # damaged in transit: the loader refuses it
    server.files["/alexnet/alexnet_cluster_assignment.pickle"] = b"<html>Access denied</html>"
    del server.files["/alexnet/model.caffemodel"]
    r = download(server, root, "alexnet")
    assert r.returncode == 1
    d = root / "alexnet"
    err = r.stderr
    assert "checkpoint.pth.tar: corrupt download, deleted" in err and "is not a checkpoint" in err, err
    assert "alexnet_cluster_assignment.pickle: corrupt download, deleted (not a cluster-assignment pickle" in err
    assert "model.caffemodel: cannot be fetched" in err
    # nothing unverified under a final name, no .part left; the good file is kept
    assert sorted(p.name for p in d.iterdir()) == ["model.prototxt"]

    # damage inside the tensor data loads fine: a known hash (MODELROOT/SHA256SUMS) catches it
    good = hashlib.sha256(body).hexdigest()
    (root / "SHA256SUMS").write_text(f"{good}  alexnet/checkpoint.pth.tar\n")
    mid = len(body) // 2
    server.files[ck] = body[:mid] + b"\0" * 4096 + body[mid + 4096:]
    r = download(server, root, "alexnet", NO_CAFFE="1")
    assert r.returncode == 1 and "checkpoint.pth.tar: corrupt download, deleted (sha256 differs" in r.stderr
    assert not (d / "checkpoint.pth.tar").exists()
    server.files[ck] = body
    server.files["/alexnet/alexnet_cluster_assignment.pickle"] = pickle.dumps([("a.jpg", 1)], protocol=2)
    r = download(server, root, "alexnet", NO_CAFFE="1")
    assert r.returncode == 0, r.stderr
    assert (d / "checkpoint.pth.tar").read_bytes() == body


def test_bad_arguments(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "resnet18"], env=dict(os.environ, MODELROOT=str(tmp_path / "m")),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "error: unknown model 'resnet18'" in r.stderr
    assert not (tmp_path / "m").exists()
    r = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "MODELROOT" in r.stdout and "deepclusterv2" in r.stdout


def test_missing_release_model_points_at_the_script(tmp_path):
    import checkpoint
    with pytest.raises(checkpoint.CheckpointError, match="download_model.sh"):
        checkpoint.load_model(tmp_path / "deepcluster_models" / "alexnet" / "checkpoint.pth.tar")
