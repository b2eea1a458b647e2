"""Data for GAF: image sets as uint8 tensors, their sources, subsets and label noise.

Everything a run needs lives in memory as tensors (CIFAR is 150 MB as uint8), so the
training device gets whole index batches (``gaf.samplers``) and augments them in one go
(``gaf.augment``):

    ds = load_dataset("cifar100", "data", noise=0.4, seed=0).to("cuda")
    sampler = ClassBalancedSampler(ds.clean_y, ds.num_classes, per_class=1, n_micro=2, seed=0)
    idx = sampler.sample().to("cuda")                          # (n_micro, 100 * per_class)
    xs = normalize(augment(ds.train_x[idx], gen), ds.mean, ds.std)  # (n, b, 3, 32, 32) float
    ys = ds.train_y[idx]

Sources:
- ``load_cifar100`` / ``load_cifar10``: torchvision's readers of the official python
  pickles (with their md5 checks).
- ``load_cifar100n``: CIFAR-100 images with the human ``noisy_label`` of
  ``CIFAR-100_human.pt``, read without executing arbitrary pickles and checked for
  alignment (its ``clean_label`` must equal the CIFAR-100 training targets).
- ``load_image_folder``: a folder or .tar.gz of ``train/<class>/*.jpg`` and
  ``test/<class>/*.jpg`` (such as the CIFAR-10 JPEG copy), decoded once into a cache.
- ``random_dataset``: random images with random labels (the paper's figure 5).

``load_dataset`` dispatches between them for the trainer and, when asked to, substitutes
a data set that is at hand for a missing CIFAR-100, always saying so in ``note``.

Every data problem raises ``DataError`` (a ``ValueError``) that names the bad value.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import math
import os
import pickle
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from gaf import sources
from gaf.samplers import check_positive_int
from gaf.sources import DataError, DataNotFound  # the data errors live with the sources; re-exported here

Tensor = torch.Tensor

# The paper's normalisation for CIFAR-100 and CIFAR-100N (the reference code's constants).
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
# The usual CIFAR-10 statistics (per-channel mean and std over all training pixels).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Uniform uint8 noise: mean 127.5/255, std sqrt((256^2 - 1)/12)/255, exactly.
RANDOM_MEAN = (0.5, 0.5, 0.5)
RANDOM_STD = (math.sqrt((256**2 - 1) / 12) / 255,) * 3

CIFAR100N_NOISE_RATE = 0.402  # fraction of CIFAR-100N fine labels that differ from the clean ones
DATASETS = ("cifar100", "cifar100n", "cifar10", "cifar10_jpeg", "random")
FALLBACKS = (None, "cifar10", "cifar10_jpeg", "random")
FALLBACK_WHEN = ("missing", "always")
# Training images per class of each fixed data set (CIFAR-100N: on average; its classes are its human labels').
TRAIN_PER_CLASS = {"cifar100": 500, "cifar100n": 500, "cifar10": 5000, "cifar10_jpeg": 5000}
CLASSES = {"cifar100": 100, "cifar100n": 100, "cifar10": 10, "cifar10_jpeg": 10}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# ----------------------------------------------------------------------------------------
# The data set


@dataclass
class ImageDataset:
    name: str  # "cifar100" | "cifar100n" | "cifar10" | "cifar10_jpeg" | "image_folder" | "random"
    train_x: Tensor  # uint8 (N, 3, H, W)
    train_y: Tensor  # int64 (N,), the labels trained on (noisy where noise applies)
    clean_y: Tensor  # int64 (N,), the true labels (== train_y when clean)
    test_x: Tensor  # uint8 (M, 3, H, W)
    test_y: Tensor  # int64 (M,), clean
    num_classes: int
    mean: tuple[float, float, float]  # per channel, on the [0, 1] scale
    std: tuple[float, float, float]
    note: str = ""  # provenance, including any substitution

    def __post_init__(self):
        for split, x, ys in (("train", self.train_x, (self.train_y, self.clean_y)), ("test", self.test_x, (self.test_y,))):
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
                raise DataError(f"{split}_x must be uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
            for y in ys:
                if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                    raise DataError(f"{split} labels must be int64 of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)

    @property
    def flipped(self) -> Tensor:
        """bool (N,): which training labels differ from the true ones."""
        return self.train_y != self.clean_y

    def to(self, device) -> "ImageDataset":
        return replace(self, train_x=self.train_x.to(device), train_y=self.train_y.to(device),
                       clean_y=self.clean_y.to(device), test_x=self.test_x.to(device), test_y=self.test_y.to(device))

    def with_labels(self, train_y: Tensor, note: str | None = None) -> "ImageDataset":
        """The same data set trained on other labels (``clean_y`` is kept)."""
        train_y = torch.as_tensor(train_y, dtype=torch.int64, device=self.train_y.device)
        return replace(self, train_y=train_y, note=self.note if note is None else note)

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}, train={tuple(self.train_x.shape)}, test={tuple(self.test_x.shape)}, "
                f"classes={self.num_classes}, flipped={int(self.flipped.sum())}, note={self.note!r})")


def channel_stats(x: Tensor, chunk: int = 2048) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, 3, H, W) on the [0, 1] scale, over all pixels."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(x), chunk):  # float32 chunks (pairwise sums), accumulated in float64
        part = x[i:i + chunk].float()
        total += part.sum(dim=(0, 2, 3)).double().cpu()
        squares += part.square().sum(dim=(0, 2, 3)).double().cpu()
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count / 255
    std = (squares / count / 255**2 - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


# ----------------------------------------------------------------------------------------
# CIFAR through torchvision


def _torchvision_cifar(cls, spec: sources.CifarFolder, root, download: bool):
    """(train, test, note): torchvision's data sets of the folder ``sources.cifar_root`` found
    (under root, or downloaded there), with torchvision's md5 errors turned into DataError."""
    folder_root, note = sources.cifar_root(spec, root, download)
    try:
        return cls(str(folder_root), train=True), cls(str(folder_root), train=False), note
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{spec.what} under {folder_root / spec.folder} is incomplete or corrupted (torchvision's md5 "
                        f"check failed: {e}); delete it (data.download=true then fetches it again)") from e


