"""One run end to end on tiny data: files, resume, no-op re-launch, bad input."""

import importlib.util
import json

import pytest
import torch

import gaf.train

from cifar_fixtures import md5_checks_disabled, write_cifar100
from gaf.data import DataError
from gaf.checkpoint import CheckpointError
from gaf.rundir import RunDirError
from gaf.train import run
from run_files import read_csv, tiny_config, without_times  # noqa: F401 (test_rundir imports them from here)


def test_run_writes_metrics_eval_summary_and_checkpoint(tmp_path):
    summary = run(tiny_config(), tmp_path)
    metrics, evals = read_csv(tmp_path / "metrics.csv"), read_csv(tmp_path / "eval.csv")
    assert [int(r["iter"]) for r in metrics] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "acc", "tau", "accepted", "stepped", "lr", "d_mean", "d1", "d2"} <= set(metrics[0])
    assert all(0 <= float(r["d1"]) <= 2 for r in metrics)
    assert all(int(r["accepted"]) <= 2 for r in metrics)
    assert int(metrics[-1]["images_seen"]) == 6 * 3 * 2 * 5
    assert [int(r["iter"]) for r in evals] == [2, 4, 6]
    assert {"val_acc", "val_loss", "mem_clean_acc", "mem_flipped_noisy_acc", "lr"} <= set(evals[0])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == summary["status"] == "finished"
    assert on_disk["iterations"] == 6 and on_disk["images_seen"] == 180
    assert on_disk["final_val_acc"] == pytest.approx(float(evals[-1]["val_acc"]))
    assert on_disk["steps_taken"] == sum(int(r["stepped"]) for r in metrics)
    assert on_disk["versions"]["torch"] == torch.__version__
    assert on_disk["versions"]["cpu_threads"] == torch.get_num_threads()  # CPU numbers depend on it
    assert on_disk["versions"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # and on the kernels
    assert isinstance(on_disk["versions"]["cpu_model"], str)
    assert on_disk["config"] == json.loads((tmp_path / "config.json").read_text())
    assert (tmp_path / "checkpoint.pt").exists()


def test_memorisation_probe_splits_flipped_and_clean(tmp_path):
    cfg = tiny_config(data={"noise": 0.5}, method={"name": "baseline", "batch_size": 20})
    run(cfg, tmp_path)
    last = read_csv(tmp_path / "eval.csv")[-1]
    for key in ("mem_clean_acc", "mem_flipped_noisy_acc", "mem_flipped_true_acc"):
        assert 0.0 <= float(last[key]) <= 1.0
    assert "d1" not in read_csv(tmp_path / "metrics.csv")[0]  # the plain baseline measures no distances


def test_finished_run_relaunched_is_a_noop(tmp_path):
    first = run(tiny_config(), tmp_path)
    mtime = (tmp_path / "metrics.csv").stat().st_mtime_ns
    again = run(tiny_config(), tmp_path)
    assert again == first
    assert (tmp_path / "metrics.csv").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("method", [{"name": "gaf"}, {"name": "baseline", "batch_size": 20}])
def test_killed_run_resumes_to_the_same_metrics(tmp_path, method):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    run(tiny_config(method=method), unbroken)
    stopped = run(tiny_config(method=method, train={"stop_after": 5}), broken)  # killed between checkpoints
    assert stopped["status"] == "stopped"
    assert not (broken / "summary.json").read_text().count('"finished"')
    # Relaunched without stop_after (an operational key), it picks up at iteration 4.
    assert torch.load(broken / "checkpoint.pt", weights_only=False)["state"]["iter"] == 4
    resumed = run(tiny_config(method=method), broken)
    assert resumed["status"] == "finished"
    assert without_times(read_csv(broken / "metrics.csv")) == without_times(read_csv(unbroken / "metrics.csv"))
    assert without_times(read_csv(broken / "eval.csv")) == without_times(read_csv(unbroken / "eval.csv"))
    a = torch.load(unbroken / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(broken / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    run(tiny_config(train={"stop_after": 2}), tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint.*corrupt.*delete it"):
        run(tiny_config(train={"stop_after": 2}), tmp_path)


def test_checkpoint_of_another_config_is_refused_naming_the_keys(tmp_path):
    run(tiny_config(train={"stop_after": 2}), tmp_path)
    with pytest.raises(RunDirError, match=r"a stopped run of another config: method.tau=0.5 \(it has 0.97\)"):
        run(tiny_config(method={"tau": 0.5}, train={"stop_after": 2}), tmp_path)
    (tmp_path / "summary.json").unlink()  # the checkpoint alone says the same
    with pytest.raises(RunDirError, match=r"checkpoint of a run of another config: method.tau=0.5"):
        run(tiny_config(method={"tau": 0.5}), tmp_path)


def test_finished_run_relaunched_with_another_setting_keeps_its_files(tmp_path):
    run(tiny_config(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RunDirError, match=r"a finished run of another config: seed=1 \(it has 0\).*another run dir"):
        run(tiny_config(seed=1), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("files", [("metrics.csv",), ("config.json", "eval.csv"), ("checkpoint.pt",)])
def test_a_folder_holding_someone_elses_run_files_is_refused_and_left_alone(tmp_path, files):
    for name in files:
        (tmp_path / name).write_text("a user's own file\n")
    with pytest.raises((RunDirError, CheckpointError), match=str(tmp_path)):
        run(tiny_config(), tmp_path)
    assert all((tmp_path / name).read_text() == "a user's own file\n" for name in files)


def test_stopped_run_says_so_in_its_summary(tmp_path, caplog):
    caplog.set_level("INFO")
    stopped = run(tiny_config(train={"stop_after": 5}), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert stopped == summary
    assert (summary["status"], summary["iterations"], summary["resumes_from"]) == ("stopped", 5, 4)
    assert summary["images_seen"] == 5 * 3 * 2 * 5  # 5 steps of n = 3 microbatches of m = 2 x 5 classes
    assert "stopped after iteration 5" in caplog.text and "resumes from the checkpoint at iteration 4" in caplog.text


def test_non_finite_loss_stops_the_run_and_keeps_the_checkpoint(tmp_path, caplog):
    cfg = tiny_config(method={"name": "baseline", "batch_size": 20},
                      optim={"lr": 1e4, "momentum": 0.0, "nesterov": False}, train={"iterations": 30, "val_every": 2})
    summary = run(cfg, tmp_path)
    assert summary["status"] == "diverged"
    assert "non-finite" in caplog.text and "last good checkpoint" in caplog.text
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert 0 < ckpt["state"]["iter"] == summary["iterations"] < 30
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert run(cfg, tmp_path)["status"] == "diverged"  # terminal: re-launch is a no-op


@pytest.mark.parametrize("fast", [False, True])
def test_gaf_run_whose_gradients_go_non_finite_ends_diverged(tmp_path, monkeypatch, caplog, fast):
    """One micro-gradient of step 4 turns NaN while the loss stays finite: the readable path
    (gaf_step raises) and the fast path (which skips the step) both end as 'diverged', keep
    the last good checkpoint, and record the step with NaN distances."""
    real_build, backward_calls = gaf.train.build_model, []

    def nan_gradient_in_step_4(grad):  # n = 3 micro-gradients per step: the 10th is step 4's first
        backward_calls.append(1)
        return grad * float("nan") if len(backward_calls) == 10 else grad

    def build_model(name, num_classes, **size):
        model = real_build(name, num_classes, **size)
        list(model.parameters())[-1].register_hook(nan_gradient_in_step_4)
        return model

    monkeypatch.setattr(gaf.train, "build_model", build_model)
    summary = run(tiny_config(train={"fast": fast, "iterations": 8, "val_every": 2}), tmp_path)
    assert summary["status"] == "diverged" and summary["iterations"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["iter"] == 2
    assert "non-finite training loss or micro-gradient at iteration 4" in caplog.text
    rows = read_csv(tmp_path / "metrics.csv")
    assert [int(r["iter"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["loss"]) > 0 and rows[-1]["d1"] == "nan" and rows[-1]["stepped"] == "0"


def test_gaf_with_a_huge_learning_rate_ends_diverged_on_both_paths(tmp_path):
    for fast in (False, True):
        cfg = tiny_config(optim={"lr": 1e6}, train={"fast": fast, "iterations": 30, "val_every": 2})
        assert run(cfg, tmp_path / str(fast))["status"] == "diverged"


def test_adaptive_tau_run_records_its_threshold(tmp_path):
    run(tiny_config(method={"tau": 1.0, "adaptive_k": 0.0, "adaptive_window": 10}), tmp_path)
    taus = [float(r["tau"]) for r in read_csv(tmp_path / "metrics.csv")]
    assert taus[0] == pytest.approx(1.0)
    assert any(t < 1.0 for t in taus[1:])  # the mean of distances < 1 once history exists


def test_reads_cifar100_files_through_the_real_loader(tmp_path):
    write_cifar100(tmp_path / "data", n_train_per_class=4, n_test_per_class=1)
    cfg = tiny_config(data={"name": "cifar100", "root": str(tmp_path / "data"), "noise": 0.2, "num_classes": None},
                      method={"per_class": 1, "n_micro": 2}, train={"iterations": 2, "val_every": 2})
    with md5_checks_disabled():
        summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "finished" and summary["images_seen"] == 2 * 2 * 100
    assert "symmetric label noise p=0.2" in summary["data_note"]


@pytest.mark.parametrize("sections, match", [
    ({"data": {"noise": 1.0}}, r"noise.*\[0, 1\)"),
    ({"data": {"noise": -0.1}}, r"noise.*\[0, 1\)"),
    ({"method": {"tau": 2.5}}, r"tau.*\[0, 2\].*2.5"),
    ({"method": {"n_micro": 1}}, r"n_micro.*>= 2.*1"),
    ({"method": {"merge": "sum"}}, r"merge.*'sum'"),
    ({"optim": {"name": "lion"}}, r"optim.name.*'lion'"),
    ({"optim": {"momentum": 0.0}}, r"nesterov.*momentum > 0"),
])  # a scale is a label here; configs/scale/ says which exist, and the launch refuses others (test_launch)
def test_bad_settings_are_clear_errors(tmp_path, sections, match):
    with pytest.raises(ValueError, match=match):
        run(tiny_config(**sections), tmp_path)


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match=r"unknown config key.*method.taux"):
        tiny_config(method={"taux": 1.0})


def test_microbatch_larger_than_a_class_allows(tmp_path):
    # 200 random images over 5 classes: 40 per class on average, so 3 x 20 per class cannot be disjoint:
    # refused before any data loads, in the run's keys.
    with pytest.raises(ValueError, match=r"method.per_class=20 x method.n_micro=3 = 60 .* 40 per class at most.*"
                                         r"method.replacement=true"):
        run(tiny_config(method={"per_class": 20}), tmp_path)
    assert not any(tmp_path.iterdir())
    # 3 x 12 = 36 <= 40 on average, but the smallest class of the drawn labels has fewer: refused once loaded
    with pytest.raises(DataError, match=r"method.per_class=12 x method.n_micro=3 = 36 .* in its smallest class"):
        run(tiny_config(method={"per_class": 12}), tmp_path)


def test_missing_data_files_name_the_place(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = tiny_config(data={"name": "cifar100", "root": str(tmp_path / "empty"), "num_classes": None})
    with pytest.raises(DataError, match="cifar-100-python"):
        run(cfg, tmp_path / "run")


def test_a_data_root_that_is_not_a_folder_is_refused_not_fallen_back_from(tmp_path):
    """A typo in data.root would otherwise be 'nothing under it', and the offline copy would stand in."""
    cfg = tiny_config(data={"name": "cifar10_jpeg", "root": str(tmp_path / "typo"), "num_classes": None})
    with pytest.raises(DataError, match=r"data.root=.*typo is not a folder; create it"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("method, fast", [({"name": "gaf"}, {}), ({"name": "gaf"}, {"batched": True}),
                                          ({"name": "baseline", "batch_size": 20}, {})])
def test_fast_path_gives_the_reference_metrics_on_cpu(tmp_path, method, fast):
    """train.fast=true (the fused step, masked optimizer; sequential or one vmap pass)
    equals the readable path in fp32."""
    run(tiny_config(method=method, train={"fast": False}), tmp_path / "reference")
    run(tiny_config(method=method, train={"fast": True, **fast}), tmp_path / "fast")
    ref, fast = read_csv(tmp_path / "reference" / "metrics.csv"), read_csv(tmp_path / "fast" / "metrics.csv")
    if method["name"] == "gaf":
        assert {r["stepped"] for r in ref} == {"0", "1"}

    def close(a, b):  # reported losses are averaged in fp32 vs. fp64: last-digit differences
        assert a.keys() == b.keys()
        for k in a:
            if "" in (a[k], b[k]):  # a column the run has no value for
                assert a[k] == b[k], k
            else:
                assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-6, abs=1e-7, nan_ok=True), k

    for a, b in zip(without_times(fast), without_times(ref), strict=True):
        close(a, b)
    for a, b in zip(without_times(read_csv(tmp_path / "fast" / "eval.csv")),
                    without_times(read_csv(tmp_path / "reference" / "eval.csv")), strict=True):
        close(a, b)


def test_compile_needs_cuda():
    with pytest.raises(ValueError, match="train.compile=graph.*device=cuda"):
        run(tiny_config(train={"compile": "graph"}), "/tmp/unused")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_asked_for_without_wandb_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"wandb.mode=offline needs wandb.*wandb.mode=disabled"):
        run(tiny_config(wandb={"mode": "offline"}), tmp_path)


def test_every_validation_logs_one_line(tmp_path, caplog):
    caplog.set_level("INFO", logger="gaf.train")
    run(tiny_config(), tmp_path)
    lines = [r.getMessage() for r in caplog.records if "val acc" in r.getMessage() and "iteration" in r.getMessage()]
    assert [line.split(": iteration ")[1].split(":")[0] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all("flipped labels fitted" in line and "images/s" in line for line in lines)
