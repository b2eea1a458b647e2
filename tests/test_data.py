"""gaf.data and gaf.formats: loaders on tiny files in the official layouts, label noise, samplers, augmentation."""

import io
import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import Normalize

import gaf.formats as formats
from cifar_fixtures import no_md5  # noqa: F401  (a pytest fixture)
from cifar_fixtures import (class_colour, write_cifar10, write_cifar100, write_cifar100n_labels, write_image_folder,
                            write_jpeg_tar)
from gaf import samplers
from gaf.augment import augment, normalize
from gaf.data import (CIFAR100_MEAN, CIFAR100_STD, DataError, DataNotFound, load_cifar10, load_cifar100,
                      load_cifar100n, load_dataset, load_image_folder, random_dataset, subsample, symmetric_noise)
from gaf.samplers import BatchSampler, ClassBalancedSampler

from gaf import sources

REAL_LABELS = sources.offline_dir() / "cifar100n" / "CIFAR-100_human.pt"  # the offline copy, where present


# ---------------------------------------------------------------------------------- CIFAR


def test_cifar100_official_layout_is_read_through_torchvision(tmp_path, no_md5):
    w = write_cifar100(tmp_path, n_train_per_class=2, n_test_per_class=1)
    ds = load_cifar100(tmp_path)
    assert ds.name == "cifar100" and ds.num_classes == 100
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (200, 3, 32, 32)
    assert torch.equal(ds.train_x, torch.from_numpy(w["train_x"]))  # NCHW, in file order
    assert torch.equal(ds.train_y, torch.from_numpy(w["train_y"])) and torch.equal(ds.clean_y, ds.train_y)
    assert torch.equal(ds.test_x, torch.from_numpy(w["test_x"])) and torch.equal(ds.test_y, torch.from_numpy(w["test_y"]))
    assert ds.mean == CIFAR100_MEAN and ds.std == CIFAR100_STD
    assert not ds.flipped.any()


def test_cifar10_official_layout_five_batches(tmp_path, no_md5):
    w = write_cifar10(tmp_path, n_train_per_class=5, n_test_per_class=2)
    ds = load_cifar10(tmp_path)
    assert ds.name == "cifar10" and ds.num_classes == 10 and len(ds.train_y) == 50 and len(ds.test_y) == 20
    assert torch.equal(ds.train_x, torch.from_numpy(w["train_x"])) and torch.equal(ds.train_y, torch.from_numpy(w["train_y"]))


def test_md5_check_is_active_without_the_fixture(tmp_path):
    write_cifar100(tmp_path, 1, 1)
    with pytest.raises(DataError, match="corrupted") as e:
        load_cifar100(tmp_path)
    assert not isinstance(e.value, DataNotFound)  # there but wrong: never substituted