def _from_torchvision(train, test, name: str, mean, std, note: str) -> ImageDataset:
    to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    train_y = torch.tensor(train.targets, dtype=torch.int64)
    return ImageDataset(name, to_nchw(train.data), train_y, train_y.clone(), to_nchw(test.data),
                        torch.tensor(test.targets, dtype=torch.int64), len(train.classes), mean, std, note)


def load_cifar100(root=None, download: bool = False) -> ImageDataset:
    """CIFAR-100 (fine labels) from ``<root>/cifar-100-python/`` (root None: the repository's
    ``data/``), downloaded there first if asked and missing; the paper's normalisation."""
    from torchvision.datasets import CIFAR100

    train, test, note = _torchvision_cifar(CIFAR100, sources.CIFAR100, root, download)
    return _from_torchvision(train, test, "cifar100", CIFAR100_MEAN, CIFAR100_STD, note)


def load_cifar10(root=None, download: bool = False) -> ImageDataset:
    """CIFAR-10 from ``<root>/cifar-10-batches-py/``, downloaded first if asked and missing;
    the usual CIFAR-10 mean/std constants."""
    from torchvision.datasets import CIFAR10

    train, test, note = _torchvision_cifar(CIFAR10, sources.CIFAR10, root, download)
    return _from_torchvision(train, test, "cifar10", CIFAR10_MEAN, CIFAR10_STD, note)


# ----------------------------------------------------------------------------------------
# CIFAR-100N: a pickled dict of numpy arrays, read without running arbitrary pickles

