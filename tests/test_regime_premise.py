"""The regime check (scripts/regime_check.py), the premise table and figure, and table 1's seeds,
on small hand-made result files whose answers are known."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gaf.report import data, figures, tables

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import regime_check  # noqa: E402

OPTIM = {"optim.name": "sgd", "optim.nesterov": True, "optim.momentum": 0.9, "optim.lr": 0.01,
         "optim.weight_decay": 0.01}


def run_row(run_id, method, noise, seed=0, best=0.5, final=0.5, width=16, tau=0.97, m=1, iterations=300, **extra):
    return {"run_id": run_id, "experiment": "x", "scale": "tiny", "data.name": "cifar100", "data.noise": noise,
            "model.name": "cnn4", "model.width": width, "method.name": method,
            "method.tau": tau if method == "gaf" else np.nan, "method.n_micro": 2 if method == "gaf" else np.nan,
            "method.per_class": m,
            "seed": seed, "status": "finished", "best_val_acc": best, "final_val_acc": final,
            "iterations": iterations, "data_note": "", **OPTIM, **extra}


def eval_rows(run_id, val, mem, every=100):
    return [{"run_id": run_id, "iter": every * (i + 1), "train_acc": 0.5, "val_acc": v, "mem_flipped_noisy_acc": k}
            for i, (v, k) in enumerate(zip(val, mem))]


def write(results, experiment, runs, evals, curves=()):
    d = Path(results) / experiment
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(runs).assign(experiment=experiment).to_csv(d / "runs.csv", index=False)
    pd.DataFrame(evals).to_csv(d / "evals.csv", index=False)
    columns = data.CURVE_COLUMNS + ["stepped_win"]
    pd.DataFrame(list(curves), columns=columns).to_csv(d / "curves.csv", index=False)


def fig6_results(results, mem=0.6, clean_best=0.47, drop=0.08):
    runs, evals = [], []
    for seed in (0, 1):
        runs += [run_row(f"c{seed}", "baseline", 0.0, seed, best=clean_best, final=clean_best - 0.01),
                 run_row(f"n{seed}", "baseline", 0.4, seed, best=0.33, final=0.33 - drop),
                 run_row(f"g{seed}", "gaf", 0.4, seed, best=0.30 + 0.02 * seed, final=0.30)]
        evals += eval_rows(f"c{seed}", [0.4, clean_best, clean_best - 0.01], [np.nan] * 3)
        evals += eval_rows(f"n{seed}", [0.33, 0.30, 0.33 - drop], [0.1, 0.3, mem])
        evals += eval_rows(f"g{seed}", [0.25, 0.32, 0.30], [0.1, 0.1, 0.1])
    write(results, "fig6", runs, evals)


def test_regime_check_passes_when_every_condition_holds(tmp_path, capsys):
    fig6_results(tmp_path)
    assert regime_check.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 2 + 2 * 2 + 2 and "FAIL" not in out
    assert "baseline fits 60.0% of the flipped samples" in out and "down 8.0 points" in out
    assert "GAF: n_micro=2, tau=0.97 (needs" in out  # the baselines' empty cells make the column float


@pytest.mark.parametrize("kwargs, failing", [
    (dict(mem=0.4), "fits 40.0% of the flipped samples"),
    (dict(clean_best=0.44), "baseline best val acc 44.0% (needs >= 45%)"),
    (dict(drop=0.03), "down 3.0 points (needs >= 5)"),
])
def test_regime_check_names_each_failing_condition(tmp_path, capsys, kwargs, failing):
    fig6_results(tmp_path, **kwargs)
    assert regime_check.main(["--results", str(tmp_path)]) == 1  # a failing condition is a failing exit status
    out = capsys.readouterr().out
    assert any(line.strip().startswith("FAIL") and failing in line for line in out.splitlines()), out
    assert "NOT in the regime" in out


def test_regime_check_refuses_another_optimizer(tmp_path, capsys):
    fig6_results(tmp_path)
    runs = pd.read_csv(tmp_path / "fig6/runs.csv")
    runs.loc[0, "optim.weight_decay"] = 0.0005
    runs.to_csv(tmp_path / "fig6/runs.csv", index=False)
    assert regime_check.main(["--results", str(tmp_path)]) == 1
    assert "FAIL  optimizer: name=sgd, nesterov=True, momentum=0.9, lr=0.01, weight_decay=0.0005/0.01" in \
        capsys.readouterr().out


def test_table1_reports_mean_and_spread_over_seeds(tmp_path):
    fig6_results(tmp_path)
    df = tables.table1(tmp_path, "tiny")
    row = df[df["label noise (%)"] == "40"].iloc[0]
    assert row["GAF (%)"] == pytest.approx(31.0) and row["GAF s.d."] == pytest.approx(np.std([30, 32], ddof=1))
    assert row["seeds"] == "2 / 2" and row["difference (points)"] == pytest.approx(31.0 - 33.0)
    text = tables.markdown_table(tables.with_spread(df))
    assert "| 33.0 ± 0.0 | 31.0 ± 1.4 |" in text


def curve_rows(run_id, d_early, d_late, step_early, step_late, T=300, switch=100):
    return [{"run_id": run_id, "iter": it, "d_mean": np.nan, "d_mean_win": d_early if it <= switch else d_late,
             "stride": 10, "acc": 0.5, "loss": 1.0, "stepped_win": step_early if it <= switch else step_late}
            for it in range(10, T + 1, 10)]


def test_premise_table_measures_the_phase_after_the_baselines_peak(tmp_path):
    """The width-16 baseline is figure 6's; width 4 has its own. The phase starts at each baseline's peak."""
    fig6_results(tmp_path)  # width-16 baselines peak at iteration 100 (0.33 at 100)
    runs = [run_row("b4", "baseline", 0.4, best=0.30, final=0.28, width=4)]
    evals = eval_rows("b4", [0.25, 0.30, 0.28], [0.1, 0.1, 0.2])  # peak at 200
    curves = []
    for w in (4, 16):
        for m in (1, 2):
            if w == 4 and m == 2:
                continue
            for tau in (2.0, 0.97):
                rid = f"w{w}m{m}t{tau}"
                runs.append(run_row(rid, "gaf", 0.4, width=w, tau=tau, m=m, best=0.3 + 0.01 * (tau < 2),
                                    final=0.25 + 0.02 * (tau < 2)))
                curves += curve_rows(rid, 0.9, 0.99 if m == 1 else 0.8, 1.0, 0.4 if tau < 2 else 1.0)
    write(tmp_path, "premise", runs, evals, curves)
    df = tables.premise_table(tmp_path, "tiny").set_index(["width", "m"])
    assert df.loc[(16, 1), "phase from"] == 100 and df.loc[(4, 1), "phase from"] == 200
    assert df.loc[(16, 1), "averaging distance"] == pytest.approx(0.99)
    assert df.loc[(16, 2), "averaging distance"] == pytest.approx(0.8)
    assert df.loc[(16, 1), "GAF steps taken"] == pytest.approx(0.4)
    assert df.loc[(16, 1), "GAF - baseline, final"] == pytest.approx(100 * (0.27 - 0.25))  # fig6 seed 0: 0.33 - 0.08
    assert df.loc[(4, 1), "GAF - baseline, best"] == pytest.approx(100 * (0.31 - 0.30))
    assert df.loc[(16, 1), "GAF - averaging, final"] == pytest.approx(2.0)
    fig = figures.premise(tmp_path, "tiny")
    assert fig is not None and len(fig.axes) == 4
    md, csv = tables.write_premise(tables.premise_table(tmp_path, "tiny"), tmp_path)
    assert "| phase from |" in md.read_text().replace("| width | m | phase from |", "| phase from |")
    assert len(pd.read_csv(csv)) == 3


def test_premise_table_measures_the_second_half_where_the_baseline_never_memorises(tmp_path):
    fig6_results(tmp_path)
    runs = [run_row("b4", "baseline", 0.4, best=0.30, final=0.30, width=4, iterations=400)]
    evals = eval_rows("b4", [0.25, 0.28, 0.29, 0.30], [0.1] * 4)  # still rising at its last evaluation
    runs += [run_row("avg", "gaf", 0.4, width=4, tau=2.0, iterations=400)]
    curves = [{"run_id": "avg", "iter": i, "d_mean": 0.9, "d_mean_win": 0.9 if i <= 200 else 0.95, "stride": 1,
               "acc": 0.5, "loss": 1.0, "stepped_win": 1.0} for i in range(1, 401)]
    write(tmp_path, "premise", runs, evals, curves)
    row = tables.premise_table(tmp_path, "tiny").set_index(["width", "m"]).loc[(4, 1)]
    assert row["baseline memorises"] == "no" and np.isnan(row["phase from"])
    assert row["averaging distance"] == pytest.approx(0.95)  # iterations 201..400
