"""Readers of the data sets' files, into uint8 image tensors and int64 labels (``gaf.data``
makes data sets of them):

- ``read_cifar``: torchvision's readers of the official CIFAR python pickles (with their
  md5 checks).
- ``read_cifar100n_labels``: CIFAR-100N's ``CIFAR-100_human.pt``, read without executing
  arbitrary pickles (torch's allow-list, else a numpy-only unpickler).
- ``read_image_folder``: a folder or .tar.gz of ``train/<class>/*.jpg`` and
  ``test/<class>/*.jpg`` (such as the CIFAR-10 JPEG copy), decoded once into a cache.

Each returns plain tensors; a file that cannot be read raises ``DataError`` naming it.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from gaf import sources
from gaf.sources import DataError, DataNotFound

Tensor = torch.Tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


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



def read_cifar(cls, spec: sources.CifarFolder, root, download: bool) -> tuple[dict, str]:
    """({"classes", "train_x", "train_y", "test_x", "test_y"}, note): the CIFAR data set of
    torchvision's class ``cls`` from the folder of ``spec``, as uint8 NCHW images (file order)
    and int64 labels."""
    train, test, note = _torchvision_cifar(cls, spec, root, download)
    to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return {"classes": list(train.classes), "train_x": to_nchw(train.data),
            "train_y": torch.tensor(train.targets, dtype=torch.int64), "test_x": to_nchw(test.data),
            "test_y": torch.tensor(test.targets, dtype=torch.int64)}, note


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
    """Writable by permission bits too: root may write into folders marked read-only (an offline mirror folder)."""
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


def read_image_folder(path: Path, cache_dir=None) -> dict:
    """{"classes", "train_x", "train_y", "test_x", "test_y", "mean", "std", "key"} of a folder or
    tarball of ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``.

    Classes sorted alphabetically are the label indices; images are in sorted path order.
    The decoded arrays are cached (``<dir of path>/.cache`` where writable, else
    ``$XDG_CACHE_HOME/gaf`` or ``~/.cache/gaf``) under a key of the source's path, size
    and mtime, so later loads skip decoding. mean/std are computed from the training images.
    """
    if not path.exists():
        raise DataNotFound("image folder or tarball", [f"{path}: absent"], "Give an existing folder or .tar.gz.")
    key = _source_key(path)
    dirs = _cache_dirs(path, cache_dir)
    cache_name = f"{path.name}-{key[:16]}.pt"
    for d in dirs:
        f = d / cache_name
        if f.is_file():
            try:
                cached = torch.load(f, map_location="cpu", weights_only=True)
                if cached.get("key") == key:
                    return cached
            except Exception:  # a broken cache file is rebuilt below
                pass
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
    return data


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
