"""The data sets a run can name (``data.name``), one record each: what the settings, the trainer,
the loader and the tables know of a data set, before loading it or without loading it.

Pure Python, so that ``gaf.config`` (which imports no torch) derives its choices and rules from
it. A record names its reader as "module:function" (imported only when the data set is loaded):
``gaf.data.load_dataset`` calls it with a ``gaf.data.Source`` and gets an ``ImageDataset``.

Adding a data set: its record here, its reader (in ``gaf.data``, its files' format in
``gaf.formats`` and their sources in ``gaf.sources`` where new), its ``configs/data/`` file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The paper's normalisation for CIFAR-100 and CIFAR-100N (the reference code's constants).
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
# The usual CIFAR-10 statistics (per-channel mean and std over all training pixels).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Uniform uint8 noise: mean 127.5/255, std sqrt((256^2 - 1)/12)/255, exactly.
RANDOM_MEAN = (0.5, 0.5, 0.5)
RANDOM_STD = (math.sqrt((256**2 - 1) / 12) / 255,) * 3


@dataclass(frozen=True)
class DataSet:
    name: str  # the data.name that asks for it
    title: str  # how figures, tables and notes name it
    classes: int | None  # None: data.num_classes decides (random data)
    train_per_class: int | None  # training images per class (on average where uneven); None: data.random_train decides
    reader: str = ""  # "module:function" loading it: f(gaf.data.Source) -> ImageDataset; DataNotFound where missing
    images: str = ""  # the data set whose images (reader, normalisation) it trains on, where another's
    mean: tuple[float, ...] | None = None  # its normalisation, per channel on the [0, 1] scale; None: of its
    std: tuple[float, ...] | None = None  # training images (computed by its reader)
    stand_ins: tuple[str, ...] = ()  # what data.fallback may put in its place where it is missing (or always)
    as_stand_in: str = ""  # how a note names it in another's place; {classes} {missing_classes} {train} {test}
    human_labels: str = ""  # "module:function" putting its human labels on its images: f(ds | None, Source); its
    #                         noise is these labels (data.noise must be 0, data.label_file applies)
    human_noise_rate: float | None = None  # the fraction of its human labels that are wrong: a stand-in's noise
    jpeg: bool = False  # it may read the CIFAR-10 JPEG copy (data.jpeg_path applies)
    random: bool = False  # random images and labels (data.random_train, data.random_test apply)


DATA_SETS = {d.name: d for d in (
    DataSet("cifar100", "CIFAR-100", 100, 500, reader="gaf.data:read_cifar100", mean=CIFAR100_MEAN, std=CIFAR100_STD,
            stand_ins=("cifar10", "cifar10_jpeg", "random")),
    DataSet("cifar100n", "CIFAR-100N-Fine", 100, 500, images="cifar100", stand_ins=("cifar10", "cifar10_jpeg", "random"),
            human_labels="gaf.data:cifar100n_labels", human_noise_rate=0.402),
    DataSet("cifar10", "CIFAR-10", 10, 5000, reader="gaf.data:read_cifar10", mean=CIFAR10_MEAN, std=CIFAR10_STD,
            stand_ins=("random",), jpeg=True,  # the JPEG copy where it is missing
            as_stand_in="CIFAR-10 (the original, {classes} classes instead of {missing_classes})"),
    DataSet("cifar10_jpeg", "CIFAR-10 (JPEG copy)", 10, 5000, reader="gaf.data:read_cifar10_jpeg", jpeg=True,
            as_stand_in="the CIFAR-10 JPEG copy (q75, {classes} classes instead of {missing_classes})"),
    DataSet("random", "random images and labels", None, None, reader="gaf.data:read_random", mean=RANDOM_MEAN,
            std=RANDOM_STD, random=True,
            as_stand_in="random images with random labels ({train} train / {test} test, {classes} classes)"),
)}


def named(*names: str | None) -> list[DataSet]:
    """The records of these names; None (no fallback) and names of no data set left out."""
    return [DATA_SETS[n] for n in names if n in DATA_SETS]


def images_of(d: DataSet) -> DataSet:
    """The record whose reader loads ``d``'s images: its own, or that of the data set it relabels."""
    return DATA_SETS[d.images] if d.images else d


def stand_in_prefix(d: DataSet) -> str:
    """How a note begins to name ``d`` standing in for another (results read notes by it)."""
    return d.as_stand_in.split(" (")[0]
