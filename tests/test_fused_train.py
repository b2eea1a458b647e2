"""gaf.fused_train: a fused group of runs equals its members run one by one through the fast path."""

import json
import os
import signal
import threading

import pandas as pd
import pytest
import torch

from gaf.config import RunConfig
from gaf.fused_train import check_group, group_size, run_group
from gaf.train import Trainer, run
from run_files import read_csv, without_times

BASE = {"data": {"name": "random", "num_classes": 4, "random_train": 80, "random_test": 40},
        "model": {"name": "tiny"}, "method": {"name": "gaf", "per_class": 2, "n_micro": 3},
        "train": {"iterations": 12, "val_every": 4, "memorisation_samples": 20, "fast": True, "progress": False},
        "device": "cpu"}
# what the members may differ in: seed (labels, noise, microbatches, augmentation), noise, tau, merge, lr, wd
MEMBERS = [{"seed": 0, "data": {"noise": 0.0}, "method": {"tau": 2.0, "merge": "mean"}},
           {"seed": 1, "data": {"noise": 0.4}, "method": {"tau": 0.0}, "optim": {"lr": 0.05}},
           {"seed": 2, "data": {"noise": 0.4}, "method": {"tau": 1.0}, "optim": {"weight_decay": 5e-4,
                                                                                 "schedule": "cosine"}}]


def config(member: dict) -> RunConfig:
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for k, v in member.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return RunConfig.from_dict(d)


def files(d):
    return pd.read_csv(d / "metrics.csv"), pd.read_csv(d / "eval.csv"), json.loads((d / "summary.json").read_text())


def test_a_fused_group_equals_its_members_run_one_by_one(tmp_path):
    cfgs = [config(m) for m in MEMBERS]
    fused = run_group(cfgs, [tmp_path / f"fused{k}" for k in range(3)])
    alone = [run(c, tmp_path / f"alone{k}") for k, c in enumerate(cfgs)]
    for k in range(3):
        (fm, fe, fs), (am, ae, as_) = files(tmp_path / f"fused{k}"), files(tmp_path / f"alone{k}")
        # fp32: vmap's grouped kernels sum in another order than one model's; decisions are exact
        assert fs["status"] == as_["status"] == "finished" == fused[k]["status"]
        assert list(fm["stepped"]) == list(am["stepped"]) and list(fm["accepted"]) == list(am["accepted"])
        assert fs["steps_taken"] == as_["steps_taken"] and fs["images_seen"] == as_["images_seen"]
        for col in ("loss", "acc", "lr", "d_mean"):
            assert fm[col].to_numpy() == pytest.approx(am[col].to_numpy(), abs=1e-4, nan_ok=True), col
        for col in ("val_loss", "val_acc", "mem_flipped_noisy_acc", "lr"):
            assert fe[col].to_numpy() == pytest.approx(ae[col].to_numpy(), abs=1e-4, nan_ok=True), col
    taken = [s["steps_taken"] for s in fused]
    assert taken[0] == 12 and taken[1] == 0 and 0 < taken[2] < 12  # tau 2 takes every step, 0 none, 1 some


def test_a_group_whose_step_is_captured_as_a_graph_trains_as_the_eager_group(tmp_path, monkeypatch):
    """The CUDA path of a fused run (compile=graph: warm-up, one capture, replays on static inputs,
    each member's lr schedule written into the captured step), with gaf.fast's stand-in for the
    CUDA calls: every file bit for bit as the eager group's."""
    import functools

    import gaf.fused_train
    from gaf.fast import StandInGraphs

    cfgs = [config(m) for m in MEMBERS]
    run_group(cfgs, [tmp_path / f"eager{k}" for k in range(3)])
    graphs = StandInGraphs()
    graphed = functools.partial(gaf.fused_train.fused_steps, compile="graph", graphs=graphs)
    monkeypatch.setattr(gaf.fused_train, "fused_steps", lambda trainers, compile=False: graphed(trainers))
    run_group(cfgs, [tmp_path / f"graph{k}" for k in range(3)])
    assert graphs.captures == 1 and graphs.replays == 12 - graphs.warmups
    for k in range(3):
        (gm, ge, gs), (em, ee, es) = files(tmp_path / f"graph{k}"), files(tmp_path / f"eager{k}")
        assert gm.drop(columns="time_s").equals(em.drop(columns="time_s"))
        assert ge.drop(columns="time_s").equals(ee.drop(columns="time_s"))
        assert gs["steps_taken"] == es["steps_taken"] and gs["best_val_acc"] == es["best_val_acc"]