def test_missing_cifar_names_root_and_folder(tmp_path):
    with pytest.raises(DataNotFound) as e:
        load_cifar100(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value) and "cifar-100-python/" in str(e.value) and "download" in str(e.value)
    with pytest.raises(DataNotFound, match="cifar-10-batches-py/"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------------------------- CIFAR-100N


def _noisy(clean, rate, seed=0):
    return symmetric_noise(torch.as_tensor(clean), rate, 100, seed).numpy()


def test_cifar100n_aligned_labels(tmp_path, no_md5):
    w = write_cifar100(tmp_path, 3, 1)
    noisy = _noisy(w["train_y"], 0.4)
    label_file = write_cifar100n_labels(tmp_path / "CIFAR-100_human.pt", w["train_y"], noisy)
    ds = load_cifar100n(tmp_path, label_file)
    assert ds.name == "cifar100n"
    assert torch.equal(ds.train_y, torch.from_numpy(noisy)) and torch.equal(ds.clean_y, torch.from_numpy(w["train_y"]))
    assert torch.equal(ds.test_y, torch.from_numpy(w["test_y"]))  # test labels stay clean
    assert int(ds.flipped.sum()) == 120 and "noise rate 0.400" in ds.note


def test_cifar100n_wrong_length_order_and_missing_file(tmp_path, no_md5):
    w = write_cifar100(tmp_path, 2, 1)
    y = w["train_y"]
    short = write_cifar100n_labels(tmp_path / "short.pt", y[:-1], y[:-1])
    with pytest.raises(DataError, match="199 labels.*200 images"):
        load_cifar100n(tmp_path, short)
    shuffled = np.random.default_rng(1).permutation(y)
    wrong_order = write_cifar100n_labels(tmp_path / "order.pt", shuffled, shuffled)
    with pytest.raises(DataError, match="wrong order"):
        load_cifar100n(tmp_path, wrong_order)
    missing = tmp_path / "no" / "CIFAR-100_human.pt"
    with pytest.raises(DataError, match=str(missing)):
        load_cifar100n(tmp_path, missing)


_executed = []


def _payload():
    _executed.append("ran")
    return np.zeros(3, dtype=np.int64)


class _Malicious:
    def __reduce__(self):
        return (_payload, ())


def test_label_file_is_never_unpickled_unsafely(tmp_path, no_md5):
    write_cifar100(tmp_path, 1, 1)
    path = tmp_path / "evil.pt"
    torch.save({"clean_label": _Malicious(), "noisy_label": np.zeros(3, dtype=np.int64)}, path)
    with pytest.raises(DataError, match="without executing"):
        load_cifar100n(tmp_path, path)
    assert _executed == []


def test_numpy_only_unpickler_reads_the_layout(tmp_path):
    """The fallback path (used where torch.load's allow-list is not enough) on a real-layout file."""
    clean = np.arange(10) % 7
    path = write_cifar100n_labels(tmp_path / "l.pt", clean, clean[::-1])
    import zipfile
    with zipfile.ZipFile(path) as z:
        raw = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    d = formats._NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    assert np.array_equal(d["clean_label"], clean) and np.array_equal(d["noisy_label"], clean[::-1])


@pytest.mark.data_sources
@pytest.mark.skipif(not REAL_LABELS.is_file(), reason=f"no offline copy of the CIFAR-100N labels at {REAL_LABELS}")
def test_real_cifar100n_label_file(tmp_path):
    found, note = sources.cifar100n_label_file(None, tmp_path / "data", download=False)  # the default order finds it
    assert found == REAL_LABELS and "(the offline copy)" in note
    assert sources.md5sum(REAL_LABELS) == sources.CIFAR100N_LABELS.md5  # the file a download would fetch
    labels = formats.check_cifar100n_label_file(REAL_LABELS)
    clean, noisy = labels["clean_label"], labels["noisy_label"]
    assert len(clean) == len(noisy) == 50_000
    assert torch.equal(torch.bincount(clean, minlength=100), torch.full((100,), 500))
    assert abs(float((clean != noisy).double().mean()) - 0.402) <= 0.001


# ---------------------------------------------------------------------------------- image folders


CLASSES = ["zebra", "apple", "mango"]  # sorted: apple=0, mango=1, zebra=2


def _check_colours(ds):
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        got = x.float().mean(dim=(2, 3))
        want = torch.tensor([class_colour(int(i)) for i in y], dtype=torch.float32)
        assert (got - want).abs().max() < 6  # JPEG is lossy, but a solid colour survives


@pytest.mark.parametrize("top", [None, "cifar-like"])
def test_image_tar_labels_from_sorted_classes_and_cache(tmp_path, monkeypatch, top):
    tar = write_jpeg_tar(tmp_path / "src" / "imgs.tar.gz", CLASSES, n_train=4, n_test=2, top=top)
    decodes = []
    real = formats._read_image_source
    monkeypatch.setattr(formats, "_read_image_source", lambda p: decodes.append(p) or real(p))
    ds = load_image_folder(tar, cache_dir=tmp_path / "cache")
    assert ds.train_x.shape == (12, 3, 32, 32) and ds.test_x.shape == (6, 3, 32, 32) and ds.num_classes == 3
    assert ds.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and ds.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    _check_colours(ds)
    assert "apple, mango, zebra" in ds.note and len(decodes) == 1
    again = load_image_folder(tar, cache_dir=tmp_path / "cache")
    assert len(decodes) == 1  # the cache answered
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(ds, field), getattr(again, field))
    assert again.mean == ds.mean and again.std == ds.std
    # a changed source (size and mtime) is decoded afresh
    write_jpeg_tar(tar, CLASSES, n_train=5, n_test=2, top=top)
    os.utime(tar, ns=(0, 10**18))
    assert len(load_image_folder(tar, cache_dir=tmp_path / "cache").train_y) == 15 and len(decodes) == 2


