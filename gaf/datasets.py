"""The data sets a run can name (``data.name``), one record each: what the settings, the trainer
and the tables know of a data set before loading it, or without loading it.

Pure Python, so that ``gaf.config`` (which imports no torch) derives its choices and rules from
it; ``gaf.data.LOADERS`` loads each record's data set (tests/test_configs.py keeps the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSet:
    name: str  # the data.name that asks for it
    title: str  # how figures and tables name it
    classes: int | None  # None: data.num_classes decides (random data)
    train_per_class: int | None  # training images per class (on average where uneven); None: data.random_train decides
    stand_ins: tuple[str, ...] = ()  # what data.fallback may put in its place where it is missing (or always)
    human_labels: bool = False  # its noise is its own human labels: data.noise must be 0, data.label_file applies
    jpeg: bool = False  # it may read the CIFAR-10 JPEG copy (data.jpeg_path applies)
    random: bool = False  # random images and labels (data.random_train, data.random_test apply)


DATA_SETS = {d.name: d for d in (
    DataSet("cifar100", "CIFAR-100", 100, 500, stand_ins=("cifar10", "cifar10_jpeg", "random")),
    DataSet("cifar100n", "CIFAR-100N-Fine", 100, 500, stand_ins=("cifar10", "cifar10_jpeg", "random"),
            human_labels=True),
    DataSet("cifar10", "CIFAR-10", 10, 5000, stand_ins=("random",), jpeg=True),  # the JPEG copy where it is missing
    DataSet("cifar10_jpeg", "CIFAR-10 (JPEG copy)", 10, 5000, jpeg=True),
    DataSet("random", "random images and labels", None, None, random=True),
)}


def named(*names: str | None) -> list[DataSet]:
    """The records of these names; None (no fallback) and names of no data set left out."""
    return [DATA_SETS[n] for n in names if n in DATA_SETS]