def test_a_fused_group_of_baselines_equals_them_run_one_by_one(tmp_path):
    base = {k: v for k, v in BASE.items() if k != "method"}
    cfgs = [RunConfig.from_dict({**base, "seed": s, "method": {"name": "baseline", "batch_size": 8},
                                 "data": {**base["data"], "noise": 0.2 * s}}) for s in range(2)]
    run_group(cfgs, [tmp_path / f"fused{k}" for k in range(2)])
    for k, c in enumerate(cfgs):
        run(c, tmp_path / f"alone{k}")
        (fm, fe, _), (am, ae, _) = files(tmp_path / f"fused{k}"), files(tmp_path / f"alone{k}")
        assert fm["loss"].to_numpy() == pytest.approx(am["loss"].to_numpy(), abs=1e-4)
        assert fe["val_acc"].to_numpy() == pytest.approx(ae["val_acc"].to_numpy(), abs=1e-4)


def test_a_finished_member_is_a_no_op_and_a_stopped_group_resumes(tmp_path):
    cfgs = [config(m) for m in MEMBERS]
    dirs = [tmp_path / f"m{k}" for k in range(3)]
    unbroken = [tmp_path / f"u{k}" for k in range(3)]
    run_group(cfgs, unbroken)
    stopped = [RunConfig.from_dict({**c.to_dict(), "train": {**c.to_dict()["train"], "stop_after": 6}})
               for c in cfgs]
    assert [s["status"] for s in run_group(stopped, dirs)] == ["stopped"] * 3
    again = run_group(cfgs, dirs)  # resumes at the checkpoint of iteration 4
    assert [s["status"] for s in again] == ["finished"] * 3
    for d, u in zip(dirs, unbroken):
        assert files(d)[0].drop(columns="time_s").equals(files(u)[0].drop(columns="time_s"))
    before = (dirs[0] / "summary.json").read_text()
    assert run_group(cfgs, dirs)[0]["status"] == "finished" and (dirs[0] / "summary.json").read_text() == before


def test_runs_that_cannot_share_a_step_are_one_clear_error():
    cfgs = [config(MEMBERS[0]), config({**MEMBERS[1], "method": {"per_class": 1}})]
    with pytest.raises(ValueError, match=r"^a fused group's runs must share method.per_class"):
        check_group(cfgs)
    with pytest.raises(ValueError, match="fast path"):
        check_group([config({"train": {"fast": False}})])


def stop_at(cfgs: list[RunConfig], iteration: int) -> list[RunConfig]:
    return [RunConfig.from_dict({**c.to_dict(), "train": {**c.to_dict()["train"], "stop_after": iteration}})
            for c in cfgs]


def test_a_stop_after_a_group_already_reached_is_said_and_runs_nothing(tmp_path, caplog):
    cfgs = stop_at([config(m) for m in MEMBERS], 6)
    dirs = [tmp_path / f"m{k}" for k in range(3)]
    run_group(cfgs, dirs)  # checkpointed at 4, stopped after 6
    before = {p: p.read_bytes() for d in dirs for p in d.iterdir()}
    with caplog.at_level("INFO", logger="gaf.train"):
        again = run_group(cfgs, dirs)
    assert [(s["status"], s["iterations"], s["resumes_from"]) for s in again] == [("stopped", 6, 4)] * 3
    assert {p: p.read_bytes() for d in dirs for p in d.iterdir()} == before
    assert caplog.text.count("train.stop_after=6 already reached (iteration 6); nothing to do") == 3


