"""Tiny data sets in the official on-disk layouts, written by tests (no network, no shared data).

    from cifar_fixtures import no_md5, write_cifar100, write_cifar100n_labels, write_jpeg_tar

- ``write_cifar100(root, ...)`` / ``write_cifar10(root, ...)``: the official python-pickle
  layout (``cifar-100-python/{train,test,meta}``, ``cifar-10-batches-py/data_batch_1..5,
  test_batch, batches.meta``), dict keys as the python-2 originals load with
  ``encoding="latin1"`` ('data' uint8 (N, 3072), 'fine_labels', 'coarse_labels', ...).
  Labels are interleaved like the real files, images are random.
- ``write_cifar100n_labels(path, clean, noisy)``: the ``CIFAR-100_human.pt`` dict layout.
- ``write_jpeg_tar`` / ``write_image_folder``: ``train/<class>/NNNN.jpg`` and
  ``test/<class>/NNNN.jpg``; every image of class i is a solid colour ``class_colour(i)``
  so that labels can be checked after lossy JPEG.
- ``no_md5`` (pytest fixture) / ``md5_checks_disabled()`` (context): torchvision's CIFAR
  readers check md5 sums of the real files; this keeps its existence check and its real
  reading code, and only skips the md5 comparison.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch


def _interleaved_labels(num_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    return labels.astype(np.int64)


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar100(root, n_train_per_class: int = 2, n_test_per_class: int = 1, num_classes: int = 100, seed: int = 0) -> dict:
    """Write ``<root>/cifar-100-python/``; returns the arrays written (data NCHW uint8, labels int64)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    written = {"classes": [f"class_{i:03d}" for i in range(num_classes)]}
    for split, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
        fine = _interleaved_labels(num_classes, per_class, rng)
        data = rng.integers(0, 256, (len(fine), 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G plane, B plane
        _dump(folder / split, {
            "filenames": [f"img_{i:05d}.png" for i in range(len(fine))],
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
            "data": data,
        })
        written[f"{split}_x"] = data.reshape(-1, 3, 32, 32)
        written[f"{split}_y"] = fine
    _dump(folder / "meta", {"fine_label_names": written["classes"],
                            "coarse_label_names": [f"super_{i:02d}" for i in range((num_classes + 4) // 5)]})
    return written


def write_cifar10(root, n_train_per_class: int = 5, n_test_per_class: int = 2, seed: int = 0) -> dict:
    """Write ``<root>/cifar-10-batches-py/`` (training images split over 5 batches)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    written = {"classes": names}
    for split, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
        labels = _interleaved_labels(10, per_class, rng)
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        for i, (name, part) in enumerate(zip(files, np.array_split(np.arange(len(labels)), len(files)))):
            _dump(folder / name, {"batch_label": f"{split} batch {i + 1}", "labels": labels[part].tolist(),
                                  "data": data[part], "filenames": [f"img_{j:05d}.png" for j in part]})
        written[f"{split}_x"] = data.reshape(-1, 3, 32, 32)
        written[f"{split}_y"] = labels
    _dump(folder / "batches.meta", {"num_cases_per_batch": 10000, "label_names": names, "num_vis": 3072})
    return written


def write_cifar100n_labels(path, clean, noisy) -> Path:
    """A label file in the layout of CIFAR-100_human.pt (torch.save of numpy arrays and lists)."""
    clean, noisy = np.asarray(clean, dtype=np.int64), np.asarray(noisy, dtype=np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"clean_label": clean, "noisy_label": noisy,
                "clean_coarse_label": (clean // 5).tolist(), "noisy_coarse_label": (noisy // 5).tolist()}, path)
    return path


def class_colour(i: int) -> tuple[int, int, int]:
    """A solid colour per class, far apart so that JPEG cannot confuse them."""
    return (40 + 60 * (i % 4), 40 + 60 * ((i // 4) % 4), 40 + 60 * ((i // 16) % 4))


def _jpeg(colour, size: int = 32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _image_files(classes, n_train: int, n_test: int, size: int):
    for split, n in (("train", n_train), ("test", n_test)):
        for i, c in enumerate(classes):
            blob = _jpeg(class_colour(i), size)
            for j in range(n):
                yield f"{split}/{c}/{j:04d}.jpg", blob


def write_jpeg_tar(path, classes, n_train: int, n_test: int, top: str | None = None, size: int = 32) -> Path:
    """A .tar.gz of ``[top/]train/<class>/NNNN.jpg`` and ``[top/]test/<class>/NNNN.jpg``.
    Label i is the i-th class in SORTED order, as the loader numbers them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, blob in _image_files(sorted(classes), n_train, n_test, size):
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return path


def write_image_folder(root, classes, n_train: int, n_test: int, size: int = 32) -> Path:
    """The same layout as ``write_jpeg_tar``, as files under ``root``."""
    root = Path(root)
    for name, blob in _image_files(sorted(classes), n_train, n_test, size):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    return root


@contextlib.contextmanager
def md5_checks_disabled():
    """torchvision's CIFAR readers with the md5 comparison off (files must still exist)."""
    import torchvision.datasets.cifar as cifar

    original = cifar.check_integrity
    cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)
    try:
        yield
    finally:
        cifar.check_integrity = original


@pytest.fixture
def no_md5():
    with md5_checks_disabled():
        yield
