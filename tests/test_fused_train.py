"""gaf.fused_train: a fused group of runs equals its members run one by one through the fast path."""

import json

import pandas as pd
import pytest

from gaf.config import RunConfig
from gaf.fused_train import check_group, run_group
from gaf.train import run

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
