"""Data for GAF: image sets as uint8 tensors, their sources, subsets and label noise.

Everything a run needs lives in memory as tensors (CIFAR is 150 MB as uint8), so the
training device gets whole index batches (``gaf.samplers``) and augments them in one go
(``gaf.augment``):

    ds = load_dataset("cifar100", "data", noise=0.4, seed=0).to("cuda")
    sampler = ClassBalancedSampler(ds.clean_y, ds.num_classes, per_class=1, n_micro=2, seed=0)
    idx = sampler.sample().to("cuda")                          # (n_micro, 100 * per_class)
    xs = normalize(augment(ds.train_x[idx], gen), ds.mean, ds.std)  # (n, b, 3, 32, 32) float
    ys = ds.train_y[idx]

Data sets (their files are read by ``gaf.formats``, found by ``gaf.sources``):
- ``load_cifar100`` / ``load_cifar10``: the official python pickles.
- ``load_cifar100n``: CIFAR-100 images with the human ``noisy_label`` of
  ``CIFAR-100_human.pt``, checked for alignment (its ``clean_label`` must equal the
  CIFAR-100 training targets).
- ``load_image_folder``: a folder or .tar.gz of ``train/<class>/*.jpg`` and
  ``test/<class>/*.jpg`` (such as the CIFAR-10 JPEG copy), decoded once into a cache.
- ``random_dataset``: random images with random labels (the paper's figure 5).

``load_dataset`` loads the data set a run names by the reader its record names
(``gaf.datasets``) and, when asked to, substitutes one of the record's stand-ins for a
missing data set, always saying so in ``note``.

Every data problem raises ``DataError`` (a ``ValueError``) that names the bad value.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gaf import sources
from gaf.config import DATASETS, FALLBACK_WHEN, FALLBACKS  # the schema's choices: the names load_dataset takes
from gaf.datasets import CIFAR100_MEAN, CIFAR100_STD  # noqa: F401  re-exported: the paper's normalisation
from gaf.datasets import DATA_SETS, DataSet, images_of
from gaf.formats import check_cifar100n_label_file, read_cifar, read_cifar100n_labels, read_image_folder
from gaf.samplers import check_positive_int
from gaf.sources import DataError, DataNotFound  # the data errors live with the sources; re-exported here

Tensor = torch.Tensor

# ----------------------------------------------------------------------------------------
# The data set


@dataclass
class ImageDataset:
    name: str  # the data set's (gaf.datasets), or "image_folder"
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


# ----------------------------------------------------------------------------------------
# The data sets of files


def _dataset(name: str, arrays: dict, note: str) -> ImageDataset:
    """A data set of the tensors a ``gaf.formats`` reader returns (trained on clean labels), normalised
    as its record says (else by the mean and std of its training images, which the reader computed)."""
    record = DATA_SETS.get(name)
    mean = record.mean if record and record.mean else arrays["mean"]
    std = record.std if record and record.std else arrays["std"]
    return ImageDataset(name, arrays["train_x"], arrays["train_y"], arrays["train_y"].clone(), arrays["test_x"],
                        arrays["test_y"], len(arrays["classes"]), mean, std, note)


def load_cifar100(root=None, download: bool = False) -> ImageDataset:
    """CIFAR-100 (fine labels) from ``<root>/cifar-100-python/`` (root None: the repository's
    ``data/``), downloaded there first if asked and missing; the paper's normalisation."""
    from torchvision.datasets import CIFAR100

    arrays, note = read_cifar(CIFAR100, sources.CIFAR100, root, download)
    return _dataset("cifar100", arrays, note)


def load_cifar10(root=None, download: bool = False) -> ImageDataset:
    """CIFAR-10 from ``<root>/cifar-10-batches-py/``, downloaded first if asked and missing;
    the usual CIFAR-10 mean/std constants."""
    from torchvision.datasets import CIFAR10

    arrays, note = read_cifar(CIFAR10, sources.CIFAR10, root, download)
    return _dataset("cifar10", arrays, note)


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


def load_image_folder(path, cache_dir=None, name: str = "image_folder", source: str | None = None) -> ImageDataset:
    """A folder or tarball of ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` as a data set
    (``gaf.formats.read_image_folder``: labels, order and cache); mean/std of its training
    images. ``source`` starts the note (default: the path)."""
    path = Path(path).expanduser()
    arrays = read_image_folder(path, cache_dir)
    classes, n_train, n_test = arrays["classes"], len(arrays["train_y"]), len(arrays["test_y"])
    note = (f"{source or path}: {n_train} train / {n_test} test images, {len(classes)} classes "
            f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); mean/std of its training images")
    return _dataset(name, arrays, note)


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
                        num_classes, DATA_SETS["random"].mean, DATA_SETS["random"].std,
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
# The readers the records name, and the dispatcher


@dataclass(frozen=True)
class Source:
    """Where a reader looks for its data set and what it may do to get it: one run's data settings."""
    root: object = None  # data.root (None: the repository's data/)
    download: bool = False
    label_file: object = None  # data.label_file, data.jpeg_path: used when given, or refused
    jpeg_path: object = None
    seed: int = 0
    random_size: tuple[int, int] = (5000, 1000)  # random data: training and test images
    num_classes: int | None = None  # random data: how many classes (None: 100)


def read_cifar100(src: Source) -> ImageDataset:
    return load_cifar100(src.root, src.download)


def read_cifar10(src: Source) -> ImageDataset:
    return load_cifar10_anywhere(src.root, src.download, src.jpeg_path)


def read_cifar10_jpeg(src: Source) -> ImageDataset:
    return load_cifar10_jpeg(src.root, src.jpeg_path)