_NUMPY_DTYPES = [type(np.dtype(t)) for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
                                              "uint32", "uint64", "float16", "float32", "float64")]


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        *(("numpy.dtypes", t.__name__) for t in _NUMPY_DTYPES),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        if module == "_codecs":
            return codecs.encode
        return getattr(np.dtypes, name) if module == "numpy.dtypes" else getattr(np, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing tensor storages: a CIFAR-100N label file holds numpy arrays")


def _safe_load_pickled_dict(path: Path):
    """torch.load(weights_only=True) with numpy arrays allow-listed; else a numpy-only unpickler."""
    reconstruct = _numpy_reconstruct()
    safe = [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, *_NUMPY_DTYPES]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as torch_error:
        # Older torch (no (func, name) allow-list) or an unusual but harmless file: try the
        # numpy-only unpickler on the zip's data.pkl or on a plain pickle.
        try:
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as z:
                    member = next(n for n in z.namelist() if n.endswith("data.pkl"))
                    raw = z.read(member)
            else:
                raw = path.read_bytes()
            return _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
        except Exception as e:
            raise DataError(f"cannot read {path} as a CIFAR-100N label file without executing arbitrary code: "
                            f"{e} (torch.load said: {str(torch_error).splitlines()[-1][:200]})") from e


def read_cifar100n_labels(label_file) -> dict[str, Tensor]:
    """{"clean_label", "noisy_label"} as int64 tensors from a ``CIFAR-100_human.pt`` file."""
    path = sources.given_file("data.label_file", label_file, "CIFAR-100N's CIFAR-100_human.pt")
    d = _safe_load_pickled_dict(path)
    if not (isinstance(d, dict) and {"clean_label", "noisy_label"} <= set(d)):
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{path} is not a CIFAR-100N label file: expected a dict with 'clean_label' and "
                        f"'noisy_label', got {keys}")
    out = {}
    for key in ("clean_label", "noisy_label"):
        a = torch.as_tensor(np.asarray(d[key]))
        if a.ndim != 1 or a.is_floating_point() or a.is_complex():
            raise DataError(f"{path}: {key} must be a 1-d integer array, got {a.dtype} {tuple(a.shape)}")
        out[key] = a.to(torch.int64)
    if len(out["clean_label"]) != len(out["noisy_label"]):
        raise DataError(f"{path}: clean_label has {len(out['clean_label'])} entries, noisy_label {len(out['noisy_label'])}")
    return out


def check_cifar100n_label_file(label_file) -> dict[str, Tensor]:
    """The labels of a file that must be the real CIFAR-100N file although no CIFAR-100 is at
    hand to align it with: 50,000 fine labels of each kind, all in [0, 100)."""
    labels = read_cifar100n_labels(label_file)
    for key, a in labels.items():
        if len(a) != 50_000 or a.min() < 0 or a.max() >= 100:
            raise DataError(f"data.label_file={label_file}: {key} has {len(a)} labels in [{int(a.min())}, "
                            f"{int(a.max())}]; CIFAR-100N's CIFAR-100_human.pt has 50,000 in [0, 100): wrong file")
    return labels


def _apply_cifar100n_labels(ds: ImageDataset, label_file, source: str | None = None) -> ImageDataset:
    labels = read_cifar100n_labels(label_file)
    clean, noisy = labels["clean_label"], labels["noisy_label"]
    n = len(ds.train_y)
    if len(noisy) != n:
        raise DataError(f"{label_file} holds {len(noisy)} labels but the CIFAR-100 training set has {n} images "
                        f"(the real CIFAR-100N file has exactly 50,000): wrong file")
    mismatch = clean != ds.train_y
    if mismatch.any():
        first = int(mismatch.nonzero()[0])
        raise DataError(f"{label_file}: clean_label differs from the CIFAR-100 training targets at "
                        f"{int(mismatch.sum())} of {n} positions (first at index {first}): wrong order or wrong file")
    if noisy.min() < 0 or noisy.max() >= ds.num_classes:
        raise DataError(f"{label_file}: noisy_label outside [0, {ds.num_classes})")
    rate = float((noisy != clean).double().mean())
    source = source or f"CIFAR-100N human labels from {sources.shown(label_file)}"
    return replace(ds, name="cifar100n", train_y=noisy.clone(), note=f"{ds.note}; {source} (noise rate {rate:.3f})")


def load_cifar100n(root=None, label_file=None, download: bool = False) -> ImageDataset:
    """CIFAR-100 images trained on CIFAR-100N's human ``noisy_label``; test labels stay clean.
    ``label_file`` None: under root, downloaded (if asked), or the offline copy."""
    ds = load_cifar100(root, download)
    return _apply_cifar100n_labels(ds, *sources.cifar100n_label_file(label_file, root, download))


# ----------------------------------------------------------------------------------------
# Image folders and tarballs, decoded once into a cache

_CACHE_VERSION = "gaf-image-folder-v1"


