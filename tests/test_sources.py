"""Where data comes from (gaf.sources, gaf.download), without the internet: a loopback HTTP
server started here serves small archives in the official formats, a corrupt one, one
that does not match its md5, one cut short and one that never answers."""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import tarfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cifar_fixtures import no_md5, write_cifar10, write_cifar100n_labels, write_jpeg_tar  # noqa: F401 (fixture)

from gaf import download, sources
from gaf.data import DataError, DataNotFound, load_cifar10_jpeg, load_dataset

CLASSES = [f"c{i}" for i in range(10)]
REAL_JPEG = sources.offline_dir() / "cifar10-jpeg" / sources.JPEG_NAME  # the offline copy, where present
pytestmark = pytest.mark.data_sources


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    behaviour: dict[str, str] = {}  # path -> "truncate" | "hang"
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.requests.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        if name not in self.files:
            self.send_error(404)
            return
        blob, how = self.files[name], self.behaviour.get(name)
        if how == "hang":
            time.sleep(3)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(blob)))
        self.end_headers()
        self.wfile.write(blob[: len(blob) // 2] if how == "truncate" else blob)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """A loopback server; GAF_DATA_MIRROR points every download at it."""
    handler = type("Handler", (_Handler,), {"files": {}, "behaviour": {}, "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    handler.url = f"http://127.0.0.1:{httpd.server_port}/mirror"
    monkeypatch.setenv(download.MIRROR_ENV, handler.url)
    yield handler
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def no_shared(tmp_path, monkeypatch):
    """The offline copies' location pointed at an empty folder."""
    empty = tmp_path / "no-shared"
    empty.mkdir()
    monkeypatch.setenv(sources.OFFLINE_ENV, str(empty))
    return empty


def _md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


def _tar_gz(folder: Path, arcname: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(folder, arcname=arcname)
    return buf.getvalue()


def _cifar10_archive(tmp_path) -> tuple[bytes, dict]:
    written = write_cifar10(tmp_path / "staging", n_train_per_class=2, n_test_per_class=1)
    return _tar_gz(tmp_path / "staging" / "cifar-10-batches-py", "cifar-10-batches-py"), written


def _serve_cifar10(monkeypatch, server, blob: bytes, md5: str | None = None) -> None:
    remote = replace(sources.CIFAR10_ARCHIVE, md5=md5 or _md5(blob), size=len(blob))
    monkeypatch.setattr(sources, "CIFAR10", replace(sources.CIFAR10, remote=remote))
    server.files[remote.filename] = blob


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*")) if root.exists() else []


def test_archive_constants_are_torchvisions():
    from torchvision.datasets import CIFAR10, CIFAR100

    for remote, cls in ((sources.CIFAR100_ARCHIVE, CIFAR100), (sources.CIFAR10_ARCHIVE, CIFAR10)):
        assert (remote.urls[0], remote.filename, remote.md5) == (cls.url, cls.filename, cls.tgz_md5)
    assert (sources.CIFAR100.folder, sources.CIFAR10.folder) == (CIFAR100.base_folder, CIFAR10.base_folder)


def test_good_archive_is_announced_fetched_extracted_and_read(tmp_path, server, monkeypatch, no_md5, capsys):
    blob, written = _cifar10_archive(tmp_path)
    _serve_cifar10(monkeypatch, server, blob)
    root = tmp_path / "data"
    ds = load_dataset("cifar10", root, download=True)
    assert np.array_equal(ds.train_x.numpy(), written["train_x"]) and np.array_equal(ds.test_y.numpy(), written["test_y"])
    assert "downloaded from http://127.0.0.1" in ds.note and "cifar-10-batches-py" in ds.note
    err = capsys.readouterr().err
    assert f"downloading CIFAR-10 (python version): cifar-10-python.tar.gz ({download.human_size(len(blob))})" in err
    assert "100%" in err  # progress, in CI's line form
    assert _leftovers(root) == sorted(["cifar-10-python.tar.gz", "cifar-10-batches-py", *(
        p.name for p in (tmp_path / "staging" / "cifar-10-batches-py").iterdir())])  # no .part, no staging folder
    # Second time: found under root, nothing fetched.
    n = len(server.requests)
    assert "downloaded" not in load_dataset("cifar10", root, download=True).note and len(server.requests) == n


@pytest.mark.parametrize("case", ["corrupt", "wrong md5", "truncated"])
def test_bad_downloads_are_refused_and_leave_nothing(tmp_path, server, monkeypatch, no_shared, case):
    blob, _ = _cifar10_archive(tmp_path)
    if case == "corrupt":  # bytes damaged in transit: the published md5 no longer matches
        _serve_cifar10(monkeypatch, server, blob[:1000] + bytes(100) + blob[1100:], md5=_md5(blob))
    elif case == "wrong md5":  # a sound archive, but not the published one
        _serve_cifar10(monkeypatch, server, blob, md5="0" * 32)
    else:
        _serve_cifar10(monkeypatch, server, blob)
        server.behaviour["cifar-10-python.tar.gz"] = "truncate"
    root = tmp_path / "data"
    with pytest.raises(DataNotFound) as e:
        load_dataset("cifar10", root, download=True)
    msg = str(e.value)
    assert "\n" not in msg and "(1) " in msg and "(2) download of cifar-10-python.tar.gz" in msg
    assert ("cut short" if case == "truncated" else "md5") in msg
    assert "(5) offline copy" in msg and "JPEG copy" in msg  # the offline source was tried last
    assert _leftovers(root) == []  # a half-downloaded or wrong archive is never left as data


def test_archive_with_the_right_md5_that_is_no_tar_is_a_clear_error(tmp_path, server, monkeypatch):
    _serve_cifar10(monkeypatch, server, b"not a tar archive at all" * 100)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="cannot extract .*cifar-10-python.tar.gz"):
        load_dataset("cifar10", root, download=True)
    assert not (root / "cifar-10-batches-py").exists() and not list(root.glob(".*extracting"))


def test_unreachable_and_hanging_servers_fail_fast(tmp_path, server, monkeypatch, no_shared):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv(download.MIRROR_ENV, f"http://127.0.0.1:{closed}")
    started = time.perf_counter()
    with pytest.raises(DataNotFound, match="unreachable"):
        load_dataset("cifar10", tmp_path / "data", download=True)
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "data").exists()  # the folder made for the download goes with it
    blob, _ = _cifar10_archive(tmp_path)
    _serve_cifar10(monkeypatch, server, blob)
    server.behaviour["cifar-10-python.tar.gz"] = "hang"
    monkeypatch.setenv(download.MIRROR_ENV, server.url)
    monkeypatch.setattr(download, "TIMEOUT_S", 0.5)
    started = time.perf_counter()
    with pytest.raises(DataNotFound, match="timed out"):
        load_dataset("cifar10", tmp_path / "data", download=True)
    assert time.perf_counter() - started < 2.5


def test_download_off_is_said_and_nothing_is_fetched(tmp_path, server, monkeypatch, no_shared):
    blob, _ = _cifar10_archive(tmp_path)
    _serve_cifar10(monkeypatch, server, blob)
    with pytest.raises(DataNotFound, match=r"off \(data.download=false\)"):
        load_dataset("cifar10", tmp_path / "data", download=False)
    assert server.requests == []


def test_missing_cifar100_error_names_the_key_and_the_fallbacks(tmp_path, no_shared):
    with pytest.raises(DataNotFound) as e:
        load_dataset("cifar100", tmp_path / "data")
    msg = str(e.value)
    assert "data.download=false" in msg and "data.fallback=cifar10" in msg and "data=cifar10_jpeg" in msg
    assert "cifar-100-python.tar.gz" in msg and "\n" not in msg


def test_archive_put_under_root_by_hand_is_extracted(tmp_path, monkeypatch, server, no_md5):
    blob, written = _cifar10_archive(tmp_path)
    _serve_cifar10(monkeypatch, server, blob)
    server.files.clear()  # nothing to download: the archive must come from root
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(blob)
    ds = load_dataset("cifar10", root)
    assert "extracted from" in ds.note and np.array_equal(ds.train_y.numpy(), written["train_y"])


def test_cifar100n_labels_root_then_download_then_offline_copy(tmp_path, server, monkeypatch, no_shared):
    y = np.arange(500) % 100
    blob = write_cifar100n_labels(tmp_path / "served.pt", y, y).read_bytes()
    remote = replace(sources.CIFAR100N_LABELS, md5=_md5(blob), size=len(blob))
    monkeypatch.setattr(sources, "CIFAR100N_LABELS", remote)
    root = tmp_path / "data"
    with pytest.raises(DataNotFound, match=r"\(3\) download .*404.*\(4\) offline copy .*absent"):
        sources.cifar100n_label_file(None, root, download=True)  # 404: nothing served yet
    server.files[remote.filename] = blob
    path, note = sources.cifar100n_label_file(None, root, download=True)
    assert path == root / "cifar100n" / "CIFAR-100_human.pt" and path.read_bytes() == blob and "downloaded" in note
    assert sources.cifar100n_label_file(None, root, download=True)[1] == "CIFAR-100N human labels from " + str(path)
    # The offline copy comes after a failed download (wrong md5 here).
    offline = no_shared / "cifar100n" / "CIFAR-100_human.pt"
    offline.parent.mkdir()
    offline.write_bytes(blob)
    monkeypatch.setattr(sources, "CIFAR100N_LABELS", replace(remote, md5="1" * 32))
    path, note = sources.cifar100n_label_file(None, tmp_path / "other", download=True)
    assert path == offline and "the offline copy" in note
    # A path the user gives is used or refused, never replaced.
    with pytest.raises(DataError, match="data.label_file=.*does not exist"):
        sources.cifar100n_label_file(tmp_path / "typo.pt", root, download=True)


def test_jpeg_copy_given_path_root_and_offline_copy(tmp_path, no_shared, monkeypatch):
    tar = write_jpeg_tar(tmp_path / "elsewhere" / "copy.tar.gz", CLASSES, n_train=2, n_test=1)
    root = tmp_path / "data"
    with pytest.raises(DataNotFound) as e:
        load_cifar10_jpeg(root)
    assert "(1) " in str(e.value) and "(3) offline copy" in str(e.value) and "data=cifar10" in str(e.value)
    # The offline copy (GAF_OFFLINE_DATA), then a copy under root wins over it.
    (no_shared / "cifar10-jpeg").mkdir()
    (no_shared / "cifar10-jpeg" / sources.JPEG_NAME).write_bytes(tar.read_bytes())
    assert "(the offline copy)" in load_cifar10_jpeg(root).note
    root.mkdir()
    (root / sources.JPEG_NAME).write_bytes(tar.read_bytes())
    assert load_cifar10_jpeg(root).note.startswith(f"CIFAR-10 JPEG copy (q75) from {root / sources.JPEG_NAME}:")
    # A given jpeg_path is used, or refused when it does not exist: never the default instead.
    assert str(tar) in load_dataset("cifar10_jpeg", root, jpeg_path=tar).note
    with pytest.raises(DataError, match="data.jpeg_path=.*does not exist") as e:
        load_dataset("cifar100", root, fallback="cifar10_jpeg", jpeg_path=tmp_path / "typo.tar.gz")
    assert not isinstance(e.value, DataNotFound)


@pytest.mark.parametrize("root", ["copy.tar.gz", "nonexistent/x.tar.gz"])
def test_root_is_a_folder_a_file_given_as_root_is_refused(tmp_path, root):
    write_jpeg_tar(tmp_path / "copy.tar.gz", CLASSES, n_train=2, n_test=1)
    with pytest.raises(DataError, match=r"data.root=.* is .*file.*data.jpeg_path"):
        load_dataset("cifar10_jpeg", tmp_path / root)


@pytest.mark.parametrize("content", ["truncated", "empty", "text"])
def test_broken_jpeg_tarball_is_one_clear_line(tmp_path, content):
    good = write_jpeg_tar(tmp_path / "good.tar.gz", CLASSES, n_train=20, n_test=2).read_bytes()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes({"truncated": good[: len(good) // 2], "empty": b"", "text": b"hello\n"}[content])
    with pytest.raises(DataError) as e:
        load_dataset("cifar10_jpeg", jpeg_path=bad)
    assert "not a readable tar archive" in str(e.value) and "\n" not in str(e.value)


def test_default_root_is_the_repositorys_data_folder_whatever_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sources.default_root() == Path(__file__).resolve().parents[1] / "data"
    assert sources.resolve_root(None) == sources.default_root()
    assert sources.shown(sources.default_root() / "x") == "data/x"
    assert sources.shown(sources.REPO.parent / "shared" / "data") == "../shared/data"
    beside = sources.REPO.parent / "another" / "x"  # e.g. pytest's tmp_path where the clone is in /tmp
    assert sources.shown(beside) == str(beside)


@pytest.mark.skipif(not REAL_JPEG.is_file(), reason=f"no offline CIFAR-10 JPEG copy at {REAL_JPEG}")
def test_cifar10_without_root_or_network_is_the_real_offline_jpeg_copy(tmp_path):
    ds = load_dataset("cifar10", tmp_path / "data", download=True)  # conftest: downloads fail at once
    assert ds.name == "cifar10_jpeg" and (len(ds.train_y), len(ds.test_y), ds.num_classes) == (50_000, 10_000, 10)
    assert "substituted the CIFAR-10 JPEG copy (q75)" in ds.note and "download of cifar-10-python.tar.gz" in ds.note
    assert f"from {sources.shown(REAL_JPEG)} (the offline copy)" in ds.note


def test_the_offline_folder_is_named_by_its_variable_or_its_former_name(tmp_path, monkeypatch):
    monkeypatch.delenv(sources.OFFLINE_ENV, raising=False)
    monkeypatch.setenv(sources.OLD_OFFLINE_ENV, str(tmp_path / "old"))
    assert sources.offline_dir() == tmp_path / "old"
    monkeypatch.setenv(sources.OFFLINE_ENV, str(tmp_path / "new"))
    assert sources.offline_dir() == tmp_path / "new"  # the current name wins