def read_random(src: Source) -> ImageDataset:
    return random_dataset(*src.random_size, num_classes=src.num_classes or 100, seed=src.seed)


def cifar100n_labels(ds: ImageDataset | None, src: Source) -> ImageDataset | None:
    """CIFAR-100N's human labels on CIFAR-100's images ``ds``. ds None (a stand-in trains in its
    place): a given label file is only checked, as it must be the real file although unused."""
    if ds is None:
        if src.label_file is not None:
            check_cifar100n_label_file(src.label_file)
        return None
    return _apply_cifar100n_labels(ds, *sources.cifar100n_label_file(src.label_file, src.root, src.download))


def _function(ref: str):
    """The function a record names as "module:function"."""
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _substitute(stand_in: DataSet, missing: DataSet, why: str, tried: list[str], src: Source) -> ImageDataset:
    """The fallback data set standing in for ``missing``. The note's first sentence (figure titles
    show it) says what stood in and why; the sources tried follow."""
    ds = _function(stand_in.reader)(replace(src, num_classes=missing.classes))
    what = DATA_SETS[ds.name].as_stand_in.format(classes=ds.num_classes, missing_classes=missing.classes,
                                                 train=len(ds.train_y), test=len(ds.test_y))
    tried = f" Tried for {_missing_images(missing)}: {'; '.join(tried)}." if tried else ""
    return replace(ds, note=f"{_missing_images(missing)} {why}; substituted {what}.{tried} {ds.note}")


def _missing_images(d: DataSet) -> str:
    """What is missing when ``d`` is: its images (and whose they are, where another's)."""
    return f"{images_of(d).title} (the images of {d.title})" if d.images else d.title


def _load_or_substitute(d: DataSet, src: Source, fallback, fallback_when: str) -> tuple[ImageDataset, bool]:
    """The data set ``d`` (its images, then its human labels), or its fallback; and whether the
    fallback stood in. Only a missing data set is substituted, never a wrong one."""
    stand_in = DATA_SETS[fallback] if fallback in d.stand_ins else None
    label = _function(d.human_labels) if d.human_labels else None

    def substitute(why: str, tried: list[str]) -> ImageDataset:
        if label:
            label(None, src)
        return _substitute(stand_in, d, why, tried, src)

    if stand_in and fallback_when == "always":
        return substitute("not used (data.fallback_when=always)", []), True
    try:
        ds = _function(images_of(d).reader)(src)
    except DataNotFound as e:
        if stand_in:
            return substitute(f"not found under {sources.shown(sources.resolve_root(src.root))}", e.tried), True
        if fallback is None and d.stand_ins:
            first, *others = d.stand_ins
            instead = "".join(f" or data={s}" for s in others[:1])
            raise DataNotFound(e.what, e.tried, f"{e.by_hand} Or run without {e.what}: data.fallback={first} "
                                                f"({DATA_SETS[first].title} in its place, said in the results)"
                                                f"{instead}.") from None
        raise
    return (label(ds, src) if label else ds), False


def load_dataset(name: str, root=None, *, label_file=None, noise: float = 0.0, seed: int = 0, download: bool = False,
                 fallback: str | None = None, fallback_when: str = "missing", jpeg_path=None,
                 train_per_class: int | None = None, test_per_class: int | None = None, random_size=(5000, 1000),
                 num_classes: int | None = None) -> ImageDataset:
    """One data set for a run: load (or substitute), subsample, then add symmetric label noise.

    name: a data set of ``gaf.datasets``, loaded by its record's reader. Each is looked for in
      the order of ``gaf.sources``: under ``root`` (None: the repository's ``data/``), a download
      (only with ``download=True``), the offline copies. ``label_file``/``jpeg_path``: used when
      given, or refused.
    fallback: None (a missing data set is an error) or one of the record's ``stand_ins``: stands
      in for it, said in ``note``. A stand-in for human labels gets symmetric noise at their rate;
      a given ``label_file`` must still be the real file.
    fallback_when: "missing" (only where the data set cannot be had) | "always".
    noise: symmetric noise rate in [0, 1); refused with human labels (they are the noise).
    num_classes: the number of classes of random data (default 100); elsewhere only checked.
    Subsampling is class-balanced on the true labels and happens before the noise.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {list(DATASETS)}")
    if fallback not in FALLBACKS:
        raise DataError(f"data.fallback={fallback!r} is unknown; choose one of {list(FALLBACKS)}")
    if fallback_when not in FALLBACK_WHEN:
        raise DataError(f"data.fallback_when={fallback_when!r} is unknown; choose one of {list(FALLBACK_WHEN)}")
    _check_noise_rate(noise)
    d = DATA_SETS[name]
    if d.human_labels and noise > 0:
        raise DataError(f"noise={noise} with {name}: {d.title}'s noise is its human labels; use noise=0")
    src = Source(root, download, label_file, jpeg_path, seed, tuple(random_size), num_classes)
    ds, substituted = _load_or_substitute(d, src, fallback, fallback_when)
    if num_classes is not None and num_classes != ds.num_classes:
        raise DataError(f"num_classes={num_classes} but {ds.name} has {ds.num_classes} classes")
    ds = subsample(ds, train_per_class, test_per_class, seed)
    why = ""
    if substituted and d.human_labels:  # the stand-in's noise is the human labels' rate
        noise, why = d.human_noise_rate, f" ({d.title}'s rate, standing in for its human labels)"
    if noise > 0:
        y = symmetric_noise(ds.clean_y, noise, ds.num_classes, seed)
        ds = ds.with_labels(y, note=f"{ds.note}; symmetric label noise p={noise}{why}: "
                                    f"{noise_count(noise, len(y))} of {len(y)} training labels flipped (seed {seed})")
    return ds