def test_sigterm_stops_a_group_after_the_step_under_way_and_the_relaunch_goes_on_exactly(tmp_path, monkeypatch):
    """As for one run (gaf.train): every member checkpointed where the signal came, its summary stopped
    by SIGTERM, the locks gone, the handler given back; the relaunch equals an unbroken group."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    cfgs = [config(m) for m in MEMBERS]
    unbroken = [tmp_path / f"u{k}" for k in range(3)]
    run_group(cfgs, unbroken)
    after_step = Trainer.after_step

    def terminated_at_5(self, it, progress=None):
        if it == 5 and self.run_dir.name == "m1":  # mid-way through the members' after_steps
            os.kill(os.getpid(), signal.SIGTERM)
        return after_step(self, it, progress)

    monkeypatch.setattr(Trainer, "after_step", terminated_at_5)
    ours = lambda *_: None  # noqa: E731 (where the group did not take SIGTERM, this test survives it)
    previous = signal.signal(signal.SIGTERM, ours)
    dirs = [tmp_path / f"m{k}" for k in range(3)]
    try:
        stopped = run_group(cfgs, dirs)
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, previous)
    # m0's iteration 5 was over when the signal came: it stops after its next step, the others at 5
    assert [(s["status"], s["stopped_by"], s["resumes_from"]) for s in stopped] == [
        ("stopped", "SIGTERM", 6), ("stopped", "SIGTERM", 5), ("stopped", "SIGTERM", 5)]
    assert not any((d / "run.lock").exists() for d in dirs)
    monkeypatch.setattr(Trainer, "after_step", after_step)
    assert [s["status"] for s in run_group(cfgs, dirs)] == ["finished"] * 3
    for d, u in zip(dirs, unbroken):
        for name in ("metrics.csv", "eval.csv"):
            assert without_times(read_csv(d / name)) == without_times(read_csv(u / name)), (d, name)


def test_a_group_too_large_for_the_memory_is_split_and_a_member_that_fits_none_is_one_line(tmp_path, caplog):
    """The memory is injected (one member's bytes, bytes free): on CUDA step_memory measures them."""
    cfgs = [config(m) for m in MEMBERS]
    sizes = []
    with caplog.at_level("INFO", logger="gaf.fused_train"):
        got = run_group(cfgs, [tmp_path / f"m{k}" for k in range(3)],
                        memory=lambda t: sizes.append(1) or (100, 250))  # two members fit
    assert sizes == [1] and [s["status"] for s in got] == ["finished"] * 3
    assert "fused: 3 runs in groups of at most 2 (the device's free memory)" in caplog.text
    assert caplog.text.count("fused group of 2, iteration 12/12") == 1
    assert caplog.text.count("fused group of 1, iteration 12/12") == 1
    with pytest.raises(ValueError, match=r"^a fused group's member needs .* GiB for its step, but only .* GiB of the "
                                         r"device is free to it: it fits no group; use a smaller method.per_class"):
        run_group(cfgs, [tmp_path / f"n{k}" for k in range(3)], memory=lambda t: (300, 250))
    assert not any(any((tmp_path / f"n{k}").iterdir()) for k in range(3))  # refused before anything is written


def test_group_size_takes_what_fits_and_nothing_measured_takes_all():
    assert group_size(5, None) == 5 and group_size(5, (10, 25)) == 2 and group_size(2, (10, 100)) == 2
    assert group_size(1, (10, 10)) == 1
    with pytest.raises(ValueError, match="fits no group"):
        group_size(1, (11, 10))


def test_off_cuda_nothing_is_measured(tmp_path):
    from gaf.fused_train import member_trainer, step_memory

    assert step_memory(member_trainer(config(MEMBERS[0]), tmp_path, None, torch.device("cpu"))) is None


def test_the_group_logs_each_members_latest_accuracy(tmp_path, caplog):
    cfgs = [config(m) for m in MEMBERS]
    with caplog.at_level("INFO", logger="gaf.fused_train"):
        run_group(cfgs, [tmp_path / f"m{k}" for k in range(3)])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fused group of 3")]
    assert [line.split(",")[1].split(":")[0] for line in lines] == [" iteration 4/12", " iteration 8/12",
                                                                  " iteration 12/12"]
    final = [json.loads((tmp_path / f"m{k}" / "summary.json").read_text())["final_val_acc"] for k in range(3)]
    assert lines[-1].endswith("val acc " + " ".join(f"{a:.3f}" for a in final))


def test_a_member_that_diverges_leaves_the_group_as_its_run_alone_would(tmp_path):
    """Its summary and rows end where its run alone ends (the group goes on without stepping it further)."""
    cfgs = [config({"optim": {"lr": 1e6}, "train": {"iterations": 30, "val_every": 2}}),
            config({"seed": 1, "train": {"iterations": 30, "val_every": 2}})]
    fused = run_group(cfgs, [tmp_path / "f0", tmp_path / "f1"])
    alone = run(cfgs[0], tmp_path / "a0")
    assert [s["status"] for s in fused] == ["diverged", "finished"]
    keys = ("status", "iterations", "images_seen", "steps_taken")
    assert {k: fused[0][k] for k in keys} == {k: alone[k] for k in keys}
    assert list(pd.read_csv(tmp_path / "f0" / "metrics.csv")["iter"]) == list(pd.read_csv(tmp_path / "a0" /
                                                                                          "metrics.csv")["iter"])
