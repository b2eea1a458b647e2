"""The trainer's bookkeeping, checked against values computed independently of it.

The numbers every figure and table is drawn from come from here: ``best_val_acc``
(from eval.csv), the memorisation probe (from the data set's own flipped mask and the
checkpointed model), the validation at a last iteration that is not a multiple of
``val_every``, resume of the scheduler and the adaptive threshold (against an unbroken
run), ``method.merge`` on every path, and which labels the microbatches balance on.
Everything goes through ``gaf.train.run`` and the files it writes.
"""

import json
import socket

import pytest
import torch

from cifar_fixtures import no_md5, write_cifar100, write_cifar100n_labels  # noqa: F401 (no_md5: a fixture)
from gaf import data as gdata
from gaf.augment import normalize
from gaf.models import build_model
from gaf.samplers import ClassBalancedSampler
from gaf.train import Trainer, run
from run_files import read_csv, tiny_config, without_times

CLASSES = 5


def config(**sections):
    """run_files.tiny_config with 60 test random images (the seeds below were chosen with them)."""
    data = sections.get("data", {})
    return tiny_config(**{**sections, "data": {"random_test": 60, **data} if data.get("name", "random") == "random"
                          else data})


def checkpoint(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)


# --------------------------------------------------------------------------- one noisy run, shared

# 25 iterations, validated every 4: validations at 4, 8, ..., 24 and (the last, not a multiple) 25.
# The probe covers every training image (memorisation_samples > 200).
NOISY = dict(data={"noise": 0.4}, train={"iterations": 25, "val_every": 4, "memorisation_samples": 10_000})


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    """Killed after iteration 13 (checkpoint at 12) and relaunched, as long runs are."""
    run_dir = tmp_path_factory.mktemp("noisy")
    cfg = config(**NOISY)
    cfg.train.stop_after = 13
    assert run(cfg, run_dir)["status"] == "stopped"
    summary = run(config(**NOISY), run_dir)
    return dict(dir=run_dir, summary=summary, evals=read_csv(run_dir / "eval.csv"),
                metrics=read_csv(run_dir / "metrics.csv"))


def test_best_val_acc_is_the_maximum_over_the_runs_validations(noisy_run):
    val = [float(r["val_acc"]) for r in noisy_run["evals"]]
    # Not vacuous: the run peaks before its end (best = final would pass otherwise) and
    # before it was killed (a best that forgot the validations before the resume would pass).
    assert max(val[:3]) > max(val[3:]), val  # validations 4, 8, 12 | 16, ..., 25
    on_disk = json.loads((noisy_run["dir"] / "summary.json").read_text())
    assert on_disk["best_val_acc"] == noisy_run["summary"]["best_val_acc"] == pytest.approx(max(val), abs=0)
    assert on_disk["final_val_acc"] == pytest.approx(val[-1], abs=0)


