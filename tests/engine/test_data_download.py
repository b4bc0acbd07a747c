"""Dataset downloads from a local HTTP server: two processes fetching the same archive at
once both get the verified dataset from one download, a corrupt file in place is replaced,
and a wrong checksum, a missing file or an unwritable cache is one line naming the fix."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch

from cifar_files import as_official, write_cifar
from reslab import caches
from reslab.engine import data
from reslab.engine.data import load_arrays
from reslab.engine.data.download import fetch_file
from reslab.errors import UsageError

ARCHIVE = "cifar-10-python.tar.gz"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, bytes]
    hits: Counter[str]
    chunk = 4096
    delay = 0.0  # seconds between chunks, so that concurrent downloads overlap


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self.server.hits[self.path] += 1
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for i in range(0, len(body), self.server.chunk):
                self.wfile.write(body[i : i + self.server.chunk])
                self.wfile.flush()
                time.sleep(self.server.delay)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading (torchvision's redirect probe reads only the headers)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files, srv.hits = {}, Counter()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch, server):
    """A private cache, no $RESLAB_DATA, and a network that reaches only the local server."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("RESLAB_DATA", raising=False)
    real = urllib.request.urlopen

    def local_only(req, *a, **k):
        url = req.full_url if isinstance(req, urllib.request.Request) else req
        if not url.startswith(server.base + "/"):
            raise urllib.error.URLError("network unreachable (test)")
        return real(req, *a, **k)

    monkeypatch.setattr(urllib.request, "urlopen", local_only)
    caches.clear("datasets.decoded")
    yield tmp_path / "cache" / "reslab"
    caches.clear("datasets.decoded")