def test_image_folder_and_default_cache_next_to_it(tmp_path, monkeypatch):
    src = write_image_folder(tmp_path / "data" / "imgs", CLASSES, n_train=3, n_test=1)
    ds = load_image_folder(src)
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and ds.name == "image_folder"
    _check_colours(ds)
    assert len(list((tmp_path / "data" / ".cache").glob("imgs-*.pt"))) == 1
    monkeypatch.setattr(formats, "_read_image_source", lambda p: pytest.fail("decoded again"))
    assert torch.equal(load_image_folder(src).train_x, ds.train_x)


def test_read_only_source_caches_in_the_user_cache(tmp_path, monkeypatch):
    tar = write_jpeg_tar(tmp_path / "shared" / "imgs.tar.gz", CLASSES, n_train=2, n_test=1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "shared").chmod(0o555)  # as shared/ (root ignores it, so the loader reads the mode bits)
    try:
        ds = load_image_folder(tar)
    finally:
        (tmp_path / "shared").chmod(0o755)
    assert len(ds.train_y) == 6
    assert not (tmp_path / "shared" / ".cache").exists()
    assert len(list((tmp_path / "xdg" / "gaf").glob("imgs.tar.gz-*.pt"))) == 1


def test_image_source_errors(tmp_path):
    with pytest.raises(DataNotFound, match="not found"):
        load_image_folder(tmp_path / "missing.tar.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path / "empty", cache_dir=tmp_path / "c")


# ---------------------------------------------------------------------------------- noise and subsets


@pytest.mark.parametrize("p", [0.1, 0.29, 0.402, 0.5, 0.8, 0.95])
def test_symmetric_noise_exact_count_never_true_class(p):
    y = torch.arange(1000) % 10
    noisy = symmetric_noise(y, p, 10, seed=3)
    flipped = noisy != y
    assert int(flipped.sum()) == math.floor(Fraction(str(p)) * 1000)  # every chosen label really moved
    assert noisy.min() >= 0 and noisy.max() < 10 and noisy.dtype == torch.int64
    assert torch.equal(noisy, symmetric_noise(y, p, 10, seed=3))
    assert not torch.equal(noisy, symmetric_noise(y, p, 10, seed=4))


def test_symmetric_noise_targets_uniform_over_other_classes():
    y = torch.zeros(30000, dtype=torch.int64)
    noisy = symmetric_noise(y, 0.9, 4, seed=0)
    counts = torch.bincount(noisy, minlength=4)
    assert counts[0] == 3000 and (counts[1:] - 9000).abs().max() < 400


def test_symmetric_noise_p_zero_and_bad_p():
    y = torch.arange(100) % 10
    assert torch.equal(symmetric_noise(y, 0.0, 10, seed=0), y)
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(DataError, match=f"p={p}"):
            symmetric_noise(y, p, 10, seed=0)


def test_subsample_is_class_balanced_and_carries_noise():
    ds = random_dataset(2000, 500, 5, seed=0)
    noisy = ds.with_labels(symmetric_noise(ds.clean_y, 0.5, 5, seed=0))
    sub = subsample(noisy, train_per_class=30, test_per_class=10, seed=1)
    assert torch.equal(torch.bincount(sub.clean_y, minlength=5), torch.full((5,), 30))
    assert torch.equal(torch.bincount(sub.test_y, minlength=5), torch.full((5,), 10))
    # every kept image keeps its own noisy and clean label
    index = {bytes(x.flatten().numpy()): i for i, x in enumerate(ds.train_x[:, :, :2, :2])}
    rows = torch.tensor([index[bytes(x.flatten().numpy())] for x in sub.train_x[:, :, :2, :2]])
    assert torch.equal(sub.train_y, noisy.train_y[rows]) and torch.equal(sub.clean_y, noisy.clean_y[rows])
    assert torch.equal(sub.train_x, subsample(noisy, 30, 10, seed=1).train_x)
    with pytest.raises(DataError, match="train_per_class=1000 but class"):
        subsample(ds, train_per_class=1000)


def test_random_dataset():
    ds = random_dataset(300, 100, 7, seed=5)
    assert ds.train_x.shape == (300, 3, 32, 32) and ds.test_x.shape == (100, 3, 32, 32) and ds.num_classes == 7
    assert torch.equal(ds.train_x, random_dataset(300, 100, 7, seed=5).train_x)
    mean, std = formats.channel_stats(ds.train_x)
    assert np.allclose(mean, ds.mean, atol=0.01) and np.allclose(std, ds.std, atol=0.01)  # uniform noise's stats
    exact = ds.train_x.double().div(255)
    assert np.allclose(mean, exact.mean(dim=(0, 2, 3)), atol=1e-7) and np.allclose(std, exact.std(dim=(0, 2, 3), correction=0), atol=1e-7)
    assert ds.to("cpu").train_x.data_ptr() == ds.train_x.data_ptr()


# ---------------------------------------------------------------------------------- samplers


def _labels(counts):
    y = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("per_class,n_micro", [(1, 2), (2, 3), (4, 2)])
def test_class_balanced_microbatches(per_class, n_micro):
    counts = [20, 17, 23, 31, 19]  # unequal, so passes end mid-step at different times
    y = _labels(counts)
    sampler = ClassBalancedSampler(y, 5, per_class, n_micro, seed=0)
    stream = {c: [] for c in range(5)}
    for _ in range(40):
        idx = sampler.sample()
        assert idx.shape == (n_micro, 5 * per_class) and idx.dtype == torch.int64
        for micro in idx:
            assert torch.equal(torch.bincount(y[micro], minlength=5), torch.full((5,), per_class))
        assert len(set(idx.flatten().tolist())) == idx.numel()  # disjoint within a step
        for c in range(5):
            stream[c] += [i for i in idx.flatten().tolist() if y[i] == c]
    for c, n in enumerate(counts):  # each class: consecutive passes, each a permutation of the class
        members = set((y == c).nonzero().flatten().tolist())
        passes = [stream[c][i:i + n] for i in range(0, len(stream[c]) - n + 1, n)]
        assert len(passes) >= 2 and all(set(p) == members for p in passes)


def test_class_balanced_every_image_once_per_pass():
    y = torch.arange(600) % 100
    sampler = ClassBalancedSampler(y, 100, per_class=1, n_micro=2, seed=1)
    first = torch.cat([sampler.sample().flatten() for _ in range(3)])
    assert torch.equal(first.sort().values, torch.arange(600))
    second = torch.cat([sampler.sample().flatten() for _ in range(3)])
    assert torch.equal(second.sort().values, torch.arange(600)) and not torch.equal(first, second)


def test_class_balanced_too_large_names_the_numbers():
    y = _labels([10, 10, 7, 10])
    with pytest.raises(DataError) as e:
        ClassBalancedSampler(y, 4, per_class=2, n_micro=4, seed=0)
    message = str(e.value)
    assert "per_class=2" in message and "n_micro=4" in message and "class 2" in message and "only 7" in message
    sampler = ClassBalancedSampler(y, 4, per_class=2, n_micro=4, seed=0, replacement=True)
    for _ in range(5):
        for micro in sampler.sample():
            assert torch.equal(torch.bincount(y[micro], minlength=4), torch.full((4,), 2))
    with pytest.raises(DataError, match="class 3 has no images"):
        ClassBalancedSampler(torch.tensor([0, 1, 2]), 4, 1, 1, seed=0)


@pytest.mark.parametrize("make", [
    lambda y, s: ClassBalancedSampler(y, 5, 2, 3, seed=s),
    lambda y, s: BatchSampler(y, 5, 23, seed=s),
])
def test_sampler_state_dict_resumes_identically(make):
    y = _labels([20, 17, 23, 31, 19])
    a = make(y, 0)
    for _ in range(7):
        a.sample()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # as a checkpoint would carry it
    buf.seek(0)
    b = make(y, 99)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(25):
        assert torch.equal(a.sample(), b.sample())


def test_sampler_state_for_other_labels_is_refused():
    state = ClassBalancedSampler(_labels([5, 5]), 2, 1, 2, seed=0).state_dict()
    with pytest.raises(DataError, match="other labels"):
        ClassBalancedSampler(_labels([5, 6]), 2, 1, 2, seed=0).load_state_dict(state)


def test_baseline_batch_composition():
    y = torch.arange(5000) % 100
    sampler = BatchSampler(y, 100, 128, seed=0)
    for _ in range(5):
        batch = sampler.sample()
        assert batch.shape == (1, 128) and len(set(batch.flatten().tolist())) == 128
        counts = torch.bincount(y[batch.flatten()], minlength=100)
        assert counts.min() >= 1 and torch.equal(torch.bincount(y[batch[0, :100]], minlength=100), torch.ones(100, dtype=torch.int64))
    y10 = torch.arange(1000) % 10
    batch = BatchSampler(y10, 10, 128, seed=0).sample().flatten()
    assert torch.bincount(y10[batch], minlength=10).min() >= 12 and len(set(batch.tolist())) == 128
    small = BatchSampler(y, 100, 50, seed=0).sample()  # B < C: plain random without replacement
    assert small.shape == (1, 50) and len(set(small.flatten().tolist())) == 50


@pytest.mark.parametrize("n,k,excluded", [(1000, 40, 100), (100, 50, 10), (500, 30, 0)])  # sparse and dense paths
def test_draw_distinct_is_uniform_without_the_excluded(n, k, excluded):
    g = torch.Generator().manual_seed(0)
    exclude = torch.arange(excluded) * 3 if excluded else None
    counts = torch.zeros(n, dtype=torch.int64)
    for _ in range(600):
        draw = samplers._draw_distinct(n, k, exclude, g)
        assert len(draw) == k and len(set(draw.tolist())) == k
        counts += torch.bincount(draw, minlength=n)
    if excluded:
        assert counts[exclude].sum() == 0
    free = counts[counts > 0] if excluded else counts
    expected = 600 * k / (n - excluded)
    assert len(free) == n - excluded and (free.float().mean() - expected).abs() < 1e-3
    assert free.float().std() < 2 * math.sqrt(expected)  # no index favoured (binomial spread)


# ---------------------------------------------------------------------------------- augmentation


def test_augment_matches_torchvision_crop_and_flip_per_image():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment(x, torch.Generator().manual_seed(7))
    assert out.shape == x.shape and out.dtype == torch.uint8
    g = torch.Generator().manual_seed(7)  # the same draws, documented order: dy, dx, flip
    dy, dx = torch.randint(0, 9, (64,), generator=g), torch.randint(0, 9, (64,), generator=g)
    flip = torch.rand(64, generator=g) < 0.5
    for i in range(64):
        ref = TF.crop(TF.pad(x[i], [4], fill=0), int(dy[i]), int(dx[i]), 32, 32)
        assert torch.equal(out[i], TF.hflip(ref) if flip[i] else ref)
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(out, augment(x, torch.Generator().manual_seed(8)))
    assert torch.equal(augment(x.view(8, 8, 3, 32, 32), torch.Generator().manual_seed(7)).view(64, 3, 32, 32), out)


def test_augment_moves_content_and_pads_with_zeros():
    x = torch.zeros(500, 3, 32, 32, dtype=torch.uint8)
    x[:, :, 10, 12] = 255  # one bright pixel
    out = augment(x, torch.Generator().manual_seed(0))
    where = (out[:, 0] == 255).nonzero()[:, 1:]  # (row, col) of the bright pixel per image
    assert len(where) == 500
    rows, cols = where[:, 0], where[:, 1]
    assert ((rows - 10).abs() <= 4).all() and (((cols - 12).abs() <= 4) | ((cols - 19).abs() <= 4)).all()
    assert len(set(rows.tolist())) == 9 and len(set(cols.tolist())) == 16  # every shift, both mirror images (8..23)
    white = augment(torch.full((500, 3, 32, 32), 255, dtype=torch.uint8), torch.Generator().manual_seed(1))
    has_zeros = (white == 0).flatten(1).any(1)
    assert 0.95 < has_zeros.float().mean() < 1  # only offset (4, 4) keeps the whole image
    assert set(white.unique().tolist()) == {0, 255}


def test_augment_flips_about_half():
    ramp = torch.arange(32, dtype=torch.uint8).mul(8).expand(2000, 3, 32, 32).contiguous()  # bright to the right
    out = augment(ramp, torch.Generator().manual_seed(2))
    flipped = out[:, 0, 16, 12] > out[:, 0, 16, 20]
    assert 0.45 < flipped.float().mean() < 0.55


def test_normalize_matches_torchvision():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    ours = normalize(x, CIFAR100_MEAN, CIFAR100_STD)
    theirs = Normalize(CIFAR100_MEAN, CIFAR100_STD)(x.float() / 255)
    assert ours.dtype == torch.float32 and torch.allclose(ours, theirs, atol=1e-6)
    assert torch.equal(normalize(x, list(CIFAR100_MEAN), torch.tensor(CIFAR100_STD)), ours)  # any sequence


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_normalize_does_not_wait_for_the_gpu():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device="cuda")
    normalize(x, CIFAR100_MEAN, CIFAR100_STD)  # the first call copies the constants once
    torch.cuda.set_sync_debug_mode("error")
    try:
        normalize(x, CIFAR100_MEAN, CIFAR100_STD)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------- dispatcher


