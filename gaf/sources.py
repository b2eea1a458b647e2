"""Where each data set comes from: one order of sources, tried in turn.

1. what is already under ``data.root`` (default: ``data/`` in the repository, whatever
   the working directory), including an archive put there by hand;
2. a download where the network allows and ``data.download`` is on (``gaf.download``:
   announced, progress, short timeout, md5-checked, atomic);
3. the offline copies where present: an offline mirror folder that holds ``cifar10-jpeg/``
   and ``cifar100n/`` (``$GAF_OFFLINE_DATA``, else ``DEFAULT_OFFLINE_DIR`` beside the repository);
4. else ``DataNotFound`` naming every source tried and how to provide the data by hand.

| data set | under data.root | download | offline copy |
|---|---|---|---|
| CIFAR-100 | ``cifar-100-python/`` (or its .tar.gz) | torchvision's URL and md5, 169 MB | none |
| CIFAR-100N labels | ``cifar100n/CIFAR-100_human.pt`` | UCSC-REAL/cifar-10-100n, 1 MB | ``cifar100n/`` |
| CIFAR-10 | ``cifar-10-batches-py/`` (or its .tar.gz) | torchvision's URL and md5, 170 MB | the JPEG copy, standing in |
| CIFAR-10 JPEG copy | ``cifar10-jpeg-q75.tar.gz`` (or ``cifar10-jpeg/``) | none public | ``cifar10-jpeg/`` |

A path the user gives (``data.label_file``, ``data.jpeg_path``) is used or refused, never
replaced by a default; ``data.root`` is always a folder.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from gaf.download import DownloadError, Remote, fetch, md5sum

REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = "GAF_OFFLINE_DATA"  # the offline mirror folder
OLD_OFFLINE_ENV = "GAF_SHARED_DATA"  # its former name, still read
DEFAULT_OFFLINE_DIR = REPO.parent / "shared" / "data"  # the offline mirror folder where none is named
JPEG_NAME = "cifar10-jpeg-q75.tar.gz"
ARCHIVE_SUFFIXES = (".gz", ".tgz", ".tar", ".zip", ".pt", ".npy", ".pkl")


class DataError(ValueError):
    """Any problem with the data: missing or wrong files, impossible sampler settings."""


class DataNotFound(DataError):
    """The data set is not there (as opposed to there but wrong): ``load_dataset`` may substitute.

    ``tried``: one line per source tried, in order; ``by_hand``: how to provide the data."""

    def __init__(self, what: str, tried: list[str], by_hand: str):
        self.what, self.tried, self.by_hand = what, list(tried), by_hand
        steps = "; ".join(f"({i}) {t}" for i, t in enumerate(self.tried, 1))
        super().__init__(f"{what} not found. Tried, in order: {steps}. {by_hand}")


# The archives torchvision's CIFAR readers download (torchvision.datasets.CIFAR100.url,
# .filename, .tgz_md5; tests/test_sources.py checks these against torchvision).
CIFAR100_ARCHIVE = Remote("CIFAR-100 (python version)", ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
                          "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", 169_001_437)
CIFAR10_ARCHIVE = Remote("CIFAR-10 (python version)", ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                         "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", 170_498_071)
# CIFAR-100N's human labels, the file at commit 49df7d8 of the CIFAR-N repository (the
# same file as the offline mirror's cifar100n/); the default branch is the second choice.
_CIFAR_N = "https://github.com/UCSC-REAL/cifar-10-100n/raw"
CIFAR100N_LABELS = Remote("CIFAR-100N human labels", (f"{_CIFAR_N}/49df7d8/data/CIFAR-100_human.pt",
                                                      f"{_CIFAR_N}/HEAD/data/CIFAR-100_human.pt"),
                          "CIFAR-100_human.pt", "a67b45c1d7992051865b5c755bd68bb1", 1_000_959)


@dataclass(frozen=True)
class CifarFolder:
    what: str
    folder: str  # the extracted folder torchvision reads
    remote: Remote


CIFAR100 = CifarFolder("CIFAR-100", "cifar-100-python", CIFAR100_ARCHIVE)
CIFAR10 = CifarFolder("CIFAR-10", "cifar-10-batches-py", CIFAR10_ARCHIVE)


def default_root() -> Path:
    return REPO / "data"


def offline_dir() -> Path:
    """The offline mirror folder: ``$GAF_OFFLINE_DATA``, else ``DEFAULT_OFFLINE_DIR``."""
    named = os.environ.get(OFFLINE_ENV) or os.environ.get(OLD_OFFLINE_ENV)
    return Path(named or DEFAULT_OFFLINE_DIR).expanduser()


def shown(path) -> str:
    """A path as results should record it: relative to the repository where it lies in it or in
    the default offline mirror beside it (so results do not depend on where the clone is), else
    absolute (a folder that merely shares the clone's parent, such as a temporary one, is not ours)."""
    path = Path(path).expanduser().absolute()
    if path.is_relative_to(REPO):
        return path.relative_to(REPO).as_posix()
    if path.is_relative_to(DEFAULT_OFFLINE_DIR):
        return "../" + path.relative_to(REPO.parent).as_posix()
    return str(path)


def resolve_root(root) -> Path:
    """``data.root`` as a folder (None: the repository's ``data/``). A file, or what looks
    like an archive's name, is refused: the JPEG copy's file goes in ``data.jpeg_path``."""
    if root is None:
        return default_root()
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir() or not path.exists() and path.suffix.lower() in ARCHIVE_SUFFIXES:
        raise DataError(f"data.root={root} is {'a file' if path.exists() else 'the name of a file'}: data.root is "
                        f"the folder data sets live in (and are downloaded into); give the CIFAR-10 JPEG copy's "
                        f"file as data.jpeg_path, CIFAR-100N's label file as data.label_file")
    return path


def one_line(e: BaseException) -> str:
    """An exception as one line (tarfile's "r:*" error lists every method it tried, one per line)."""
    lines = [line.strip(" -") for line in str(e).splitlines() if line.strip(" -")]
    return f"{type(e).__name__}: {lines[-1] if lines else 'no detail'}"


def _extract(archive: Path, root: Path, folder: str) -> None:
    """Extract ``archive`` and move its ``folder`` into ``root`` in one rename (atomic)."""
    staging = root / f".{folder}.{os.getpid()}.extracting"
    try:
        with tarfile.open(archive, "r:*") as tf:
            tf.extractall(staging, filter="data")  # member paths cannot escape staging
        if not (staging / folder).is_dir():
            raise DataError(f"{shown(archive)} holds no {folder}/ folder: not the published archive")
        try:
            os.replace(staging / folder, root / folder)
        except OSError:
            if not (root / folder).is_dir():  # else another process extracted it first
                raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"cannot extract {shown(archive)} ({one_line(e)}); delete it and fetch it again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _download(remote: Remote, folder: Path, download: bool, tried: list[str]) -> Path | None:
    """``fetch`` into ``folder``, or None with the reason appended to ``tried``."""
    if not download:
        tried.append(f"download of {remote.filename}: off (data.download=false)")
        return None
    try:
        return fetch(remote, folder)
    except DownloadError as e:
        tried.append(f"download of {remote.filename}: {e}")
        return None


def cifar_root(spec: CifarFolder, root=None, download: bool = False) -> tuple[Path, str]:
    """The folder holding ``spec.folder`` for torchvision to read, and how it got there."""
    root = resolve_root(root)
    if (root / spec.folder).is_dir():
        return root, f"{spec.what} from {shown(root / spec.folder)}"
    tried = [f"{shown(root / spec.folder)}: absent"]
    archive = root / spec.remote.filename
    how = None
    if archive.is_file():
        if md5sum(archive) == spec.remote.md5:
            how = f"extracted from {shown(archive)}"
        else:
            tried.append(f"{shown(archive)}: md5 differs from the published archive's")
    if how is None and _download(spec.remote, root, download, tried):
        how = f"downloaded from {spec.remote.sources()[0]}"
    if how is None:
        raise DataNotFound(spec.what, tried, f"To provide it by hand, put {spec.remote.filename} (from "
                                             f"{spec.remote.urls[0]}) or its extracted {spec.folder}/ under {root}.")
    _extract(archive, root, spec.folder)
    return root, f"{spec.what} from {shown(root / spec.folder)} ({how})"


def given_file(key: str, value, what: str, folder_ok: bool = False) -> Path:
    path = Path(value).expanduser()
    if path.is_file() or folder_ok and path.is_dir():
        return path
    problem = "is a folder" if path.is_dir() else "does not exist"
    raise DataError(f"{key}={value} {problem}: give the path of {what}, or leave {key} unset to use the "
                    f"first source found (data.root, a download, the offline copy)")


def cifar100n_label_file(label_file=None, root=None, download: bool = False) -> tuple[Path, str]:
    """``CIFAR-100_human.pt``: ``label_file`` when given (used or refused), else searched."""
    what = "CIFAR-100N's CIFAR-100_human.pt"
    if label_file is not None:
        path = given_file("data.label_file", label_file, what)
        return path, f"CIFAR-100N human labels from {shown(path)}"
    root = resolve_root(root)
    tried = []
    for path in (root / "cifar100n" / CIFAR100N_LABELS.filename, root / CIFAR100N_LABELS.filename):
        if path.is_file():
            return path, f"CIFAR-100N human labels from {shown(path)}"
        tried.append(f"{shown(path)}: absent")
    fetched = _download(CIFAR100N_LABELS, root / "cifar100n", download, tried)
    if fetched:
        return fetched, f"CIFAR-100N human labels from {shown(fetched)} (downloaded from {CIFAR100N_LABELS.sources()[0]})"
    offline = offline_dir() / "cifar100n" / CIFAR100N_LABELS.filename
    if offline.is_file():
        return offline, f"CIFAR-100N human labels from {shown(offline)} (the offline copy)"
    tried.append(f"offline copy {shown(offline)}: absent")
    raise DataNotFound(what, tried, f"To provide it by hand, download {CIFAR100N_LABELS.urls[0]} into "
                                    f"{root / 'cifar100n'}/ or pass data.label_file=PATH.")


def cifar10_jpeg_file(root=None, jpeg_path=None) -> tuple[Path, str]:
    """The CIFAR-10 JPEG copy (a .tar.gz or a folder): ``jpeg_path`` when given (used or
    refused), else under ``root``, else the offline copy. It has no public download."""
    what = "the CIFAR-10 JPEG copy"
    if jpeg_path is not None:
        path = given_file("data.jpeg_path", jpeg_path, f"{what} (a .tar.gz or a folder)", folder_ok=True)
        return path, f"CIFAR-10 JPEG copy (q75) from {shown(path)}"
    root = resolve_root(root)
    tried = []
    for path in (root / JPEG_NAME, root / "cifar10-jpeg" / JPEG_NAME):
        if path.exists():
            return path, f"CIFAR-10 JPEG copy (q75) from {shown(path)}"
        tried.append(f"{shown(path)}: absent")
    offline = offline_dir() / "cifar10-jpeg" / JPEG_NAME
    if offline.exists():
        return offline, f"CIFAR-10 JPEG copy (q75) from {shown(offline)} (the offline copy)"
    tried.append(f"offline copy {shown(offline)}: absent (this copy has no public download)")
    raise DataNotFound(what, tried, f"Put {JPEG_NAME} under {root} or pass data.jpeg_path=PATH; "
                                    f"with a network, data=cifar10 downloads the original CIFAR-10 instead.")
