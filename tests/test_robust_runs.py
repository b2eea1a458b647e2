"""The robust losses and co-teaching inside the trainer: every path they claim, and resume."""

import pytest

from gaf.train import run
from run_files import read_csv, tiny_config, without_times

COTEACHING = {"name": "coteaching", "batch_size": 20, "forget_rate": 0.3, "ramp_epochs": 0.5}


@pytest.mark.parametrize("method, train", [({"name": "baseline"}, {}), ({"name": "baseline"}, {"fast": True}),
                                           ({}, {}), ({}, {"fast": True}), ({}, {"fast": True, "batched": True})])
@pytest.mark.parametrize("loss", [{"name": "gce"}, {"name": "sce"}, {"name": "label_smoothing"}])
def test_every_loss_trains_on_every_single_process_path(tmp_path, method, train, loss):
    summary = run(tiny_config(method=method, train=train, loss=loss), tmp_path)
    assert summary["status"] == "finished"
    assert all(float(r["loss"]) == float(r["loss"]) for r in read_csv(tmp_path / "metrics.csv"))  # no NaN


def test_a_loss_changes_the_run(tmp_path):
    ce = run(tiny_config(), tmp_path / "ce")
    gce = run(tiny_config(loss={"name": "gce"}), tmp_path / "gce")
    assert read_csv(tmp_path / "ce" / "metrics.csv")[0]["loss"] != read_csv(tmp_path / "gce" / "metrics.csv")[0]["loss"]
    assert ce["status"] == gce["status"] == "finished"


def test_coteaching_resumes_bit_identically_after_a_kill(tmp_path):
    whole = run(tiny_config(method=COTEACHING), tmp_path / "whole")
    stopped = run(tiny_config(method=COTEACHING, train={"stop_after": 3}), tmp_path / "broken")
    assert stopped["status"] == "stopped" and whole["status"] == "finished"
    resumed = run(tiny_config(method=COTEACHING), tmp_path / "broken")
    assert resumed["status"] == "finished"
    for name in ("metrics.csv", "eval.csv"):
        assert without_times(read_csv(tmp_path / "broken" / name)) == without_times(read_csv(tmp_path / "whole" / name))
    assert resumed["best_val_acc"] == whole["best_val_acc"]
    evals = read_csv(tmp_path / "whole" / "eval.csv")
    assert "mem_flipped_noisy_acc" in evals[0] and len(evals) == 3