def test_load_dataset_cifar100_subsample_then_noise(tmp_path, no_md5):
    write_cifar100(tmp_path, 6, 2)
    ds = load_dataset("cifar100", tmp_path, noise=0.5, seed=0, train_per_class=4, test_per_class=1)
    assert len(ds.train_y) == 400 and len(ds.test_y) == 100
    assert torch.equal(torch.bincount(ds.clean_y, minlength=100), torch.full((100,), 4))
    assert int(ds.flipped.sum()) == 200 and "200 of 400" in ds.note


def test_load_dataset_fallback_random_says_so(tmp_path):
    ds = load_dataset("cifar100", tmp_path, fallback="random", random_size=(300, 50))
    assert ds.name == "random" and ds.num_classes == 100 and len(ds.train_y) == 300
    assert f"CIFAR-100 not found under {tmp_path}; substituted random" in ds.note
    with pytest.raises(DataNotFound, match=str(tmp_path)):
        load_dataset("cifar100", tmp_path)


def test_load_dataset_cifar100n_substituted_by_jpeg_gets_its_noise_rate(tmp_path):
    tar = write_jpeg_tar(tmp_path / "jpeg" / "c.tar.gz", [f"c{i}" for i in range(10)], n_train=50, n_test=2)
    ds = load_dataset("cifar100n", tmp_path, fallback="cifar10_jpeg", jpeg_path=tar)
    assert ds.name == "cifar10_jpeg" and ds.num_classes == 10
    assert "substituted the CIFAR-10 JPEG copy (q75" in ds.note and "0.402" in ds.note
    assert int(ds.flipped.sum()) == math.floor(0.402 * 500)


