"""scripts/gpu_evidence.py: experiment=gpu_small's points as exported, the committed runs it
continues from, the planner against recorded GPU calls, its tables, and the dry run end to end on
a CPU with ResNet18 (no Hydra)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_evidence as ge  # noqa: E402
import tables  # noqa: E402
from cifar_fixtures import write_jpeg_tar  # noqa: E402
from gaf.config import RunConfig, validate  # noqa: E402

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
OUTPUTS = {"runs.csv", "curves.csv", "evals.csv", "provenance.json", "preflight.md"}


def no_hydra_env(tmp_path) -> dict:
    """An environment whose Python cannot import hydra or omegaconf (as on the lent GPU), for
    every process it starts too: a sitecustomize on PYTHONPATH."""
    shim = tmp_path / "no_hydra"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['hydra'] = None\nsys.modules['omegaconf'] = None\n")
    path = os.pathsep.join([str(shim), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- the grid


def test_the_exported_points_are_what_the_preset_composes_now(tmp_path):
    """configs/experiment/gpu_small.points.json is reproduce.py's export of experiment=gpu_small at
    scale=gpu, byte for byte (its own command regenerates it)."""
    exported = tmp_path / "points.json"
    command = json.loads(ge.POINTS.read_text())["command"].split()
    assert command[:2] == ["python", "scripts/reproduce.py"]
    args = [a if a != "configs/experiment/gpu_small.points.json" else str(exported) for a in command[2:]]
    got = subprocess.run([sys.executable, "scripts/reproduce.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert got.returncode == 0, got.stderr[-2000:]
    fresh = exported.read_text().replace(str(exported), "configs/experiment/gpu_small.points.json")
    assert fresh == ge.POINTS.read_text(), "regenerate: " + " ".join(command)


def test_the_grid_answers_40_percent_in_both_regimes_first_then_80_0_20_60_then_more_seeds():
    points = ge.grid(3)
    assert len(points) == len({p.folder for p in points}) == 2 * 5 * 3 * 3
    key = [(p.config["seed"], p.config["data"]["noise"], p.config["optim"]["schedule"]) for p in points[::3]]
    assert key[:10] == [(0, n, s) for n in (0.4, 0.8, 0.0, 0.2, 0.6) for s in ("cosine", "plateau")]
    assert [k[0] for k in key] == sorted(k[0] for k in key)  # seed 0's whole grid before seed 1
    arms = [(p.config["method"]["name"], p.config["method"]["tau"]) for p in points[:3]]
    assert arms == [("baseline", 0.97), ("gaf", 2.0), ("gaf", 0.97)]  # configs/arm/'s baseline, averaging, gaf
    assert ge.grid(1) == points[:30]


def test_the_arms_differ_only_in_the_method_the_regimes_only_in_the_optimizer():
    points = {p.folder: p.config for p in ge.grid(1)}
    for folder, c in points.items():
        validate(RunConfig.from_dict(c))
        other_arm = points[folder.replace("arm=baseline", "arm=gaf").replace("arm=averaging", "arm=gaf")]
        other_optim = points[folder.replace("optim=sgd_cosine", "optim=sgd")]
        assert {k: v for k, v in c.items() if k != "method"} == {k: v for k, v in other_arm.items() if k != "method"}
        assert {k: v for k, v in c.items() if k != "optim"} == {k: v for k, v in other_optim.items() if k != "optim"}
    avg, gaf = (points[f"arm={a},data.noise=0.4,optim=sgd,seed=0"]["method"] for a in ("averaging", "gaf"))
    assert {k: v for k, v in avg.items() if k != "tau"} == {k: v for k, v in gaf.items() if k != "tau"}
    assert (avg["tau"], gaf["tau"], avg["merge"], gaf["n_micro"], gaf["per_class"]) == (2.0, 0.97, "mean", 2, 10)
    cosine = RunConfig.from_dict(points["arm=gaf,data.noise=0.4,optim=sgd_cosine,seed=0"]).optim
    assert (cosine.lr, cosine.weight_decay, cosine.schedule) == (0.02, 5e-4, "cosine")
    assert RunConfig.from_dict(points["arm=gaf,data.noise=0.4,optim=sgd,seed=0"]).optim == RunConfig().optim
    sizes = points["arm=gaf,data.noise=0.4,optim=sgd,seed=0"]["train"]
    assert (sizes["iterations"], sizes["val_every"]) == (16_000, 800)


def test_the_committed_runs_are_the_points_with_their_settings():
    """results/gpu_small: six runs, made before the grid was a preset, each with the settings of one point."""
    points = ge.grid(3)
    done = ge.committed(points, ROOT / "results" / ge.EXPERIMENT)
    assert done == {f"arm={a},data.noise=0.4,optim={o},seed=0" for a in ("baseline", "averaging", "gaf")
                    for o in ("sgd", "sgd_cosine")}
    assert ge.committed(points, ROOT / "results" / "absent") == set()


def test_a_run_at_another_length_or_unfinished_is_not_committed(tmp_path):
    runs = pd.read_csv(ROOT / "results" / ge.EXPERIMENT / "runs.csv").iloc[:2]
    runs.loc[0, "train.iterations"], runs.loc[1, "status"] = 10_240, "interrupted"
    runs.to_csv(tmp_path / "runs.csv", index=False)
    assert ge.committed(ge.grid(1), tmp_path) == set()


# ----------------------------------------------------------------------------- the planner


@pytest.mark.parametrize("folder, measured_s", [("gpu-small-2060its", 165.5), ("gpu-small", 151.3)])
def test_the_speed_model_predicts_the_recorded_h200_calls_within_15_percent(folder, measured_s):
    """The two calls of 2026-12-04 (results/gpu-small*): their speeds as measured then, the wave they
    ran (the runs' images; 20 validations) and its measured wall time. The planner of that day
    predicted 261 s for the first (its k = 9 eval_s counted each validation at 4.5 s)."""
    call = json.loads((ROOT / "results" / folder / "provenance.json").read_text())["gpu-small"]
    speed = next(s for s in ge.call_speeds(call) if s.k == call["plan"]["k"])
    assert call["sweep_wall_s"] == measured_s
    predicted = speed.wave_s(call["images_seen"], 20)
    assert abs(predicted / measured_s - 1) <= 0.15, predicted


def test_the_newest_recorded_call_of_the_card_gives_the_speed(tmp_path):
    old = {"card": "X", "date": "2026-12-01 10:00 UTC", "speeds": [{"k": 1, "iter_s": 0.01, "eval_s": 0.5,
                                                                   "start_s": 9.0}]}
    new = {"card": "X", "date": "2026-12-02 10:00:00 UTC", "speeds": [{"k": 3, "rate": 1.0, "eval_s": 1, "start_s": 1}],
           "speed_after": {"k": 3, "rate": 50_000.0, "eval_s": 0.4, "start_s": 12.0}}
    other = {"card": "Y", "date": "2026-12-03 10:00:00 UTC", "speed_after": new["speed_after"], "speeds": [{}]}
    for name, p in (("a", {"gpu-small": old}), ("b", {"calls": [new, other]})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "provenance.json").write_text(json.dumps(p))
    assert ge.recorded_speed("X", tmp_path) == ge.Speed(3, 50_000.0, 0.4, 12.0)
    assert ge.recorded_speed("Z", tmp_path) is None
    assert ge.call_speeds(old) == [ge.Speed(1, 200 / 0.01, 0.5, 9.0)]


def test_a_wave_remeasures_the_rate_and_the_rest_is_replanned():
    speed = ge.Speed(3, 50_000.0, 0.5, 10.0)
    plan = ge.Plan.make(ge.grid(1)[:9], speed)
    assert [len(w) for w in plan.waves] == [3, 3, 3]
    images = 16_000 * (128 + 200 + 200)
    assert plan.wave_s(plan.waves[0]) == pytest.approx(10 + images / 50_000 + 20 * 0.5)
    slower = plan.after(plan.waves[0], wall_s=300.0)  # the wave took 300 s: the same waves will too
    assert len(slower.waves) == 2 and slower.wave_s(slower.waves[0]) == pytest.approx(300.0)
    assert slower.fitting(599) == 1 and slower.fitting(600) == 2 and slower.fitting(299) == 0
    assert "2 waves of 3; 1 predicted to fit" in slower.describe(450)


def test_a_card_never_seen_runs_its_first_wave_unpredicted_and_that_wave_measures_it():
    unknown = ge.Plan.make(ge.grid(1)[:6], ge.Speed(3, float("inf"), 0.0, 0.0))
    assert unknown.wave_s(unknown.waves[0]) == 0.0
    measured = unknown.after(unknown.waves[0], wall_s=200.0)
    assert measured.wave_s(measured.waves[0]) == pytest.approx(200.0)  # the same arms: the same time


def fake_sweep(monkeypatch, tmp_path, budget_s: float, wall_s: float, fail=()) -> tuple[list, list, dict]:
    """gpu_evidence.sweep with launch (each wave taking wall_s of make-believe time) and
    write_outputs recorded instead of run."""
    clock = [1000.0]
    monkeypatch.setattr(ge.time, "perf_counter", lambda: clock[0])
    a = SimpleNamespace(t0=clock[0], budget_s=budget_s, waves=None, deadline=clock[0] + budget_s + ge.GRACE_S,
                        jpeg=None, device="cuda", results=tmp_path)
    launched, written = [], []

    def launch(a, configs, dirs):
        clock[0] += wall_s
        launched.append([d.name for d in dirs])
        if len(launched) in fail:
            raise SystemExit("a run failed (exit 1): planted")
        return {"images": 10 * len(dirs), "wall_s": wall_s}

    monkeypatch.setattr(ge, "launch", launch)
    monkeypatch.setattr(ge, "write_outputs", lambda a, work, record: written.append(record["images_seen"]))
    record = {"images_seen": 0}
    plan = ge.Plan.make(ge.grid(1)[:12], ge.Speed(3, 1e9, 0.0, 1.0))  # predicts 1 s a wave
    ge.sweep(a, plan, "graph", tmp_path, record)
    return launched, written, record


def test_the_sweep_replans_after_each_wave_and_stops_before_one_that_would_not_fit(monkeypatch, tmp_path, capsys):
    launched, written, record = fake_sweep(monkeypatch, tmp_path, budget_s=250, wall_s=100)
    assert launched == [[p.folder for p in ge.grid(1)[i : i + 3]] for i in (0, 3)]  # a third: 100 s of 50 left
    assert written == [30, 60] and [w["predicted_s"] for w in record["waves"]] == [1.0, 100.0]
    assert "stop: the next wave is predicted to take 100 s, 50 s are left; 2 waves not made" in capsys.readouterr().out


def test_the_first_wave_runs_whatever_its_prediction_and_a_failed_wave_costs_not_the_rest(monkeypatch, tmp_path,
                                                                                      capsys):
    launched, written, record = fake_sweep(monkeypatch, tmp_path, budget_s=50, wall_s=100)
    assert len(launched) == 1 and written == [30]
    launched, written, record = fake_sweep(monkeypatch, tmp_path, budget_s=1000, wall_s=100, fail=(1,))
    assert len(launched) == 4 and written == [0, 30, 60, 90]
    assert "FAIL wave arm=baseline,data.noise=0.4,optim=sgd_cosine,seed=0; " in capsys.readouterr().out


# ----------------------------------------------------------------------------- outputs


def test_the_table_gives_the_seed_spread_and_gaf_minus_averaging_per_seed_pair():
    rows = []
    for seed, (avg, gaf) in enumerate([(60.0, 61.0), (62.0, 62.0), (64.0, 66.0)]):
        for arm, best in (("averaging (tau 2)", avg), ("GAF", gaf), ("baseline (CE)", 50.0)):
            rows.append({"optimizer": "paper", "noise": 0.4, "arm": arm, "seed": seed, "best": best,
                         "final": best - 1, "fitted": 5.0 * (seed + 1), "taken": 100.0, "images": 1000,
                         "distance": 0.96})
    diff = tables.gaf_minus_averaging(pd.DataFrame(rows)).iloc[0]
    assert diff["seeds"] == 3 and diff["best: GAF - averaging"] == "+1.0 ± 1.0"
    assert diff["fitted: averaging / GAF / baseline (%)"] == "10.0 ± 5.0 / 10.0 ± 5.0 / 10.0 ± 5.0"
    assert tables.premise_lines(pd.DataFrame(rows)) == [
        "- paper: the baseline at 40% noise fitted 10.0 ± 5.0% of the flipped labels by its end: did not memorise "
        "(premise: >= 50%)."]
    assert tables.pm([-1.25], signed=True) == "-1.2" and tables.pm([]) == "—"


def test_refuses_a_cpu_grid_and_missing_data(tmp_path):
    with pytest.raises(SystemExit):
        ge.parse_args(["--device", "cpu"])
    with pytest.raises(SystemExit):
        ge.parse_args(["--device", "cpu", "--quick", "--jpeg", str(tmp_path / "absent.tar.gz")])


# ----------------------------------------------------------------------------- the dry run, without Hydra


def dry_run(tmp_path, results: Path, *extra: str) -> list[str]:
    jpeg = tmp_path / "cifar10-jpeg-q75.tar.gz"
    if not jpeg.is_file():
        write_jpeg_tar(jpeg, CIFAR10, 20, 10)
    cmd = [sys.executable, "scripts/gpu_evidence.py", "--device", "cpu", "--quick", "--jpeg", str(jpeg),
           "--results", str(results), *extra]
    got = subprocess.run(cmd, cwd=ROOT, env=no_hydra_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    return got.stdout.splitlines()


@pytest.mark.slow
def test_the_dry_run_runs_every_stage_with_resnet18_and_a_second_call_continues_the_grid(tmp_path):
    """`make gpu-evidence ARGS="--device cpu --quick"`: the GPU's code path in a Python that cannot
    import Hydra, on a tiny JPEG copy in the official layout, ResNet18 in the preflight and the runs.
    The first call makes one wave; the second continues from its outputs; plot.py draws them."""
    first, second = tmp_path / "first", tmp_path / "second"
    lines = dry_run(tmp_path, first, "--waves", "1", "--budget-s", "3000")  # a budget a busy CPU cannot spend
    assert [line.split()[1] for line in lines if line.startswith("PASS ")] == ["sync-free", "fp32-equal"]
    assert "resnet18" in next(line for line in lines if line.startswith("PASS fp32-equal"))
    assert "plan: 30 runs to go in waves of 3; no speed recorded for cpu: the first wave measures it" in lines
    assert "stop: --waves 1 made; 9 waves not made" in lines
    out = first / ge.EXPERIMENT
    assert {f.name for f in out.iterdir()} == OUTPUTS  # within what a device call brings back
    done = pd.read_csv(out / "runs.csv")
    assert set(done["status"]) == {"finished"} and set(done["train.iterations"]) == {ge.QUICK_SIZES["train"]["iterations"]}
    assert set(done["run_id"]) == {f"sweep/{p.folder}" for p in ge.grid(1)[:3]}
    assert set(done["experiment"]) == {"gpu_small"} and set(done["scale"]) == {"gpu"}

    bench = json.loads((out / "provenance.json").read_text())["calls"][0]["fused_bench"]  # the budget left
    assert "| kind | K | processes | separate | fused | fused / processes | fused / separate |" in bench

    lines = dry_run(tmp_path, second, "--waves", "1", "--committed", str(first), "--budget-s", "3000", "--no-bench")
    assert "grid: 27 of 30 runs to go (3 committed)" in lines
    out = second / ge.EXPERIMENT
    runs = pd.read_csv(out / "runs.csv")
    assert set(runs["run_id"]) == {f"sweep/{p.folder}" for p in ge.grid(1)[:6]}
    kept = runs.set_index("run_id").loc[done["run_id"], ["best_val_acc", "final_val_acc", "images_seen"]]
    pd.testing.assert_frame_equal(kept.reset_index(drop=True), done[kept.columns], check_dtype=False)
    provenance = json.loads((out / "provenance.json").read_text())
    assert len(provenance["calls"]) == 2 and provenance["n_runs"] == len(runs) == 6
    record = provenance["calls"][-1]
    assert "fused_bench" not in record  # --no-bench
    assert record["card"] == "cpu" and record["speed_from"] == "this call's first wave" and record["compile"] == "none"
    assert {r["status"] for r in record["preflight"].values()} == {"PASS"}
    assert all(w["wall_s"] > 0 for w in record["waves"])
    evals, curves = pd.read_csv(out / "evals.csv"), pd.read_csv(out / "curves.csv")
    assert evals.groupby("run_id").size().eq(2).all()  # 8 iterations, validated every 4
    # averaging and GAF start from the same weights on the same microbatches: the same first distance
    first_d = curves[curves["iter"] == 1].set_index("run_id")["d_mean"]
    assert first_d["sweep/" + ge.grid(1)[1].folder] == pytest.approx(first_d["sweep/" + ge.grid(1)[2].folder])
    assert "| fp32-equal | PASS |" in (out / "preflight.md").read_text()

    import plot  # the figure and the table of make figures, from the call's files alone
    made = plot.main(["--results", str(second), "--only", "gpu_small", "gpu_small_table"])
    assert set(made) == {"gpu_small", "gpu_small_table"} and (out / "gpu_small.png").is_file()
    assert "| lr 0.02, weight decay 0.0005, cosine | 40% | GAF | 1 |" in (out / "gpu_small.md").read_text()


def test_the_readmes_summary_of_the_grid_is_what_the_committed_results_give():
    df = tables.gpu_small_table(ROOT / "results")
    if df is None:
        pytest.skip("no committed grid results in this checkout")
    assert tables.markdown_table(tables.gaf_minus_averaging(df.attrs["runs"])) in (ROOT / "README.md").read_text()


def test_the_grids_second_call_planned_from_the_firsts_recorded_rate_within_15_percent():
    """results/gpu_small: the first call predicted its first wave from another day's speeds (189 s for
    364 s: calls differ); the second, planned from the rate the first call's wave measured, predicted
    its wave within 15%."""
    calls = json.loads((ROOT / "results" / ge.EXPERIMENT / "provenance.json").read_text())["calls"]
    first, second = calls[0], calls[1]
    wave = second["waves"][0]
    points = [p for p in ge.grid(3) if p.folder in wave["runs"]]
    predicted = ge.Plan.make(points, ge.call_speeds(first)[0]).wave_s(points)
    assert predicted == pytest.approx(wave["predicted_s"], abs=0.1)
    assert abs(predicted / wave["wall_s"] - 1) <= 0.15