def _served_cifar(tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    """Generated CIFAR-10 files, tarred as the official archive is, served by ``server`` and
    entered in the CIFAR table with their checksums; returns (table entry, arrays written)."""
    src = tmp_path / "src"
    written = write_cifar(src, "cifar10")
    info = as_official(src, "cifar10")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(src / info["folder"], arcname=info["folder"])
    blob = buf.getvalue()
    server.files["/" + ARCHIVE] = blob
    info.update(url=f"{server.base}/{ARCHIVE}", tgz_md5=hashlib.md5(blob).hexdigest())
    monkeypatch.setitem(data.CIFAR, "cifar10", info)
    return info, written


def _requests_per_download(server: _Server, tmp_path: Path) -> int:
    """How many requests one download of one file makes (torchvision's ``download_url`` asks
    once for redirects, then for the file)."""
    body = b"x" * 10
    server.files["/one.bin"] = body
    fetch_file(f"{server.base}/one.bin", tmp_path / "one" / "one.bin", hashlib.md5(body).hexdigest())
    return server.hits.pop("/one.bin")


def _leftovers(folder: Path) -> list[str]:
    """Everything under ``folder`` that is a temporary file or folder of a download."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".part" in p.name)


def _check_loaded(ds: data.ArrayDataset, written: dict) -> None:
    assert torch.equal(ds.train_x, torch.from_numpy(written["train_x"]).view(-1, 3, 32, 32))
    assert ds.train_y.tolist() == written["train_y"].tolist()
    assert torch.equal(ds.test_x, torch.from_numpy(written["test_x"]).view(-1, 3, 32, 32))


# A second process loading cifar10 with the served table: it waits for its sibling at a
# barrier (so both start together), loads, and prints what it got.
_CHILD = textwrap.dedent(
    """
    import hashlib, json, sys, time
    from pathlib import Path
    from reslab.engine import data

    info_file, ready_dir, me = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    data.CIFAR["cifar10"] = json.loads(Path(info_file).read_text())
    (ready_dir / me).touch()
    deadline = time.monotonic() + 120
    while len(list(ready_dir.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    ds = data.load_arrays("cifar10")
    print(json.dumps({
        "train": hashlib.sha256(ds.train_x.numpy().tobytes()).hexdigest(),
        "labels": ds.train_y.tolist(),
        "test": hashlib.sha256(ds.test_x.numpy().tobytes()).hexdigest(),
    }))
    """
)


@pytest.mark.timeout(300)
def test_two_processes_download_once_and_both_load(tmp_path, server, cache, monkeypatch):
    info, written = _served_cifar(tmp_path, server, monkeypatch)
    per_download = _requests_per_download(server, tmp_path)
    server.chunk, server.delay = 8192, 0.03  # about a second per download: the two overlap
    info_file = tmp_path / "info.json"
    info_file.write_text(json.dumps(info))
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "XDG_CACHE_HOME": str(cache.parent)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(info_file), str(ready), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=240)
        assert child.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    # both got the whole, verified dataset that was served
    want = {
        "train": hashlib.sha256(written["train_x"].tobytes()).hexdigest(),
        "labels": written["train_y"].tolist(),
        "test": hashlib.sha256(written["test_x"].tobytes()).hexdigest(),
    }
    assert results == [want, want]
    # the archive was downloaded once: the process that waited used the other's files
    assert server.hits["/" + ARCHIVE] == per_download
    target = cache / "cifar10"
    assert hashlib.md5((target / ARCHIVE).read_bytes()).hexdigest() == info["tgz_md5"]
    assert _leftovers(cache) == []
    # and the tree they left is the one a third, later process loads without asking again
    _check_loaded(load_arrays("cifar10"), written)
    assert server.hits["/" + ARCHIVE] == per_download


def test_corrupt_archive_in_place_is_replaced(tmp_path, server, cache, monkeypatch):
    info, written = _served_cifar(tmp_path, server, monkeypatch)
    target = cache / "cifar10"
    target.mkdir(parents=True)
    (target / ARCHIVE).write_bytes(b"<html>an error page saved as the archive</html>")
    stale = target / f".{ARCHIVE}.4242.deadbeef.part"  # left by a download that was killed
    stale.write_bytes(b"half")
    _check_loaded(load_arrays("cifar10"), written)
    assert hashlib.md5((target / ARCHIVE).read_bytes()).hexdigest() == info["tgz_md5"]
    assert server.hits["/" + ARCHIVE] >= 1 and _leftovers(cache) == []


def test_verified_file_in_place_is_used_without_asking(tmp_path, server, cache):
    body = b"payload" * 100
    dest = tmp_path / "files" / "f.bin"
    dest.parent.mkdir()
    dest.write_bytes(body)
    server.files["/f.bin"] = b"something else"
    assert fetch_file(f"{server.base}/f.bin", dest, hashlib.md5(body).hexdigest()) == dest
    assert dest.read_bytes() == body and server.hits["/f.bin"] == 0


def test_checksum_mismatch_is_one_line_and_leaves_nothing(tmp_path, server, cache, monkeypatch):
    info, _ = _served_cifar(tmp_path, server, monkeypatch)
    server.files["/" + ARCHIVE] = b"not the archive the table names"
    with pytest.raises(UsageError) as e:
        load_arrays("cifar10")
    msg = str(e.value)
    assert "\n" not in msg and info["url"] in msg and f"expected {info['tgz_md5']}" in msg
    assert "try again later" in msg and "--data-dir" in msg
    # nothing but the lock files: no archive, no partial file, no half-unpacked tree
    target = cache / "cifar10"
    assert sorted(p.name for p in target.iterdir()) == sorted([f".{ARCHIVE}.lock", f".{info['folder']}.lock"])


def test_missing_file_on_the_server_names_the_fix(tmp_path, server, cache, monkeypatch):
    _served_cifar(tmp_path, server, monkeypatch)
    del server.files["/" + ARCHIVE]
    with pytest.raises(UsageError, match=r"cifar10 not found .*download failed \(Not Found\).*--data-dir") as e:
        load_arrays("cifar10")
    assert "\n" not in str(e.value) and _leftovers(cache) == []


@pytest.mark.parametrize("how", ["cache_is_a_file", "read_only"])
def test_unwritable_cache_is_one_line(tmp_path, server, cache, monkeypatch, how):
    _served_cifar(tmp_path, server, monkeypatch)
    if how == "cache_is_a_file":
        cache.parent.mkdir(parents=True)
        cache.write_text("a file where the cache folder should be")
        problem = "not a directory"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        cache.mkdir(parents=True)
        cache.chmod(0o500)
        problem = "permission denied"
    try:
        with pytest.raises(UsageError) as e:
            load_arrays("cifar10")
    finally:
        if how == "read_only":
            cache.chmod(0o700)
    msg = str(e.value)
    assert "\n" not in msg and problem in msg and "writable" in msg and "--data-dir" in msg
    assert server.hits["/" + ARCHIVE] == 0


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="apt-get install dataset-fashion-mnist"
)
def test_fashion_downloads_the_missing_files_from_the_first_server_that_has_them(server, cache, monkeypatch):
    from reslab.engine.data import fashion

    gz = {f.name: f.read_bytes() for f in FASHION_DIR.glob("*.gz")}
    server.files.update({f"/mirror/{name}": blob for name, blob in gz.items()})
    # Debian re-compresses the files, so their .gz checksums are not upstream's: the table takes theirs
    monkeypatch.setattr(fashion, "FASHION_GZ_MD5", {n[:-3]: hashlib.md5(b).hexdigest() for n, b in gz.items()})
    monkeypatch.setattr(fashion, "FASHION_URLS", (f"{server.base}/gone/", f"{server.base}/mirror/"))
    monkeypatch.setattr(data.base, "SYSTEM_FASHION_DIR", cache / "no-system-copy")
    kept = cache / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz"  # already in the cache and verified
    kept.parent.mkdir(parents=True)
    kept.write_bytes(gz[kept.name])
    ds = load_arrays("fashion-mnist")
    ref = load_arrays("fashion-mnist", FASHION_DIR)
    assert torch.equal(ds.train_x, ref.train_x) and torch.equal(ds.test_y, ref.test_y)
    assert server.hits[f"/mirror/{kept.name}"] == 0 and server.hits["/mirror/train-images-idx3-ubyte.gz"] >= 1
    assert _leftovers(cache) == []