def test_a_last_iteration_off_the_validation_grid_is_validated_and_checkpointed(noisy_run):
    assert [int(r["iter"]) for r in noisy_run["evals"]] == [4, 8, 12, 16, 20, 24, 25]
    assert [int(r["iter"]) for r in noisy_run["metrics"]] == list(range(1, 26))
    summary = json.loads((noisy_run["dir"] / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["iterations"] == 25
    assert summary["images_seen"] == int(noisy_run["metrics"][-1]["images_seen"]) == 25 * 3 * 2 * CLASSES
    assert summary["final_val_acc"] == float(noisy_run["evals"][-1]["val_acc"])
    assert checkpoint(noisy_run["dir"])["state"]["iter"] == 25


def test_memorisation_probe_against_the_data_sets_flipped_mask(noisy_run):
    """The last validation's probe (here: every training image) recomputed from the final
    checkpoint and the labels of the data set itself: clean images scored on their labels,
    flipped ones on the noisy label they were trained on and on their true label."""
    cfg = config(**NOISY)
    d = cfg.data
    ds = gdata.load_dataset(d.name, d.root, noise=d.noise, seed=cfg.seed, random_size=(d.random_train, d.random_test),
                            num_classes=d.num_classes)
    flipped = ds.train_y != ds.clean_y
    assert int(flipped.sum()) == gdata.noise_count(0.4, len(ds.train_y)) == 80
    model = build_model("tiny", CLASSES)
    model.load_state_dict(checkpoint(noisy_run["dir"])["model"])
    model.eval()
    with torch.no_grad():
        preds = model(normalize(ds.train_x, ds.mean, ds.std)).argmax(1)
    expected = {
        "mem_clean_acc": (preds == ds.train_y)[~flipped].float().mean().item(),
        "mem_flipped_noisy_acc": (preds == ds.train_y)[flipped].float().mean().item(),
        "mem_flipped_true_acc": (preds == ds.clean_y)[flipped].float().mean().item(),
    }
    assert len(set(expected.values())) == 3, f"the three must differ, or a swap would pass: {expected}"
    last = noisy_run["evals"][-1]
    for key, value in expected.items():
        assert float(last[key]) == pytest.approx(value, abs=1e-6), key


# --------------------------------------------------------------------------- resume


def test_resume_restores_the_lr_schedule_and_the_adaptive_threshold(tmp_path):
    """A plateau scheduler that fires (patience 0) and an adaptive tau whose window spans
    the checkpoint: a run killed after iteration 5 (checkpoint at 4) and relaunched writes
    exactly the unbroken run's rows."""
    sections = dict(method={"tau": 1.0, "adaptive_k": 0.0, "adaptive_window": 50},
                    optim={"lr": 0.2, "plateau_patience": 0, "plateau_factor": 0.5},
                    train={"iterations": 10, "val_every": 2}, seed=1)
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    run(config(**sections), unbroken)
    evals, metrics = read_csv(unbroken / "eval.csv"), read_csv(unbroken / "metrics.csv")
    lr = {int(r["iter"]): float(r["lr"]) for r in evals}  # after the scheduler saw that validation
    # Not vacuous: the scheduler cuts the lr at the first validation after the resume (it
    # needs the best loss from before), and tau at iteration 5 comes from earlier distances.
    assert lr[6] < lr[4], lr
    tau = {int(r["iter"]): float(r["tau"]) for r in metrics}
    assert tau[5] < 1.0 and tau[1] == 1.0, tau

    assert run(config(**{**sections, "train": {**sections["train"], "stop_after": 5}}), broken)["status"] == "stopped"
    assert checkpoint(broken)["state"]["iter"] == 4
    assert run(config(**sections), broken)["status"] == "finished"
    assert without_times(read_csv(broken / "metrics.csv")) == without_times(metrics)
    assert without_times(read_csv(broken / "eval.csv")) == without_times(evals)


# --------------------------------------------------------------------------- method.merge on every path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_torchrun(monkeypatch):
    """torchrun's environment for a single rank: ``distributed=true`` runs in this process."""
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)


def test_merge_reaches_the_readable_fast_and_distributed_steps(tmp_path, one_rank_torchrun):
    """n = 4 at tau = 2 (every micro-gradient accepted): the halving merge weights them
    1/8, 1/8, 1/4, 1/2 and the mean 1/4 each. Each path must give the readable path's
    model for the same merge, and the two merges different models and distances."""
    models, rows = {}, {}
    for merge in ("halving", "mean"):
        for path, train, distributed in (("readable", {"fast": False}, False), ("fast", {"fast": True}, False),
                                         ("distributed", {}, True)):
            sections = dict(method={"tau": 2.0, "n_micro": 4, "per_class": 1, "merge": merge},
                            train={"iterations": 2, "val_every": 2, **train}, distributed=distributed)
            run_dir = tmp_path / f"{merge}-{path}"
            run(config(**sections), run_dir)
            models[merge, path] = checkpoint(run_dir)["model"]
            rows[merge, path] = read_csv(run_dir / "metrics.csv")
    for merge in ("halving", "mean"):
        assert all(r["accepted"] == "3" for r in rows[merge, "readable"])
        for path in ("fast", "distributed"):
            for key, ref in models[merge, "readable"].items():
                torch.testing.assert_close(models[merge, path][key], ref, atol=1e-6, rtol=1e-5,
                                           msg=f"{merge} {path} {key}")
            for a, b in zip(rows[merge, path], rows[merge, "readable"], strict=True):
                assert float(a["d3"]) == pytest.approx(float(b["d3"]), abs=1e-5), (merge, path)
    # the first step's third distance is to the aggregate of three: it depends on the merge
    assert abs(float(rows["halving", "readable"][0]["d3"]) - float(rows["mean", "readable"][0]["d3"])) > 1e-3
    weight = "0.weight"
    assert (models["halving", "readable"][weight] - models["mean", "readable"][weight]).abs().max() > 1e-4


# --------------------------------------------------------------------------- which labels microbatches balance on


@pytest.fixture
def recorded_microbatches(monkeypatch):
    """Every index tensor the class-balanced sampler hands the trainer."""
    drawn = []
    original = ClassBalancedSampler.sample

    def sample(self):
        idx = original(self)
        drawn.append(idx.clone())
        return idx

    monkeypatch.setattr(ClassBalancedSampler, "sample", sample)
    return drawn


def assert_balanced(drawn, labels, per_class, classes=100):
    assert drawn, "the sampler was never asked"
    for idx in drawn:
        for row in idx:  # one microbatch
            counts = torch.bincount(labels[row], minlength=classes)
            assert (counts == per_class).all(), f"microbatch not balanced: counts {sorted(set(counts.tolist()))}"


@pytest.fixture
def cifar100_files(tmp_path):
    return write_cifar100(tmp_path / "data", n_train_per_class=4, n_test_per_class=1)


def cifar_sections(root, **data):
    return dict(data={"root": str(root), "num_classes": None, **data}, method={"n_micro": 2, "per_class": 1},
                train={"iterations": 2, "val_every": 2})


def test_cifar100n_microbatches_balance_on_the_human_labels(tmp_path, cifar100_files, recorded_microbatches, no_md5):
    clean = torch.as_tensor(cifar100_files["train_y"])
    # Human labels: the clean labels shuffled over the images, so every class keeps 4 images
    # but most images carry another class.
    human = clean[torch.randperm(len(clean), generator=torch.Generator().manual_seed(1))]
    assert (human != clean).float().mean() > 0.9
    label_file = write_cifar100n_labels(tmp_path / "CIFAR-100_human.pt", clean, human)
    run(config(**cifar_sections(tmp_path / "data", name="cifar100n", label_file=str(label_file))), tmp_path / "run")
    assert_balanced(recorded_microbatches, human, per_class=1)


def test_synthetic_noise_microbatches_balance_on_the_clean_labels(tmp_path, cifar100_files, recorded_microbatches,
                                                                  no_md5):
    clean = torch.as_tensor(cifar100_files["train_y"])
    run(config(**cifar_sections(tmp_path / "data", name="cifar100", noise=0.6)), tmp_path / "run")
    assert_balanced(recorded_microbatches, clean, per_class=1)


def test_a_baseline_batch_its_classes_cannot_fill_names_method_batch_size(tmp_path, cifar100_files, no_md5):
    """CIFAR-100N balances on its human labels, of which a subset may leave a class empty: the error names the
    run's key and what would run, not the sampler's microbatches."""
    clean = torch.as_tensor(cifar100_files["train_y"])
    human = torch.where(clean == 7, 8, clean)  # nobody called anything class 7
    label_file = write_cifar100n_labels(tmp_path / "CIFAR-100_human.pt", clean, human)
    cfg = config(data={"root": str(tmp_path / "data"), "num_classes": None, "name": "cifar100n",
                       "label_file": str(label_file)}, method={"name": "baseline"}, train={"iterations": 2, "val_every": 2})
    with pytest.raises(gdata.DataError, match=r"^method.batch_size=128 takes 1 image\(s\) of each of 100 classes per "
                                              r"batch, but the smallest class of cifar100n has 0 \(by its human labels\); "
                                              r"use method.batch_size <= 99, or more images per class"):
        run(cfg, tmp_path / "run")


def test_a_stop_after_already_reached_is_said_and_runs_nothing(tmp_path, caplog):
    cfg = config(train={"iterations": 12, "val_every": 4, "stop_after": 6})
    assert run(cfg, tmp_path)["status"] == "stopped"  # checkpointed at 4, stopped after 6
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with caplog.at_level("INFO", logger="gaf.train"):
        summary = run(cfg, tmp_path)
    assert (summary["status"], summary["iterations"], summary["resumes_from"]) == ("stopped", 6, 4)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert "train.stop_after=6 already reached (iteration 6); nothing to do" in caplog.text
    cfg.train.stop_after = 4  # at its checkpoint: the same
    assert run(cfg, tmp_path)["iterations"] == 6 and {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_sigterm_checkpoints_where_it_came_and_the_relaunch_goes_on_exactly(tmp_path, monkeypatch):
    """SIGTERM between validations: the step under way ends, a checkpoint is written there, the summary
    says stopped (by SIGTERM) and the lock is gone; the relaunch equals an unbroken run."""
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    unbroken = run(config(train={"iterations": 12, "val_every": 4}), tmp_path / "unbroken")
    after_step = Trainer.after_step

    def terminated_at_5(self, it, progress=None):
        if it == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return after_step(self, it, progress)

    monkeypatch.setattr(Trainer, "after_step", terminated_at_5)
    ours = lambda *_: None  # noqa: E731 (where the trainer did not take SIGTERM, this test survives it)
    previous = signal.signal(signal.SIGTERM, ours)
    try:
        stopped = run(config(train={"iterations": 12, "val_every": 4}), tmp_path / "run")
        assert signal.getsignal(signal.SIGTERM) is ours  # the trainer's handler was the run's only
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (stopped["status"], stopped["stopped_by"], stopped["iterations"], stopped["resumes_from"]) == (
        "stopped", "SIGTERM", 5, 5)
    assert checkpoint(tmp_path / "run")["state"]["iter"] == 5 and not (tmp_path / "run" / "run.lock").exists()
    monkeypatch.setattr(Trainer, "after_step", after_step)
    resumed = run(config(train={"iterations": 12, "val_every": 4}), tmp_path / "run")
    assert resumed["status"] == "finished" and resumed["best_val_acc"] == unbroken["best_val_acc"]
    for name in ("metrics.csv", "eval.csv"):
        assert without_times(read_csv(tmp_path / "run" / name)) == without_times(read_csv(tmp_path / "unbroken" / name))
    assert torch.equal(torch.cat([v.flatten() for v in checkpoint(tmp_path / "run")["model"].values()]),
                       torch.cat([v.flatten() for v in checkpoint(tmp_path / "unbroken")["model"].values()]))