@pytest.mark.parametrize("when", ["missing", "always"])
def test_a_given_label_file_is_checked_even_where_the_fallback_stands_in(tmp_path, when):
    """A label file the user names must be the real CIFAR-100N file although the substitute
    does not use it: missing, a folder, a text file or the wrong length are refused."""
    tar = write_jpeg_tar(tmp_path / "jpeg" / "c.tar.gz", [f"c{i}" for i in range(10)], n_train=5, n_test=1)
    text = tmp_path / "labels.txt"
    text.write_text("not a label file\n")
    y = np.arange(49_999) % 100
    bad = {"does not exist": tmp_path / "absent.pt", "is a folder": tmp_path, "cannot read": text,
           "49999 labels": write_cifar100n_labels(tmp_path / "short.pt", y, y)}
    for match, path in bad.items():
        with pytest.raises(DataError, match=match):
            load_dataset("cifar100n", tmp_path / "empty", label_file=path, fallback="cifar10_jpeg", jpeg_path=tar,
                         fallback_when=when)
    y = np.arange(50_000) % 100
    good = write_cifar100n_labels(tmp_path / "good.pt", y, y)
    ds = load_dataset("cifar100n", tmp_path / "empty", label_file=good, fallback="cifar10_jpeg", jpeg_path=tar,
                      fallback_when=when)
    assert ds.name == "cifar10_jpeg" and "0.402" in ds.note


def test_load_dataset_cifar100n_and_its_errors(tmp_path, no_md5):
    w = write_cifar100(tmp_path, 2, 1)
    labels = write_cifar100n_labels(tmp_path / "h.pt", w["train_y"], _noisy(w["train_y"], 0.3))
    ds = load_dataset("cifar100n", tmp_path, label_file=labels)
    assert ds.name == "cifar100n" and int(ds.flipped.sum()) == 60
    with pytest.raises(DataError, match="noise=0.2 with cifar100n"):
        load_dataset("cifar100n", tmp_path, label_file=labels, noise=0.2)
    with pytest.raises(DataError, match="unknown data set 'imagenet'"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(DataError, match="data.fallback=.zeros. is unknown"):
        load_dataset("cifar100", tmp_path, fallback="zeros")
    r = load_dataset("random", tmp_path, num_classes=10, random_size=(100, 20), seed=2)
    assert r.num_classes == 10 and len(r.train_y) == 100 and not r.flipped.any()
