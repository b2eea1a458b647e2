"""Synthetic run directories -> scripts/collect.py -> scripts/plot.py -> notebooks/figures.ipynb.

No training: tests/synthetic_runs.py writes run directories that follow docs/rundir.md. The
command lines are run as scripts; the rest is gaf.report's.
"""

import csv
import datetime as dt
import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import synthetic_runs as synth
from gaf import rundir
from gaf.report import collect, data, figures, plot, tables
from gaf.report.regenerate import is_current, regenerate

ROOT = Path(__file__).resolve().parents[1]


def command_line(name):
    """scripts/<name>.py as a module (scripts/ is no package): the command line ``make figures`` runs."""
    spec = importlib.util.spec_from_file_location(f"{name}_command_line", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


collect_command, plot_command = command_line("collect"), command_line("plot")

RUN_COLUMNS = ["run_id", "experiment", "scale", "data.name", "data.noise", "model.name", "method.name", "method.tau",
               "method.n_micro", "method.per_class", "method.merge", "method.batch_size", "seed", "optim.lr",
               "status", "final_val_acc", "best_val_acc", "iterations", "images_seen", "steps_taken", "wall_time_s",
               "images_per_s", "device", "device_name", "data_note"]
CURVE_COLUMNS = ["run_id", "iter", "loss", "acc", "d_mean", "accepted", "stepped", "lr", "d_mean_win", "stride"]
EVAL_COLUMNS = ["run_id", "iter", "train_acc", "val_acc", "val_loss", "mem_flipped_noisy_acc"]
ITERS, VAL_EVERY = 60, 20


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Every experiment's synthetic sweep, collected and plotted once for the whole module."""
    tmp = tmp_path_factory.mktemp("pipeline")
    written = synth.write_all(tmp / "multirun", iterations=ITERS, val_every=VAL_EVERY)
    results = tmp / "results"
    collected = collect_command.main(["--runs", str(tmp / "multirun"), "--results", str(results)])
    made = plot_command.main(["--results", str(results)])
    return dict(tmp=tmp, written=written, results=results, collected=collected, made=made)


def test_collect_writes_every_csv_with_expected_columns_and_rows(pipeline):
    results, written = pipeline["results"], pipeline["written"]
    assert sorted(pipeline["collected"]) == sorted(synth.SWEEPS)
    for exp, dirs in written.items():
        runs = pd.read_csv(results / exp / "runs.csv")
        assert len(runs) == len(dirs) == len(synth.SWEEPS[exp])
        assert set(RUN_COLUMNS) <= set(runs.columns), set(RUN_COLUMNS) - set(runs.columns)
        assert (runs["experiment"] == exp).all() and (runs["scale"] == "tiny").all()
        assert runs["run_id"].is_unique and runs["run_id"].str.startswith("multirun/").all()
        curves = pd.read_csv(results / exp / "curves.csv")
        assert set(CURVE_COLUMNS) <= set(curves.columns)
        assert len(curves) == ITERS * len(dirs)  # short runs are not downsampled
        evals = pd.read_csv(results / exp / "evals.csv")
        assert set(EVAL_COLUMNS) <= set(evals.columns)
        assert len(evals) == (ITERS // VAL_EVERY) * len(dirs)
        prov = json.loads((results / exp / "provenance.json").read_text())
        assert prov["n_runs"] == len(dirs) and prov["n_unfinished"] == 0 and prov["scales"] == ["tiny"]
        assert prov["command"].startswith("python scripts/collect.py") and prov["collected_at"]
        assert prov["data_notes"] == [synth.DATA_NOTE]
    # the swept keys really are the run's config: the fig7 taus, the fig8 microbatch sizes
    fig7 = pd.read_csv(results / "fig7" / "runs.csv")
    assert sorted(fig7["method.tau"].dropna()) == [0.95, 0.97, 0.99, 1.0, 1.05, 2.0]
    fig8 = pd.read_csv(results / "fig8" / "runs.csv")
    assert sorted(fig8.loc[fig8["method.name"] == "gaf", "method.per_class"]) == [1, 2, 4]
    # plain fig6 baselines wrote no distances: d_mean is empty, not made up
    fig6 = pd.read_csv(results / "fig6" / "curves.csv").merge(pd.read_csv(results / "fig6" / "runs.csv"), on="run_id")
    assert fig6.loc[fig6["method.name"] == "baseline", "d_mean"].isna().all()
    assert fig6.loc[fig6["method.name"] == "gaf", "d_mean"].notna().all()


def test_collect_is_idempotent(pipeline, tmp_path):
    """Collecting unchanged runs again, by another command, changes no file: not even when
    and how they were collected (so `make figures` after `make reproduce` leaves git clean)."""
    results = pipeline["results"]
    collected = ("runs.csv", "curves.csv", "evals.csv", "provenance.json")  # (plot also writes premise/premise.csv)
    before = {p.relative_to(results): p.read_bytes() for p in results.glob("*/*") if p.name in collected}
    collect.collect([pipeline["tmp"] / "multirun"], results, command="another command")
    after = {p.relative_to(results): p.read_bytes() for p in results.glob("*/*") if p.name in collected}
    assert before == after and len(before) == 4 * len(synth.SWEEPS)


def test_long_runs_are_downsampled_with_honest_window_means(tmp_path):
    cfg = synth.run_config("fig1", method="baseline", iterations=5001, val_every=1000)
    synth.write_run(tmp_path / "runs" / "a", cfg)
    collect.collect([tmp_path / "runs"], tmp_path / "results", max_curve_rows=2000)
    curves = pd.read_csv(tmp_path / "results" / "fig1" / "curves.csv")
    raw = pd.read_csv(tmp_path / "runs" / "a" / "metrics.csv")
    assert len(curves) <= 2000 and curves["iter"].iloc[-1] == 5001  # the last iteration is kept
    assert curves["stride"].sum() == len(raw) == 5001
    # stride-weighted window means reproduce the mean over every iteration
    weighted = (curves["d_mean_win"] * curves["stride"]).sum() / curves["stride"].sum()
    assert weighted == pytest.approx(raw["d_mean"].mean(), rel=1e-6)
    # the sampled rows are real rows (every k-th), not averages
    sampled = raw.set_index("iter").loc[curves["iter"], "d_mean"].to_numpy()
    assert sampled == pytest.approx(curves["d_mean"].to_numpy(), rel=1e-5)


def test_duplicate_sweep_point_keeps_the_newest_finished_run(tmp_path):
    runs_root = tmp_path / "multirun"
    first = synth.write_experiment(runs_root, "fig6", started_at=dt.datetime(2025, 1, 1, 12))
    cfg = json.loads((first[3] / "config.json").read_text())
    # a finished rerun of point 3, a day later, and a newer rerun of point 5 that never finished
    rerun = synth.write_run(runs_root / "2025-01-02" / "09-00-00" / "0", cfg, started_at=dt.datetime(2025, 1, 2, 9),
                            val_acc_shift=0.05)
    cfg5 = json.loads((first[5] / "config.json").read_text())
    synth.write_run(runs_root / "2025-01-03" / "09-00-00" / "0", cfg5, started_at=dt.datetime(2025, 1, 3, 9),
                    status="running")
    # a run that is still going, for a point with no finished run: collected with its status
    cfg_new = synth.run_config("fig6", method="gaf", noise=0.8)
    synth.write_run(runs_root / "2025-01-03" / "10-00-00" / "0", cfg_new, status="running")
    out = collect.collect([runs_root], tmp_path / "results")
    runs = out["fig6"]
    assert len(runs) == len(synth.SWEEPS["fig6"]) + 1
    ids = set(runs["run_id"])
    assert "multirun/2025-01-02/09-00-00/0" in ids and f"multirun/{first[3].relative_to(runs_root)}" not in ids
    assert f"multirun/{first[5].relative_to(runs_root)}" in ids  # finished beats a newer unfinished rerun
    kept = runs.set_index("run_id").loc["multirun/2025-01-02/09-00-00/0"]
    assert kept["best_val_acc"] == pytest.approx(json.loads((rerun / "summary.json").read_text())["best_val_acc"])
    # its summary says "running" but no live process holds its lock: the run was killed
    assert runs.set_index("run_id").loc["multirun/2025-01-03/10-00-00/0", "status"] == "interrupted"
    prov = json.loads((tmp_path / "results" / "fig6" / "provenance.json").read_text())
    assert prov["n_unfinished"] == 1 and prov["unfinished_runs"] == ["multirun/2025-01-03/10-00-00/0"]
    assert sorted(d["dropped"] for d in prov["duplicates_dropped"]) == sorted(
        [f"multirun/{first[3].relative_to(runs_root)}", "multirun/2025-01-03/09-00-00/0"])
    curves = pd.read_csv(tmp_path / "results" / "fig6" / "curves.csv")
    assert set(curves["run_id"]) == ids  # dropped duplicates leave no curves behind
    # plots use finished runs only: the running run adds no point at 80% noise
    assert 80 not in set(data.noise_pct(data.load(tmp_path / "results", "fig6").runs))


def test_results_are_collected_per_scale_and_custom_runs_only_when_asked(tmp_path):
    """A run of another scale adds its own rows and never replaces another scale's; a custom-scale
    run (settings that match no scale, e.g. train.iterations=4) is a try-out, left out by default."""
    results = tmp_path / "results"
    synth.write_experiment(tmp_path / "tiny_runs", "fig6", scale="tiny")
    collect.collect([tmp_path / "tiny_runs"], results)
    committed = {name: (results / "fig6" / name).read_bytes() for name in ("runs.csv", "curves.csv", "evals.csv")}
    custom = synth.run_config("fig6", scale="custom", method="gaf", noise=0.4, iterations=4)
    synth.write_run(tmp_path / "outputs" / "fig6" / "custom" / "train.iterations=4", custom)
    assert collect.collect([tmp_path / "outputs"], results) == {}
    assert {name: (results / "fig6" / name).read_bytes() for name in committed} == committed
    synth.write_experiment(tmp_path / "small_runs", "fig6", scale="small")
    runs = collect.collect([tmp_path / "small_runs"], results)["fig6"]
    assert runs["scale"].value_counts().to_dict() == {"tiny": len(synth.SWEEPS["fig6"]),
                                                      "small": len(synth.SWEEPS["fig6"])}
    # collecting the tiny runs again leaves the small ones, and gives back the tiny-only files' rows
    collect.collect([tmp_path / "tiny_runs"], results)
    again = pd.read_csv(results / "fig6" / "runs.csv")
    assert sorted(again["scale"].unique()) == ["small", "tiny"]
    curves = pd.read_csv(results / "fig6" / "curves.csv")
    assert set(curves["run_id"]) == set(again["run_id"])
    tiny_only = pd.read_csv(io.BytesIO(committed["curves.csv"]))
    mine = curves[curves["run_id"].isin(tiny_only["run_id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine[tiny_only.columns], tiny_only)
    assert data.load(results, "fig6", "tiny").runs["scale"].eq("tiny").all()
    ad_hoc = collect.collect([tmp_path / "outputs"], results, ad_hoc=True)["fig6"]
    assert "custom" in set(ad_hoc["scale"]) and {"tiny", "small"} <= set(ad_hoc["scale"])


def test_plot_writes_every_figure_and_table(pipeline):
    results, made = pipeline["results"], pipeline["made"]
    for name in figures.FIGURES:
        for ext in ("png", "pdf"):
            path = results / name / f"{name}.{ext}"
            assert path.is_file() and path.stat().st_size > 0, path  # what each draws: the tests below
    for name in ("table1.md", "table1.csv", "paper_vs_repro.md"):
        assert (results / name).is_file(), name
    table = pd.read_csv(results / "table1.csv")
    # CIFAR-100N's human labels cannot apply to the substituted CIFAR-10 images: the row says so
    assert list(table["label noise (%)"]) == ["0", "40", "symmetric 40.2"]
    assert list(table["dataset"]) == ["CIFAR-10 (JPEG copy) standing in for CIFAR-100"] * 2 + [
        "CIFAR-10 (JPEG copy) with symmetric 40.2% noise, standing in for CIFAR-100N-Fine"]
    assert (table["difference (points)"] - (table["GAF (%)"] - table["baseline (%)"])).abs().max() < 0.02
    text = (results / "paper_vs_repro.md").read_text()
    assert "not expected to match the paper" in text and "tiny" in text and synth.DATA_NOTE in text
    assert "No 'repro - paper' differences: these runs trained tiny CNN on CIFAR-10 (JPEG copy)" in text
    assert table1_text_has_its_caveat(results)
    comparison = made["paper_vs_repro"]
    assert not any(c.startswith("repro - paper") for c in comparison.columns)
    assert len(comparison) == 11  # every noise level of the paper's figure 6
    assert comparison["repro GAF"].notna().sum() == 4 and comparison["repro baseline"].notna().sum() == 4
    row = comparison.set_index("label noise (%)").loc[60]
    assert row["paper GAF"] == 39 and row["paper baseline"] == 20
    fig6 = pd.read_csv(results / "fig6" / "runs.csv")
    best = 100 * fig6[(fig6["data.noise"] == 0.6) & (fig6["method.name"] == "gaf")]["best_val_acc"].iloc[0]
    assert row["repro GAF"] == pytest.approx(best)


def test_titles_name_the_scale_and_the_data_substitution(pipeline):
    made = pipeline["made"]
    for name in figures.FIGURES:
        title = " ".join(made[name].get_suptitle().split())  # titles are wrapped to the figure's width
        if name == "fig2":  # the schematic draws no runs
            assert "scale" not in title and "D(g_1, g_2)" in title
        else:
            assert "tiny scale" in title and "substituted the CIFAR-10 JPEG copy" in title, (name, title)
    assert "out of reach" in made["fig3"].get_suptitle()
    # the schematic's distances are computed from the vectors it draws
    assert [a.get_title() for a in made["fig2"].axes] == ["aligned: D = 0.04", "orthogonal: D = 1.00",
                                                          "opposed: D = 1.99"]
    # the paper's figure-6 values are drawn, labelled as the paper's
    labels = made["fig6"].axes[0].get_legend_handles_labels()[1]
    assert "GAF (paper)" in labels and "baseline (paper)" in labels


def table1_text_has_its_caveat(results):
    """The notebook shows table1_markdown, the same text as table1.md: caveat included."""
    head = tables.table1_markdown(tables.table1(results)).split("Sources")[0]
    return "[tiny scale" in head and (results / "table1.md").read_text().startswith(head)


def test_titles_name_what_ran_first(pipeline):
    made = pipeline["made"]
    for name in ("fig3", "fig4", "fig6", "fig7", "fig8", "fig9"):
        title = " ".join(made[name].get_suptitle().split()).split("[")[0]  # before the scale/data note
        assert "CIFAR-10 (JPEG copy)" in title, (name, title)
        assert title.index("CIFAR-10 (JPEG copy)") < title.replace("ResNet18 on CIFAR-100,", "").find("CIFAR-100")
    fig1 = made["fig1"]
    assert [" ".join(a.get_title().split()) for a in fig1.axes[:2]] == [
        "CIFAR-10 (JPEG copy) standing in for CIFAR-100",
        "CIFAR-10 (JPEG copy) with symmetric 40.2% noise, standing in for CIFAR-100N-Fine"]
    assert "train: noisy labels, augmented batches" in fig1.axes[0].get_legend_handles_labels()[1]


def write_fig4_as_published(root):
    """Figure 4 as the preset runs it: plain averaging (GAF at tau 2) over m, batch_size left at 128."""
    for m in (1, 10, 2, 4):
        cfg = synth.run_config("fig4", tau=2.0, merge="mean", per_class=m)
        cfg["method"]["batch_size"] = 128  # the config default, recorded though unused
        synth.write_run(root / f"method.per_class={m}", cfg)


def test_fig4_labels_runs_by_m_in_numeric_order(tmp_path):
    write_fig4_as_published(tmp_path / "multirun")
    collect.collect([tmp_path / "multirun"], tmp_path / "results")
    fig = figures.fig4(tmp_path / "results")
    assert fig.axes[0].get_legend_handles_labels()[1] == ["m = 1", "m = 2", "m = 4", "m = 10"]
    assert "plain averaging (tau = 2), by microbatch size m" in " ".join(fig.get_suptitle().split())


def errorbar_has_yerr(fig):
    return [c.has_yerr for c in fig.axes[0].containers]


def test_error_bars_only_with_two_seeds_or_more(tmp_path):
    synth.write_experiment(tmp_path / "one", "fig6")
    synth.write_experiment(tmp_path / "two", "fig6", seeds=(0, 1))
    for name in ("one", "two"):
        collect.collect([tmp_path / name], tmp_path / f"results-{name}")
    assert errorbar_has_yerr(figures.fig6(tmp_path / "results-one")) == [False, False]
    assert errorbar_has_yerr(figures.fig6(tmp_path / "results-two")) == [True, True]


def test_paper_vs_repro_differences_only_for_the_papers_data_and_model(tmp_path):
    synth.write_experiment(tmp_path / "multirun", "fig6", scale="paper", model="resnet18")
    for run_dir in (tmp_path / "multirun").rglob("summary.json"):  # CIFAR-100 itself, no substitution
        summary = json.loads(run_dir.read_text())
        run_dir.write_text(json.dumps({**summary, "data_note": "CIFAR-100 (torchvision)", "data_used": "cifar100"}))
    collect.collect([tmp_path / "multirun"], tmp_path / "results")
    df = tables.paper_vs_repro(tmp_path / "results")
    assert df.attrs["comparable"] and df["repro - paper, GAF"].notna().sum() == 4


def committed_results(tmp_path, name="copy"):
    """A copy of the committed results/ to redraw into (skip where this checkout has none)."""
    committed = ROOT / "results"
    if not (committed / "fig6" / "runs.csv").is_file():
        pytest.skip("no committed results in this checkout")
    shutil.copytree(committed, tmp_path / name)
    return tmp_path / name


def test_committed_results_regenerate_portably(tmp_path):
    """Redrawing every figure from the committed CSVs (on any machine, whatever its fonts) gives the
    committed tables and CSVs byte for byte, and each figure's sidecar: the same code, the same inputs
    and the same drawn content (every line's data and every text)."""
    copy = committed_results(tmp_path)
    regenerate(copy, force=True)
    portable = [p for p in sorted(copy.rglob("*")) if p.is_file() and p.suffix not in (".png", ".pdf")]
    changed = [p.relative_to(copy).as_posix() for p in portable
               if p.read_bytes() != (ROOT / "results" / p.relative_to(copy)).read_bytes()]
    assert changed == [], f"regeneration changed {changed}: run `make figures` and commit the result"
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*.inputs.json")) == \
        sorted(f"{name}/{name}.inputs.json" for name in figures.FIGURES if (ROOT / "results" / name).is_dir())


def test_committed_figures_are_current_so_make_figures_keeps_them(tmp_path):
    """Every committed figure was drawn by this gaf.report from the committed inputs, so `make figures`
    on an unchanged checkout rewrites nothing (a figure's bytes differ between machines' renderers)."""
    copy = committed_results(tmp_path)
    stale = [name for name in figures.FIGURES
             if (ROOT / "results" / name).is_dir() and not is_current(copy / name / name, copy, None)]
    assert stale == [], f"{stale} are stale: run `make figures` and commit the result"
    (copy / "fig6" / "fig6.png").write_bytes(b"left alone")
    made = regenerate(copy)
    assert not set(made) & set(figures.FIGURES)  # only the tables were written
    assert (copy / "fig6" / "fig6.png").read_bytes() == b"left alone"


def test_changed_inputs_redraw_exactly_the_figures_that_read_them(tmp_path):
    copy = committed_results(tmp_path)
    runs = pd.read_csv(copy / "fig6" / "runs.csv")
    runs.loc[0, "best_val_acc"] = 0.99
    runs.to_csv(copy / "fig6" / "runs.csv", index=False)
    made = regenerate(copy)
    redrawn = sorted(set(made) & set(figures.FIGURES))
    assert redrawn == ["fig6", "premise"]  # the premise figure reads figure 6's baselines
    assert is_current(copy / "fig6" / "fig6", copy, None)
    side = json.loads((copy / "fig6" / "fig6.inputs.json").read_text())
    assert side["inputs"]["fig6/runs.csv"] == data.sha256((copy / "fig6" / "runs.csv").read_bytes())
    assert side["drawn"] != json.loads((ROOT / "results/fig6/fig6.inputs.json").read_text())["drawn"]
    assert regenerate(copy, "tiny", ["fig1"])  # another scale: redrawn


def test_two_redraws_on_one_machine_are_byte_identical(tmp_path):
    copies = [committed_results(tmp_path, f"copy{k}") for k in (1, 2)]
    for copy in copies:
        regenerate(copy, force=True)
    drawn = sorted(p.relative_to(copies[0]) for p in copies[0].rglob("*")
                   if p.suffix in (".png", ".pdf") and p.parts[-2] in figures.FIGURES)  # not gpu-small*/'s, measured
    assert len(drawn) == 2 * len(figures.FIGURES)
    assert [p.as_posix() for p in drawn if (copies[0] / p).read_bytes() != (copies[1] / p).read_bytes()] == []


def test_figures_use_matplotlibs_own_font_files_only():
    """System copies of the same fonts (another version, found first on some machines) never draw."""
    own = Path(plot.matplotlib.get_data_path(), "fonts", "ttf").resolve()
    import matplotlib.font_manager as fm
    for style in ("normal", "italic"):
        assert Path(fm.findfont(fm.FontProperties(family="DejaVu Sans", style=style))).resolve().parent == own
    assert plot.matplotlib.rcParams["mathtext.fontset"] == "dejavusans"


def test_paper_scale_titles_carry_no_scale_tag(tmp_path):
    synth.write_experiment(tmp_path / "multirun", "fig6", scale="paper", model="resnet18")
    collect.collect([tmp_path / "multirun"], tmp_path / "results")
    runs = pd.read_csv(tmp_path / "results" / "fig6" / "runs.csv")
    assert "paper scale" not in data.title_suffix(runs) and synth.DATA_NOTE in data.title_suffix(runs)
    runs["data_note"] = ""
    assert data.title_suffix(runs) == ""
    runs.loc[0, "scale"] = "small"  # a mix names both scales
    assert data.title_suffix(runs) == "[small/paper scale: ResNet18]"


def test_plot_survives_runs_without_rows_or_distances(tmp_path):
    """Finished runs whose metrics/eval files are missing or empty: figures still draw (with empty lines)."""
    written = synth.write_all(tmp_path / "multirun", experiments=("fig1", "fig3", "fig5", "fig6"))
    for k, run_dir in enumerate(d for dirs in written.values() for d in dirs):
        (run_dir / "metrics.csv").unlink() if k % 2 else (run_dir / "metrics.csv").write_text("")
        (run_dir / "eval.csv").unlink() if k % 3 else None
    collect.collect([tmp_path / "multirun"], tmp_path / "results")
    made = regenerate(tmp_path / "results", only=["fig1", "fig3", "fig5", "fig6"])
    assert sorted(made) == ["fig1", "fig3", "fig5", "fig6"]


def test_max_curve_rows_below_one_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        collect_command.main(["--runs", str(tmp_path), "--max-curve-rows", "0"])
    assert "--max-curve-rows must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_curve_rows must be an integer >= 1"):
        collect.collect([tmp_path], tmp_path / "results", max_curve_rows=0)


def test_plot_on_empty_results_does_not_crash(tmp_path, capsys):
    (tmp_path / "results").mkdir()  # empty (a folder that is not there is an error)
    made = regenerate(tmp_path / "results")
    assert list(made) == ["fig2"]  # the schematic needs no runs
    out = capsys.readouterr().out
    assert "fig6: no finished runs" in out and "table1: no finished runs" in out
    assert not (tmp_path / "results" / "table1.md").exists()
    assert collect.collect([tmp_path / "nothing"], tmp_path / "results") == {}
    # an experiment whose runs are all still running: collected, but nothing to plot yet
    cfg = synth.run_config("fig6", method="gaf", noise=0.4)
    synth.write_run(tmp_path / "multirun" / "a", cfg, status="running")
    assert len(collect.collect([tmp_path / "multirun"], tmp_path / "results")["fig6"]) == 1
    assert "fig6" not in regenerate(tmp_path / "results")


def test_notebook_executes_headless_on_synthetic_results(pipeline, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # A kernelspec that runs THIS interpreter (the venv's ipykernel), first on JUPYTER_PATH, in a temp HOME:
    # no dependence on what the machine has installed elsewhere.
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test venv)", "language": "python"}))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("RESULTS_DIR", str(pipeline["results"]))
    nb = nbformat.read(ROOT / "notebooks" / "figures.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "store the notebook without outputs"
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(figures.FIGURES)  # every figure drawn
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    # the table with its caveat (the synthetic runs substituted CIFAR-10 for CIFAR-100)
    assert any("symmetric 40.2" in m and "[tiny scale" in m for m in markdown)
    assert any("paper GAF" in m for m in markdown)
    assert any(str(pipeline["results"]) in o.get("text", "") for o in outputs if o.output_type == "stream")


def test_an_experiments_files_do_not_depend_on_what_is_collected_beside_it(tmp_path):
    """The premise's widths are all set; figure 6's runs have none (null): collected together or
    alone, the premise's runs.csv is the same bytes (a width is a float either way)."""
    synth.write_experiment(tmp_path / "alone" / "multirun", "premise")
    synth.write_experiment(tmp_path / "both" / "multirun", "premise")
    synth.write_experiment(tmp_path / "both" / "multirun", "fig6", started_at=dt.datetime(2025, 1, 2))
    for name in ("alone", "both"):
        collect.collect([tmp_path / name / "multirun"], tmp_path / name / "results")
    alone, both = ((tmp_path / name / "results" / "premise" / "runs.csv").read_text() for name in ("alone", "both"))
    assert alone == both and pd.read_csv(io.StringIO(alone))["model.width"].dtype == float


def test_ad_hoc_runs_are_collected_only_when_asked(tmp_path):
    synth.write_experiment(tmp_path / "multirun", "fig9")
    synth.write_run(tmp_path / "outputs" / "single" / "custom" / "seed=1",
                    synth.run_config("single", scale="custom", noise=0.4))
    collected = collect.collect([tmp_path / "multirun", tmp_path / "outputs"], tmp_path / "results")
    assert sorted(collected) == ["fig9"] and not (tmp_path / "results" / "single").exists()
    collected = collect_command.main(["--runs", str(tmp_path / "multirun"), str(tmp_path / "outputs"),
                              "--results", str(tmp_path / "results"), "--ad-hoc"])
    assert sorted(collected) == ["fig9", "single"] and list(collected["single"]["scale"]) == ["custom"]


# --------------------------------------------------------------------------- the data behind every curve
# Expected values come from the run directories themselves (config.json, eval.csv,
# metrics.csv), not from what collect.py wrote: the whole chain run dir -> collect ->
# plot is checked, curve by curve.


def written_runs(pipeline, experiment):
    """The synthetic runs of one experiment as the trainer would have left them."""
    out = []
    for d in pipeline["written"][experiment]:
        cfg = json.loads((d / "config.json").read_text())
        evals, metrics = pd.read_csv(d / "eval.csv"), pd.read_csv(d / "metrics.csv")
        out.append(SimpleNamespace(cfg=cfg, evals=evals, metrics=metrics, best=100 * evals["val_acc"].max()))
    return out


def setting(run, key):
    section, name = key.split(".")
    return run.cfg[section][name]


def only(runs, **where):
    """The one run whose config matches ``where`` (keys like method__tau)."""
    found = [r for r in runs if all(setting(r, k.replace("__", ".")) == v for k, v in where.items())]
    assert len(found) == 1, (where, len(found))
    return found[0]


def lines(ax, label=None):
    return [ln for ln in ax.get_lines() if label is None or ln.get_label() == label]


def line(ax, label):
    found = lines(ax, label)
    assert len(found) == 1, (label, [ln.get_label() for ln in ax.get_lines()])
    return found[0]


def errorbars(ax):
    """{label: (x, y)} of every errorbar series drawn on ``ax``."""
    return {c.get_label(): tuple(np.asarray(a, dtype=float) for a in c.lines[0].get_data()) for c in ax.containers}


def assert_curve(ln, x, y):
    np.testing.assert_allclose(np.asarray(ln.get_xdata(), dtype=float), np.asarray(x, dtype=float))
    np.testing.assert_allclose(np.asarray(ln.get_ydata(), dtype=float), np.asarray(y, dtype=float), rtol=1e-5)


def rolling(metrics, frac):
    """The rolling mean of the distance over ``frac`` of the run (every row present: stride 1)."""
    return metrics["d_mean"].rolling(max(1, round(frac * metrics["iter"].max())), min_periods=1).mean()


def test_fig1_draws_each_datasets_accuracies_and_distances(pipeline):
    fig, runs = pipeline["made"]["fig1"], written_runs(pipeline, "fig1")
    ax = np.asarray(fig.axes).reshape(2, -1)
    for j, name in enumerate(("cifar100", "cifar100n")):  # CIFAR-100 first
        r = only(runs, data__name=name)
        assert_curve(line(ax[0, j], "train: noisy labels, augmented batches"), r.evals["iter"], 100 * r.evals["train_acc"])
        assert_curve(line(ax[0, j], "validation"), r.evals["iter"], 100 * r.evals["val_acc"])
        raw = [ln for ln in lines(ax[1, j]) if ln.get_label().startswith("_child") and len(ln.get_xdata()) > 2]
        assert len(raw) == 1
        assert_curve(raw[0], r.metrics["iter"], r.metrics["d_mean"])
        assert_curve(line(ax[1, j], "rolling average"), r.metrics["iter"], rolling(r.metrics, 0.05))


def test_fig3_draws_only_the_baseline_late_in_training(pipeline):
    """The sweep holds plain averaging (tau = 2, mean merge: the baseline as the preset runs
    it) and a GAF run; only the first is drawn."""
    fig, runs = pipeline["made"]["fig3"], written_runs(pipeline, "fig3")
    base = only(runs, method__tau=2.0)
    late = base.metrics[base.metrics["iter"] >= 0.75 * base.metrics["iter"].max()]
    curves, hist = fig.axes[0], fig.axes[1]
    assert_curve(line(curves, "rolling average (seed 0)"), late["iter"], rolling(base.metrics, 0.02)[late.index])
    assert len([ln for ln in lines(curves) if len(ln.get_xdata()) > 2]) == 2  # raw + rolling of one run
    assert sum(p.get_height() for p in hist.patches) == len(late)
    assert hist.patches[0].get_x() == pytest.approx(late["d_mean"].min(), rel=1e-5)


def test_fig4_draws_one_rolling_distance_per_baseline_microbatch_size(pipeline):
    fig, runs = pipeline["made"]["fig4"], written_runs(pipeline, "fig4")
    ax = fig.axes[0]
    drawn = {ln.get_label(): ln for ln in lines(ax) if not ln.get_label().startswith("_")}
    assert sorted(drawn) == ["m = 1", "m = 2", "m = 4"]  # the GAF run (tau 0.97) is not drawn
    for m in (1, 2, 4):
        r = only(runs, method__per_class=m, method__tau=2.0)
        assert_curve(drawn[f"m = {m}"], r.metrics["iter"], rolling(r.metrics, 0.05))


def test_fig5_tells_plain_averaging_from_gaf(pipeline):
    fig, runs = pipeline["made"]["fig5"], written_runs(pipeline, "fig5")
    acc, dist = fig.axes[0], fig.axes[1]
    for role, tau in (("baseline", 2.0), ("GAF", 0.97)):
        r = only(runs, method__tau=tau)
        assert r.cfg["method"]["name"] == "gaf" and r.cfg["method"]["merge"] == "mean"
        assert_curve(line(acc, f"{role} train"), r.evals["iter"], 100 * r.evals["train_acc"])
        assert_curve(line(acc, f"{role} validation"), r.evals["iter"], 100 * r.evals["val_acc"])
        stepped = r.metrics["stepped"].astype(str).eq("True").mean()
        assert_curve(line(dist, f"{role}, stepped {stepped:.0%} of iterations"), r.metrics["iter"],
                     rolling(r.metrics, 0.05))
    assert line(acc, "baseline train").get_color() == plot.COLOR["baseline"]


def test_fig6_draws_each_runs_best_validation_accuracy_against_noise(pipeline):
    fig, runs = pipeline["made"]["fig6"], written_runs(pipeline, "fig6")
    # not vacuous: noisy baselines peak before their end, so a final accuracy would show
    assert any(r.best > 100 * r.evals["val_acc"].iloc[-1] for r in runs if setting(r, "method.name") == "baseline")
    series = errorbars(fig.axes[0])
    for method, label in (("gaf", "GAF"), ("baseline", "baseline")):
        mine = sorted((100 * setting(r, "data.noise"), r.best) for r in runs if setting(r, "method.name") == method)
        x, y = series[f"{label} (this reproduction)"]
        np.testing.assert_allclose(x, [p for p, _ in mine])
        np.testing.assert_allclose(y, [b for _, b in mine], rtol=1e-6)
    paper = pd.read_csv(data.PAPER_FIG6, comment="#")
    assert_curve(line(fig.axes[0], "GAF (paper)"), paper["label_noise_pct"], paper["gaf_val_acc_pct"])
    assert_curve(line(fig.axes[0], "baseline (paper)"), paper["label_noise_pct"], paper["baseline_val_acc_pct"])


@pytest.mark.parametrize("experiment, key", [("fig7", "method.tau"), ("fig9", "method.n_micro")])
def test_sweep_figures_draw_gaf_along_the_swept_key_and_the_baseline_level(pipeline, experiment, key):
    fig, runs = pipeline["made"][experiment], written_runs(pipeline, experiment)
    ax = fig.axes[0]
    gaf = sorted((setting(r, key), r.best) for r in runs if setting(r, "method.name") == "gaf")
    x, y = errorbars(ax)["GAF"]
    np.testing.assert_allclose(x, range(len(gaf)))  # evenly spaced, in order
    np.testing.assert_allclose(y, [b for _, b in gaf], rtol=1e-6)
    ticks = [t.get_text().split("\n")[0] for t in ax.get_xticklabels()]
    assert ticks == [f"{v:g}" for v, _ in gaf]
    base = only(runs, method__name="baseline")
    np.testing.assert_allclose(line(ax, "baseline").get_ydata(), [base.best, base.best], rtol=1e-6)


def test_fig8_draws_best_accuracy_against_images_per_step(pipeline):
    fig, runs = pipeline["made"]["fig8"], written_runs(pipeline, "fig8")
    series = errorbars(fig.axes[0])
    for method, label in (("gaf", "GAF"), ("baseline", "baseline")):
        # images per step from the run's own metrics: images seen at the last iteration / iterations
        mine = sorted((r.metrics["images_seen"].iloc[-1] / r.metrics["iter"].iloc[-1], r.best)
                      for r in runs if setting(r, "method.name") == method)
        x, y = series[label]
        np.testing.assert_allclose(x, [p for p, _ in mine])
        np.testing.assert_allclose(y, [b for _, b in mine], rtol=1e-6)
    assert sorted(series["GAF"][0]) == [200, 400, 800]  # n = 2 microbatches of m x 100 classes


def test_table1_holds_each_runs_best_validation_accuracy(pipeline):
    table = pd.read_csv(pipeline["results"] / "table1.csv")
    runs = written_runs(pipeline, "table1")
    for _, row in table.iterrows():
        where = dict(data__name="cifar100n") if "CIFAR-100N" in row["dataset"] else \
            dict(data__name="cifar100", data__noise=float(row["label noise (%)"]) / 100)
        for method, column in (("gaf", "GAF (%)"), ("baseline", "baseline (%)")):
            assert row[column] == pytest.approx(only(runs, method__name=method, **where).best, abs=0.005)


def as_the_trainer_writes(run_dirs, data_used):
    """Full configs (every setting, the baseline's tau at its default) and the data that ran."""
    for run_dir in run_dirs:
        cfg = json.loads((run_dir / "config.json").read_text())
        cfg = rundir.completed({**cfg, "method": {k: v for k, v in cfg["method"].items() if v is not None}})
        summary = json.loads((run_dir / "summary.json").read_text())
        (run_dir / "config.json").write_text(json.dumps(cfg))
        (run_dir / "summary.json").write_text(json.dumps({**summary, "config": cfg, "data_used": data_used}))


def runs_csv_cells(path):
    """runs.csv as the text of its cells (an empty cell is '')."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_settings_that_did_not_apply_are_empty_and_data_name_is_the_data_that_ran(tmp_path):
    as_the_trainer_writes(synth.write_experiment(tmp_path / "multirun", "fig6"), "cifar10_jpeg")
    collect.collect([tmp_path / "multirun"], tmp_path / "results")
    rows = runs_csv_cells(tmp_path / "results" / "fig6" / "runs.csv")
    base = [r for r in rows if r["method.name"] == "baseline"]
    gaf = [r for r in rows if r["method.name"] == "gaf"]
    assert base and gaf
    for r in base:
        assert [r[k] for k in ("method.tau", "method.n_micro", "method.per_class", "method.merge",
                               "method.replacement")] == ["", "", "", "", ""] and r["method.batch_size"] == "128"
    for r in gaf:
        assert (r["method.batch_size"], r["method.tau"], r["method.n_micro"], r["method.merge"]) == ("", "0.97", "2",
                                                                                                     "halving")
    assert {(r["data.name"], r["data_asked"], r["data_used"]) for r in rows} == {("cifar10_jpeg", "cifar100",
                                                                                  "cifar10_jpeg")}
    assert "method.adaptive_window" not in rows[0]  # applies to no run
    assert set(tables.table1(tmp_path / "results")["dataset"]) == {"CIFAR-10 (JPEG copy) standing in for CIFAR-100"}


def test_rows_collected_before_are_rewritten_as_collected_now(tmp_path):
    """Another scale's rows kept from a runs.csv written before: their settings without effect emptied, data.name
    the data that ran."""
    copy = committed_results(tmp_path)
    old = pd.read_csv(copy / "fig6" / "runs.csv")
    assert (old.loc[old["method.name"] == "baseline", "method.tau"] == 0.97).all()  # as written then
    as_the_trainer_writes(synth.write_experiment(tmp_path / "multirun", "fig6", scale="small"), "cifar100")
    collect.collect([tmp_path / "multirun"], copy)
    rows = [r for r in runs_csv_cells(copy / "fig6" / "runs.csv") if r["scale"] == "tiny"]
    assert len(rows) == len(old)
    assert {r["method.tau"] for r in rows if r["method.name"] == "baseline"} == {""}
    assert {r["method.batch_size"] for r in rows if r["method.name"] == "gaf"} == {""}
    assert {(r["data.name"], r["data_asked"]) for r in rows} == {("cifar10_jpeg", "cifar100")}


def test_provenance_names_run_roots_relative_to_the_repository_or_as_given(tmp_path, monkeypatch):
    synth.write_experiment(tmp_path / "multirun", "fig6")
    monkeypatch.setattr(collect, "REPO", tmp_path)  # the runs lie in the repository
    collect.collect([tmp_path / "multirun"], tmp_path / "results")
    assert json.loads((tmp_path / "results/fig6/provenance.json").read_text())["run_roots"] == ["multirun"]
    monkeypatch.setattr(collect, "REPO", ROOT)
    monkeypatch.chdir(tmp_path)
    collect.collect(["multirun"], "again")  # elsewhere: as the command gave them
    assert json.loads((tmp_path / "again/fig6/provenance.json").read_text())["run_roots"] == ["multirun"]
    committed = {p.parent.name: json.loads(p.read_text())["run_roots"] for p in (ROOT / "results").glob("*/provenance.json")}
    assert committed and not [name for name, roots in committed.items() if any(Path(r).is_absolute() for r in roots)]


@pytest.mark.parametrize("script, args", [(collect_command, ["--runs", "multirun", "nowhere"]),
                                          (plot_command, ["--results", "nowhere"])])
def test_a_folder_that_is_not_there_is_one_error(tmp_path, monkeypatch, capsys, script, args):
    (tmp_path / "multirun").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        script.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {args[0]} nowhere")
    assert not (tmp_path / "results").exists()


def test_a_folder_with_bad_files_is_skipped_in_one_line_and_the_rest_collected(tmp_path, capsys):
    good, binary, listed, torn = synth.write_experiment(tmp_path / "multirun", "fig7")[:4]
    (binary / "summary.json").write_bytes(b"\x80\x81\xff\x00")
    (listed / "config.json").write_text("[1, 2]")
    (torn / "metrics.csv").write_bytes(b"\x80\x81\xff\x00,\n\xfe")
    runs = collect.collect([tmp_path / "multirun"], tmp_path / "results")["fig7"]
    assert len(runs) == len(synth.SWEEPS["fig7"]) - 2 and runs["run_id"].str.endswith(("/0", "/3")).sum() == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"collect: skipping {binary}: unreadable summary.json (UnicodeDecodeError)",
                   f"collect: skipping {listed}: config.json holds a list, not a JSON object"]