def _split_parts(name: str):
    """("train"|"test", class, file) for ``[top/]split/class/file``, else None."""
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "")]
    if len(parts) == 4 and parts[1] in ("train", "test"):
        parts = parts[1:]  # one top-level folder
    if len(parts) != 3 or parts[0] not in ("train", "test"):
        return None
    if parts[2].startswith(".") or not parts[2].lower().endswith(IMAGE_SUFFIXES):
        return None  # hidden files such as macOS's ._x.jpg, and non-images
    return parts[0], parts[1], parts[2]


def _read_image_source(path: Path) -> dict:
    """Decode every image of a folder or tarball: the slow step the cache saves."""
    from PIL import Image

    entries = []  # (split, class, relative path, bytes)
    if path.is_dir():
        for f in path.rglob("*"):
            rel = f.relative_to(path).as_posix()
            parts = _split_parts(rel)
            if parts and f.is_file():
                entries.append((*parts[:2], rel, f.read_bytes()))
    else:
        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf:  # read into memory, never extract: member paths cannot escape
                    parts = _split_parts(m.name)
                    if parts and m.isfile():
                        entries.append((*parts[:2], m.name, tf.extractfile(m).read()))
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:  # truncated, empty, not gzip
            why = "an empty file" if path.stat().st_size == 0 else sources.one_line(e)
            raise DataError(f"{path} is not a readable tar archive ({why}): truncated or not an image "
                            f"archive; fetch it again") from None
    classes = sorted({c for s, c, _, _ in entries if s == "train"})
    if not classes:
        raise DataError(f"{path} holds no images as train/<class>/*.jpg (optionally under one top-level folder)")
    extra = sorted({c for s, c, _, _ in entries if s == "test"} - set(classes))
    if extra:
        raise DataError(f"{path}: test classes {extra} have no training images")
    index = {c: i for i, c in enumerate(classes)}
    out = {"classes": classes}
    for split in ("train", "test"):
        items = sorted((rel, c, blob) for s, c, rel, blob in entries if s == split)
        if not items:
            raise DataError(f"{path} holds no {split}/<class>/ images")
        images = []
        for rel, _, blob in items:
            try:
                with Image.open(io.BytesIO(blob)) as im:
                    images.append(np.asarray(im.convert("RGB")))  # (H, W, 3); grey or CMYK files too
            except OSError as e:
                raise DataError(f"cannot decode {rel} in {path}: {e}") from e
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            raise DataError(f"{path}: {split} images differ in size {sorted(shapes)[:4]}; all must share one size")
        out[f"{split}_x"] = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        out[f"{split}_y"] = torch.tensor([index[c] for _, c, _ in items], dtype=torch.int64)
    out["mean"], out["std"] = channel_stats(out["train_x"])
    return out


