"""scripts/show_run.py: one run, or several side by side, from their run directories."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gaf.report import collect
from gaf.train import Trainer, run
from run_files import tiny_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import show_run  # noqa: E402


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    run(tiny_config(), tmp / "a")
    run(tiny_config(seed=1, method={"tau": 2.0}, train={"stop_after": 4}), tmp / "b")
    return tmp / "a", tmp / "b"


def test_compares_runs_naming_the_settings_that_differ(two_runs, tmp_path, capsys):
    a, b = two_runs
    assert show_run.main([str(a), str(b), "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert f"run 1: {a}: finished at iteration 6 of 6" in out and f"run 2: {b}: stopped at iteration 4 of 6" in out
    assert "settings that differ:\n  method.tau: 0.97 | 2.0\n  seed: 0 | 1\n" in out  # stop_after is operational
    assert (tmp_path / "c.png").stat().st_size > 0


def test_draws_each_runs_validation_memorisation_and_distance_curves(two_runs):
    runs = [show_run.read_run(d) for d in two_runs]
    fig = show_run.draw(runs)
    for k, (axis, column) in enumerate((("val", "val_acc"), ("mem", "mem_flipped_noisy_acc"))):
        for line, r in zip(fig.axes[k].get_lines(), runs):
            evals = pd.read_csv(r["dir"] / "eval.csv")
            np.testing.assert_allclose(line.get_ydata(), 100 * evals[column])
    distance = fig.axes[2].get_lines()[0]
    metrics = pd.read_csv(two_runs[0] / "metrics.csv")
    np.testing.assert_allclose(distance.get_xdata(), metrics["iter"])


def test_a_dead_runs_running_summary_reads_interrupted_and_a_non_run_is_named(two_runs, tmp_path, capsys):
    summary = json.loads((two_runs[0] / "summary.json").read_text())
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    show_run.main([str(tmp_path / "killed"), "--out", str(tmp_path / "k.png")])
    assert f"{tmp_path / 'killed'}: interrupted" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=f"error: {tmp_path} holds no summary.json"):
        show_run.main([str(tmp_path)])
    (tmp_path / "killed" / "summary.json").write_text('{"status": "runn')
    with pytest.raises(SystemExit, match=r"error: .*killed/summary.json is corrupt"):
        show_run.main([str(tmp_path / "killed")])


def test_a_killed_run_reports_what_its_files_hold(tmp_path, monkeypatch, capsys):
    """Killed after 4 of 10 validations: its status, length and accuracies are those of its last
    checkpoint (iteration 8), in show_run and in collect alike, not a run that never started."""
    after_step = Trainer.after_step

    def killed_after_8(self, it, progress=None):
        status = after_step(self, it, progress)
        if it == 8:
            raise KeyboardInterrupt  # the files as a kill -9 leaves them
        return status

    monkeypatch.setattr(Trainer, "after_step", killed_after_8)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(train={"iterations": 20, "val_every": 2}), tmp_path / "killed")
    evals = pd.read_csv(tmp_path / "killed" / "eval.csv")
    best, final = evals["val_acc"].max(), evals["val_acc"].iloc[-1]
    show_run.main([str(tmp_path / "killed"), "--out", str(tmp_path / "k.png")])
    assert (f"{tmp_path / 'killed'}: interrupted at iteration 8 of 20; val acc best {best:.4f}, final {final:.4f}"
            in capsys.readouterr().out)
    row, _, _ = collect.read_run(tmp_path / "killed", [tmp_path])
    assert (row["status"], row["iterations"], row["best_val_acc"], row["final_val_acc"]) == ("interrupted", 8, best, final)
    assert row["images_seen"] == 8 * 3 * 2 * 5 and row["steps_taken"] > 0


def test_a_setting_that_had_no_effect_on_a_run_shows_as_a_dash(tmp_path, capsys):
    run(tiny_config(method={"tau": 0.5}), tmp_path / "gaf")
    run(tiny_config(method={"name": "baseline", "batch_size": 20}), tmp_path / "baseline")
    show_run.main([str(tmp_path / "gaf"), str(tmp_path / "baseline"), "--out", str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    assert "  method.tau: 0.5 | -\n" in out and "  method.batch_size: - | 20\n" in out and "method.n_micro: 3 | -" in out


def test_a_comparisons_title_fits_and_its_curves_are_named_by_what_differs(tmp_path):
    long = [tmp_path / ("data.noise=0.4,method.tau=0.97,optim.lr=0.05,seed=" + str(k) + ",train.iterations=6," * 3)
            for k in (0, 1)]
    for k, d in enumerate(long):
        run(tiny_config(seed=k, method={"tau": 0.97 + k}), d)
    fig = show_run.draw([show_run.read_run(d) for d in long])
    fig.canvas.draw()
    box, width = fig._suptitle.get_window_extent(), fig.bbox.width
    assert 0 <= box.x0 and box.x1 <= width, (box, width)
    assert "".join(fig._suptitle.get_text().split("\n")).count(long[0].name[:40]) == 2
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["method.tau=0.97, seed=0", "method.tau=1.97, seed=1"]
