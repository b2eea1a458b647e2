"""What a CPU can show of the trainer's CUDA behaviour: honest timing, the data path the GPU
check watches for host synchronisation, and the fast path's options reaching the stepper."""

import json
import time

import pytest
import torch

import gaf.steppers as steppers
import gaf.train as train
from gaf.config import RunConfig, resolve
from gaf.data import random_dataset
from gaf.samplers import ClassBalancedSampler
from gaf.fast import FastGAFStep


def config(**train_keys) -> RunConfig:
    return RunConfig.from_dict({
        "data": {"name": "random", "random_train": 100, "random_test": 20, "num_classes": 5},
        "model": {"name": "tiny"}, "method": {"per_class": 2},
        "train": {"iterations": 4, "val_every": 2, "memorisation_samples": 20, "progress": False, **train_keys},
        "device": "cpu"})


def test_train_time_counts_the_wait_for_results_and_not_validation(tmp_path, monkeypatch):
    """On CUDA a step returns before the GPU has run it; the flush's host copy is where the
    host waits. Stand-ins: 0.3 s of waiting at each flush must count as training time,
    0.5 s of validation must not."""
    pending_rows, evaluate = train.Trainer._pending_rows, train.evaluate

    def slow_rows(self):
        time.sleep(0.3)
        return pending_rows(self)

    def slow_evaluate(*args, **kwargs):
        time.sleep(0.25)  # called twice per validation: test set and memorisation probe
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train.Trainer, "_pending_rows", slow_rows)
    monkeypatch.setattr(train, "evaluate", slow_evaluate)
    summary = train.run(config(), tmp_path)
    assert 0.6 <= summary["train_time_s"] < 0.6 + 0.9  # two flushes waited; two validations (1 s) excluded
    assert summary["images_per_s"] == pytest.approx(summary["images_seen"] / summary["train_time_s"], rel=1e-2)
    assert json.loads((tmp_path / "summary.json").read_text())["train_time_s"] == summary["train_time_s"]


def test_draw_batch_is_the_augmented_normalised_step():
    ds = random_dataset(50, 10, 5, seed=0)
    sampler = ClassBalancedSampler(ds.clean_y, 5, 2, 3, seed=0)
    twin = ClassBalancedSampler(ds.clean_y, 5, 2, 3, seed=0)
    xs, ys = train.draw_batch(sampler, ds, torch.Generator().manual_seed(1), torch.device("cpu"))
    idx = twin.sample()
    assert xs.shape == (3, 10, 3, 32, 32) and xs.dtype == torch.float32 and torch.equal(ys, ds.train_y[idx])
    gen = torch.Generator().manual_seed(1)
    from gaf.augment import augment, normalize
    expected = normalize(augment(ds.train_x[idx.flatten()], gen), ds.mean, ds.std).unflatten(0, idx.shape)
    assert torch.equal(xs, expected)


@pytest.mark.parametrize("amp,channels_last,expected", [(False, None, False), (True, None, True),
                                                         (False, True, True), (True, False, False)])
def test_channels_last_is_its_own_key(amp, channels_last, expected):
    cfg = config(fast=True, amp=amp, channels_last=channels_last)
    model = train.build_model("tiny", 5)
    opt = steppers.build_optimizer(cfg.optim, model.parameters(), masked=True)
    plan = resolve(cfg, "cpu")  # train.fast=true: the fast path on a CPU, the options decided there once
    assert plan.fast and plan.channels_last is expected and plan.amp is amp
    stepper = steppers.make_stepper(cfg, model, opt, torch.nn.CrossEntropyLoss(), 0.97, plan)
    assert isinstance(stepper, FastGAFStep)
    assert stepper.channels_last is expected and (stepper.amp_dtype is torch.bfloat16) is amp