def _source_key(path: Path) -> str:
    """Identity of a source: path + size + mtime (of every file, for a folder)."""
    h = hashlib.sha1(f"{_CACHE_VERSION}|{path.resolve()}".encode())
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        h.update(f"|{f.relative_to(path) if path.is_dir() else f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _writable_dir(d: Path) -> bool:
    """Writable by permission bits too: root may write into folders marked read-only (shared/)."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        return os.access(d, os.W_OK) and bool(d.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    except OSError:
        return False


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "gaf"


def _cache_dirs(path: Path, cache_dir) -> list[Path]:
    if cache_dir is not None:
        return [Path(cache_dir).expanduser()]
    parent = path.resolve().parent
    local = parent / ".cache"
    if (local.is_dir() or _writable_dir(parent)) and _writable_dir(local):
        return [local, user_cache_dir()]
    return [user_cache_dir()]


def load_image_folder(path, cache_dir=None, name: str = "image_folder", source: str | None = None) -> ImageDataset:
    """A folder or tarball of ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` as a data set.

    Classes sorted alphabetically are the label indices; images are in sorted path order.
    The decoded arrays are cached (``<dir of path>/.cache`` where writable, else
    ``$XDG_CACHE_HOME/gaf`` or ``~/.cache/gaf``) under a key of the source's path, size
    and mtime, so later loads skip decoding. mean/std are computed from the training images.
    ``source`` starts the note (default: the path).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataNotFound("image folder or tarball", [f"{path}: absent"], "Give an existing folder or .tar.gz.")
    key = _source_key(path)
    dirs = _cache_dirs(path, cache_dir)
    cache_name = f"{path.name}-{key[:16]}.pt"
    data = None
    for d in dirs:
        f = d / cache_name
        if f.is_file():
            try:
                cached = torch.load(f, map_location="cpu", weights_only=True)
                if cached.get("key") == key:
                    data = cached
                    break
            except Exception:  # a broken cache file is rebuilt below
                pass
    if data is None:
        data = _read_image_source(path)
        data["key"] = key
        for d in dirs:  # first writable location wins; no cache at all is not an error
            f = d / cache_name
            try:
                d.mkdir(parents=True, exist_ok=True)
                tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
                torch.save(data, tmp)
                os.replace(tmp, f)  # atomic: a concurrent reader never sees half a file
                break
            except OSError:
                continue
    classes = data["classes"]
    note = (f"{source or path}: {len(data['train_y'])} train / {len(data['test_y'])} test images, {len(classes)} classes "
            f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); mean/std of its training images")
    return ImageDataset(name, data["train_x"], data["train_y"], data["train_y"].clone(), data["test_x"],
                        data["test_y"], len(classes), tuple(data["mean"]), tuple(data["std"]), note)


def load_cifar10_jpeg(root=None, jpeg_path=None, cache_dir=None) -> ImageDataset:
    """The offline CIFAR-10 JPEG copy (quality 75; lossy; the original image order is lost):
    ``jpeg_path`` when given (used or refused), else under ``root``, else the offline copy."""
    path, source = sources.cifar10_jpeg_file(root, jpeg_path)
    return load_image_folder(path, cache_dir, name="cifar10_jpeg", source=source)


def load_cifar10_anywhere(root=None, download: bool = False, jpeg_path=None) -> ImageDataset:
    """CIFAR-10 from its sources in order: under root, a download, then the offline JPEG
    copy standing in for it (said in the note)."""
    try:
        return load_cifar10(root, download)
    except DataNotFound as original:
        try:
            ds = load_cifar10_jpeg(root, jpeg_path)
        except DataNotFound as jpeg:
            raise DataNotFound("CIFAR-10", original.tried + jpeg.tried,
                               f"{original.by_hand} Or put the CIFAR-10 JPEG copy ({sources.JPEG_NAME}) there, or "
                               f"pass data.jpeg_path=PATH.") from None
        return replace(ds, note=f"CIFAR-10 not found ({'; '.join(original.tried)}); substituted the CIFAR-10 JPEG "
                                f"copy (q75). {ds.note}")


# ----------------------------------------------------------------------------------------
# Random data, label noise, subsets


def random_dataset(n_train: int, n_test: int, num_classes: int, seed: int, image_size: int = 32) -> ImageDataset:
    """Uniformly random uint8 images with uniformly random labels (figure 5: memorising noise)."""
    for what, v, low in (("n_train", n_train, 1), ("n_test", n_test, 1), ("num_classes", num_classes, 2), ("image_size", image_size, 1)):
        if not (isinstance(v, int) and v >= low):
            raise DataError(f"{what} must be an integer >= {low}, got {v!r}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n_train + n_test, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (n_train + n_test,), generator=g)
    return ImageDataset("random", x[:n_train], y[:n_train], y[:n_train].clone(), x[n_train:], y[n_train:],
                        num_classes, RANDOM_MEAN, RANDOM_STD,
                        f"random uint8 images and random labels (seed {seed}); mean/std of uniform noise")


def noise_count(p: float, n: int) -> int:
    """floor(p * n), with a 1e-9 tolerance so that 0.29 * 100 (28.999999999999996) counts as 29."""
    return int(math.floor(p * n + 1e-9))


def _check_noise_rate(p) -> None:
    if not (isinstance(p, (int, float)) and 0 <= p < 1):
        raise DataError(f"noise rate p={p!r} must lie in [0, 1)")


def symmetric_noise(labels: Tensor, p: float, num_classes: int, seed: int) -> Tensor:
    """Symmetric label noise: floor(p*N) labels, chosen without replacement, each moved to
    a uniformly random DIFFERENT class. Seeded; returns new int64 labels (CPU)."""
    _check_noise_rate(p)
    labels = torch.as_tensor(labels).to("cpu", torch.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must lie in [0, num_classes={num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    k = noise_count(p, len(labels))
    if k and num_classes < 2:
        raise DataError(f"label noise needs num_classes >= 2, got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(labels), generator=g)[:k]
    shift = torch.randint(1, max(num_classes, 2), (k,), generator=g)  # 1..C-1: never the same class
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    return noisy


def _balanced_pick(labels: Tensor, per_class: int, num_classes: int, g: torch.Generator, what: str) -> Tensor:
    """Sorted indices of ``per_class`` random images of every class (no per-class loop)."""
    check_positive_int(**{f"{what}_per_class": per_class})
    counts = torch.bincount(labels, minlength=num_classes)
    short = (counts < per_class).nonzero()
    if len(short):
        c = int(short[0])
        raise DataError(f"{what}_per_class={per_class} but class {c} has only {int(counts[c])} {what} images")
    perm = torch.randperm(len(labels), generator=g)
    perm = perm[torch.sort(labels[perm], stable=True).indices]  # grouped by class, random within
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(labels)) - starts[labels[perm]]
    return perm[rank < per_class].sort().values


def subsample(ds: ImageDataset, train_per_class: int | None = None, test_per_class: int | None = None,
              seed: int = 0) -> ImageDataset:
    """Class-balanced random subsets (balanced on the TRUE labels), original order kept.

    ``train_y`` and ``clean_y`` are subset together, so existing label noise is carried
    along. ``load_dataset`` subsamples BEFORE adding symmetric noise, so that exactly
    floor(p * n) of the n images trained on are flipped.
    """
    if train_per_class is None and test_per_class is None:
        return ds
    g = torch.Generator().manual_seed(seed)
    train_x, train_y, clean_y, test_x, test_y = ds.train_x, ds.train_y, ds.clean_y, ds.test_x, ds.test_y
    parts = []
    if train_per_class is not None:
        keep = _balanced_pick(ds.clean_y.cpu(), train_per_class, ds.num_classes, g, "train").to(ds.train_x.device)
        train_x, train_y, clean_y = train_x[keep], train_y[keep], clean_y[keep]
        parts.append(f"{train_per_class} train")
    if test_per_class is not None:
        keep = _balanced_pick(ds.test_y.cpu(), test_per_class, ds.num_classes, g, "test").to(ds.test_x.device)
        test_x, test_y = test_x[keep], test_y[keep]
        parts.append(f"{test_per_class} test")
    return replace(ds, train_x=train_x, train_y=train_y, clean_y=clean_y, test_x=test_x, test_y=test_y,
                   note=f"{ds.note}; subsampled to {' / '.join(parts)} images per class (seed {seed})")


# ----------------------------------------------------------------------------------------
# The dispatcher


def _substitute(fallback, missing: str, why: str, tried: list[str], *, root, download: bool, jpeg_path,
                num_classes: int, seed: int, random_size) -> ImageDataset:
    """The fallback data set standing in for ``missing``. The note's first sentence (figure
    titles show it) says what stood in and why; the sources tried follow."""
    if fallback == "random":
        ds = random_dataset(*random_size, num_classes=num_classes, seed=seed)
        what = f"random images with random labels ({random_size[0]} train / {random_size[1]} test, {num_classes} classes)"
    else:
        ds = load_cifar10_anywhere(root, download, jpeg_path) if fallback == "cifar10" else load_cifar10_jpeg(root, jpeg_path)
        copy = "the CIFAR-10 JPEG copy (q75" if ds.name == "cifar10_jpeg" else "CIFAR-10 (the original"
        what = f"{copy}, 10 classes instead of {num_classes})"
    tried = f" Tried for {missing}: {'; '.join(tried)}." if tried else ""
    return replace(ds, note=f"{missing} {why}; substituted {what}.{tried} {ds.note}")


def _load_cifar100_family(name: str, root, label_file, download: bool, fallback, fallback_when: str,
                          substitute: dict) -> tuple[ImageDataset, bool]:
    """CIFAR-100 or CIFAR-100N, or their fallback; and whether the fallback stood in."""
    missing = "CIFAR-100" if name == "cifar100" else "CIFAR-100 (the images of CIFAR-100N)"

    def stand_in(why: str, tried: list[str]) -> ImageDataset:
        if name == "cifar100n" and label_file is not None:
            check_cifar100n_label_file(label_file)  # given, so it must be the real file although unused
        return _substitute(fallback, missing, why, tried, **substitute)

    if fallback is not None and fallback_when == "always":
        return stand_in("not used (data.fallback_when=always)", []), True
    try:
        ds = load_cifar100(root, download)
    except DataNotFound as e:
        if fallback is None:
            raise DataNotFound(e.what, e.tried, f"{e.by_hand} Or run without CIFAR-100: data.fallback=cifar10 "
                                                f"(CIFAR-10 in its place, said in the results) or data=cifar10_jpeg.") from None
        return stand_in(f"not found under {sources.shown(sources.resolve_root(root))}", e.tried), True
    if name == "cifar100n":
        ds = _apply_cifar100n_labels(ds, *sources.cifar100n_label_file(label_file, root, download))
    return ds, False


def load_dataset(name: str, root=None, *, label_file=None, noise: float = 0.0, seed: int = 0, download: bool = False,
                 fallback: str | None = None, fallback_when: str = "missing", jpeg_path=None,
                 train_per_class: int | None = None, test_per_class: int | None = None, random_size=(5000, 1000),
                 num_classes: int | None = None) -> ImageDataset:
    """One data set for a run: load (or substitute), subsample, then add symmetric label noise.

    name: "cifar100" | "cifar100n" | "cifar10" | "cifar10_jpeg" | "random". Each is looked
      for in the order of ``gaf.sources``: under ``root`` (None: the repository's ``data/``),
      a download (only with ``download=True``), the offline copies; ``cifar10`` ends with
      the JPEG copy standing in. ``label_file``/``jpeg_path``: used when given, or refused.
    fallback: None (missing CIFAR-100 is an error) | "cifar10" (CIFAR-10 from its sources)
      | "cifar10_jpeg" | "random": stands in for CIFAR-100 (and CIFAR-100N), said in
      ``note``. A substituted CIFAR-100N gets symmetric noise at CIFAR-100N's rate 0.402;
      a given ``label_file`` must still be the real CIFAR-100N file.
    fallback_when: "missing" (only where CIFAR-100 cannot be had) | "always".
    noise: symmetric noise rate in [0, 1); CIFAR-100N's noise is human, so noise > 0 is refused there.
    num_classes: the number of classes of "random" (default 100); elsewhere only checked.
    Subsampling is class-balanced on the true labels and happens before the noise.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {list(DATASETS)}")
    if fallback not in FALLBACKS:
        raise DataError(f"data.fallback={fallback!r} is unknown; choose one of {list(FALLBACKS)}")
    if fallback_when not in FALLBACK_WHEN:
        raise DataError(f"data.fallback_when={fallback_when!r} is unknown; choose one of {list(FALLBACK_WHEN)}")
    _check_noise_rate(noise)
    if name == "cifar100n" and noise > 0:
        raise DataError(f"noise={noise} with cifar100n: CIFAR-100N's noise is its human labels; use noise=0")
    substitute = dict(root=root, download=download, jpeg_path=jpeg_path, seed=seed, random_size=random_size)
    substituted_n = False
    if name in ("cifar100", "cifar100n"):
        ds, substituted = _load_cifar100_family(name, root, label_file, download, fallback, fallback_when,
                                                dict(substitute, num_classes=100))
        substituted_n = substituted and name == "cifar100n"
    elif name == "cifar10":
        try:
            ds = load_cifar10_anywhere(root, download, jpeg_path)
        except DataNotFound as e:
            if fallback != "random":
                raise
            ds = _substitute(fallback, "CIFAR-10", "not found", e.tried, **substitute, num_classes=10)
    elif name == "cifar10_jpeg":
        ds = load_cifar10_jpeg(root, jpeg_path)
    else:
        ds = random_dataset(*random_size, num_classes=num_classes or 100, seed=seed)
    if num_classes is not None and num_classes != ds.num_classes:
        raise DataError(f"num_classes={num_classes} but {ds.name} has {ds.num_classes} classes")
    ds = subsample(ds, train_per_class, test_per_class, seed)
    if substituted_n:
        noise = CIFAR100N_NOISE_RATE
    if noise > 0:
        y = symmetric_noise(ds.clean_y, noise, ds.num_classes, seed)
        why = " (CIFAR-100N's rate, standing in for its human labels)" if substituted_n else ""
        ds = ds.with_labels(y, note=f"{ds.note}; symmetric label noise p={noise}{why}: "
                                    f"{noise_count(noise, len(y))} of {len(y)} training labels flipped (seed {seed})")
    return ds
