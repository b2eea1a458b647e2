"""scripts/gpu_evidence.py: the grid, the planner against recorded GPU calls, the merge with
committed results, and the dry run end to end on a CPU with ResNet18 (no Hydra)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import evidence_report  # noqa: E402
from gaf.config import validate  # noqa: E402
import gpu_evidence as ge  # noqa: E402
from cifar_fixtures import write_jpeg_tar  # noqa: E402

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
OUTPUTS = {"runs.csv", "curves.csv", "evals.csv", "provenance.json", "gpu-grid.png", "gpu-grid.pdf", "table.md",
           "preflight.md"}


def no_hydra_env(tmp_path) -> dict:
    """An environment whose Python cannot import hydra or omegaconf (as on the lent GPU), for
    every process it starts too: a sitecustomize on PYTHONPATH."""
    shim = tmp_path / "no_hydra"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['hydra'] = None\nsys.modules['omegaconf'] = None\n")
    path = os.pathsep.join([str(shim), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- the grid


def test_the_grid_answers_40_percent_in_both_regimes_first_then_80_0_20_60_then_more_seeds():
    runs = ge.grid(3)
    assert len(runs) == len({r.name for r in runs}) == 2 * 5 * 3 * 3
    cells = [(r.regime, r.noise, r.seed) for r in runs[::3]]
    assert cells[:10] == [(g, n, 0) for n in (0.4, 0.8, 0.0, 0.2, 0.6) for g in ("R2", "R1")]
    assert [c[2] for c in cells] == sorted(c[2] for c in cells)  # seed 0's whole grid before seed 1
    assert all([r.arm for r in runs[i : i + 3]] == ["baseline", "averaging", "gaf"] for i in range(0, 90, 3))


def test_the_arms_differ_only_in_the_method_the_regimes_only_in_the_optimizer(tmp_path):
    jpeg = write_jpeg_tar(tmp_path / "c.tar.gz", CIFAR10, 4, 1)
    a = ge.parse_args(["--device", "cpu", "--quick", "--jpeg", str(jpeg)])
    configs = {(g, arm): ge.run_config(a, ge.Run(g, 0.4, arm, 0), 40, "none", 4) for g in ge.REGIMES for arm in ge.ARMS}
    for (g, arm), c in configs.items():
        validate(ge.RunConfig.from_dict(c))
        same_regime, same_arm = configs[(g, "gaf")], configs[("R1", arm)]
        assert {k: v for k, v in c.items() if k != "method"} == {k: v for k, v in same_regime.items() if k != "method"}
        assert {k: v for k, v in c.items() if k != "optim"} == {k: v for k, v in same_arm.items() if k != "optim"}
    avg, gaf = configs[("R1", "averaging")]["method"], configs[("R1", "gaf")]["method"]
    assert {k: v for k, v in avg.items() if k != "tau"} == {k: v for k, v in gaf.items() if k != "tau"}
    assert (avg["tau"], gaf["tau"], avg["merge"], gaf["n_micro"]) == (2.0, 0.97, "mean", 2)
    assert configs[("R1", "baseline")]["method"] == {"name": "baseline", "batch_size": 128}
    r2 = ge.RunConfig.from_dict(configs[("R2", "gaf")]).optim
    assert (r2.lr, r2.weight_decay, r2.schedule) == (0.02, 5e-4, "cosine")
    assert ge.RunConfig.from_dict(configs[("R1", "gaf")]).optim == ge.RunConfig().optim  # the paper's


def test_a_regime_and_an_arm_are_read_back_from_a_runs_settings(tmp_path):
    jpeg = write_jpeg_tar(tmp_path / "c.tar.gz", CIFAR10, 4, 1)
    a = ge.parse_args(["--device", "cpu", "--quick", "--jpeg", str(jpeg)])
    for r in ge.grid(1)[:6]:
        cfg = ge.RunConfig.from_dict(ge.run_config(a, r, 40, "none", 4)).to_dict()
        row = {f"{group}.{k}": v for group in ("optim", "method") for k, v in cfg[group].items()}
        assert evidence_report.regime_of(row | {"run_id": r.name}, ge.REGIMES) == r.regime
        assert evidence_report.arm_of(row) == r.arm


def test_committed_runs_are_those_finished_at_the_grids_length(tmp_path):
    pd.DataFrame({"run_id": ["sweep/R2-noise40-gaf-seed0", "sweep/R1-noise40-gaf-seed0", "sweep/R1-noise0-gaf-seed0"],
                  "status": ["finished", "running", "finished"], "train.iterations": [16_000, 16_000, 10_240]}
                 ).to_csv(tmp_path / "runs.csv", index=False)
    assert ge.committed_runs(tmp_path, 16_000) == {"R2-noise40-gaf-seed0"}
    assert ge.committed_runs(tmp_path / "absent", 16_000) == set()


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


def test_the_newest_recorded_call_of_the_card_gives_the_speeds(tmp_path):
    old = {"card": "X", "date": "2026-12-01 10:00 UTC", "speeds": [{"k": 1, "iter_s": 0.01, "eval_s": 0.5,
                                                                   "start_s": 9.0}]}
    new = {"card": "X", "date": "2026-12-02 10:00:00 UTC", "speeds": [{"k": 3, "rate": 1.0, "eval_s": 1, "start_s": 1}],
           "speed_after": {"k": 3, "rate": 50_000.0, "eval_s": 0.4, "start_s": 12.0}}
    other = {"card": "Y", "date": "2026-12-03 10:00:00 UTC", "speed_after": new["speed_after"], "speeds": [{}]}
    for name, p in (("a", {"gpu-small": old}), ("b", {"calls": [new, other]})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "provenance.json").write_text(json.dumps(p))
    assert ge.recorded_speeds("X", tmp_path) == [ge.Speed(3, 50_000.0, 0.4, 12.0)]
    assert ge.recorded_speeds("Z", tmp_path) == []
    assert ge.call_speeds(old) == [ge.Speed(1, 200 / 0.01, 0.5, 9.0)]


def test_a_wave_remeasures_the_rate_and_the_rest_is_replanned():
    speed = ge.Speed(3, 50_000.0, 0.5, 10.0)
    plan = ge.Plan.make(ge.grid(1)[:9], [ge.Speed(1, 30_000.0, 0.5, 10.0), speed], ge.GPU)
    assert plan.speed == speed and [len(w) for w in plan.waves] == [3, 3, 3]
    images = 16_000 * (128 + 200 + 200)
    assert plan.wave_s(plan.waves[0]) == pytest.approx(10 + images / 50_000 + 20 * 0.5)
    slower = plan.after(plan.waves[0], wall_s=300.0)  # the wave took 300 s: the same waves will too
    assert len(slower.waves) == 2 and slower.wave_s(slower.waves[0]) == pytest.approx(300.0)
    assert slower.fitting(599) == 1 and slower.fitting(600) == 2 and slower.fitting(299) == 0
    assert "2 waves of 3; 1 predicted to fit" in slower.describe(450)


def fake_sweep(monkeypatch, tmp_path, budget_s: float, wall_s: float, fail=()) -> tuple[list, list, dict]:
    """gpu_evidence.sweep with launch (each wave taking wall_s of make-believe time) and
    write_outputs recorded instead of run."""
    clock = [1000.0]
    monkeypatch.setattr(ge.time, "perf_counter", lambda: clock[0])
    a = SimpleNamespace(t0=clock[0], budget_s=budget_s, waves=None, deadline=clock[0] + budget_s + ge.GRACE_S, scale=ge.GPU,
                        jpeg=None, device="cuda", out=tmp_path / "out")
    launched, written = [], []

    def launch(a, configs, dirs):
        clock[0] += wall_s
        launched.append([d.name for d in dirs])
        if len(launched) in fail:
            raise SystemExit("a run failed (exit 1): planted")
        return {"images": 10 * len(dirs), "wall_s": wall_s}

    monkeypatch.setattr(ge, "launch", launch)
    monkeypatch.setattr(ge, "write_outputs", lambda out, work, record: written.append(record["images_seen"]))
    record = {"images_seen": 0}
    plan = ge.Plan.make(ge.grid(1)[:12], [ge.Speed(3, 1e9, 0.0, 1.0)], ge.GPU)  # predicts 1 s a wave
    ge.sweep(a, plan, "graph", tmp_path, record)
    return launched, written, record


def test_the_sweep_replans_after_each_wave_and_stops_before_one_that_would_not_fit(monkeypatch, tmp_path, capsys):
    launched, written, record = fake_sweep(monkeypatch, tmp_path, budget_s=250, wall_s=100)
    assert launched == [[r.name for r in ge.grid(1)[i : i + 3]] for i in (0, 3)]  # a third: 100 s of 50 left
    assert written == [30, 60] and [w["predicted_s"] for w in record["waves"]] == [1.0, 100.0]
    assert "stop: the next wave is predicted to take 100 s, 50 s are left; 2 waves not made" in capsys.readouterr().out


def test_the_first_wave_runs_whatever_its_prediction_and_a_failed_wave_costs_not_the_rest(monkeypatch, tmp_path,
                                                                                      capsys):
    launched, written, record = fake_sweep(monkeypatch, tmp_path, budget_s=50, wall_s=100)
    assert len(launched) == 1 and written == [30]
    launched, written, record = fake_sweep(monkeypatch, tmp_path, budget_s=1000, wall_s=100, fail=(1,))
    assert len(launched) == 4 and written == [0, 30, 60, 90]
    assert "FAIL wave R2-noise40-baseline-seed0" in capsys.readouterr().out


# ----------------------------------------------------------------------------- outputs


def test_this_calls_runs_join_the_committed_ones_and_every_call_is_listed(tmp_path):
    out, new = tmp_path / "out", tmp_path / "new"
    for d, ids, calls in ((out, ["sweep/a", "sweep/b"], [{"date": "1"}]), (new, ["sweep/b", "sweep/c"], None)):
        d.mkdir()
        for name in ("runs.csv", "curves.csv", "evals.csv"):
            pd.DataFrame({"run_id": ids, "status": "finished", "where": d.name}).to_csv(d / name, index=False)
        (d / "provenance.json").write_text(json.dumps({"experiment": "gpu-grid", **({"calls": calls} if calls else {})}))
    ge.merge_into(out, new, {"date": "2"})
    runs = pd.read_csv(out / "runs.csv")
    assert list(runs["run_id"]) == ["sweep/a", "sweep/b", "sweep/c"] and list(runs["where"]) == ["out", "new", "new"]
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["calls"] == [{"date": "1"}, {"date": "2"}] and provenance["n_runs"] == 3


def test_the_table_gives_the_seed_spread_and_gaf_minus_averaging_per_seed_pair():
    rows = []
    for seed, (avg, gaf) in enumerate([(60.0, 61.0), (62.0, 62.0), (64.0, 66.0)]):
        for arm, best in (("averaging", avg), ("gaf", gaf), ("baseline", 50.0)):
            rows.append({"regime": "R1", "noise": 0.4, "arm": arm, "seed": seed, "finished": True, "best": best,
                         "final": best - 1, "fitted": 5.0, "taken": 100.0, "images": 1000, "distance": 0.96})
    r = pd.DataFrame(rows)
    diff = evidence_report.gaf_minus_averaging(r).iloc[0]
    assert diff["seeds"] == 3 and diff["best: GAF - averaging (points)"] == "1.0 ± 1.0"
    summary = evidence_report.summary_table(r)
    assert list(summary.loc[summary["arm"] == "GAF (tau 0.97)", "best (%)"]) == ["63.0 ± 2.6"]
    assert evidence_report.premise_lines(r, ge.REGIMES) == [
        "- R1, the paper's optimizer (lr 0.01, weight decay 1e-2, plateau): the baseline at 40% noise fitted 5.0 ± 0.0% "
        "of the flipped labels by its end: did not memorise (premise: >= 50%)."]


def test_the_speed_stage_measures_larger_k_until_it_stops_paying(monkeypatch, tmp_path):
    """k GAF runs at once for each k of the scale; a k under 1.1 times the rate of the k before ends it."""
    rates = {1: 20_000.0, 3: 30_000.0, 9: 31_000.0, 18: 60_000.0}  # 9 pays under 1.1x: 18 is never tried
    tried = []

    def launch(a, configs, dirs):
        k = len(configs)
        tried.append(k)
        its = configs[0]["train"]["iterations"]
        for d in dirs:
            d.mkdir(parents=True)
            pd.DataFrame({"iter": range(1, its + 1), "time_s": [i * 200 * k / rates[k] for i in range(1, its + 1)]}
                         ).to_csv(d / "metrics.csv", index=False)
        summary = {"iterations": its, "train_time_s": its * 200 * k / rates[k], "wall_time_s": its * 200 * k
                   / rates[k] + 0.5}
        return {"wall_s": summary["wall_time_s"] + 10.0, "summaries": [summary] * k}

    monkeypatch.setattr(ge, "launch", launch)
    a = SimpleNamespace(scale=ge.Scale(**{**vars(ge.GPU), "jobs": (1, 3, 9, 18)}), jpeg=None, device="cuda")
    speeds = ge.measure_speeds(a, tmp_path, "graph")
    assert tried == [1, 3, 9] and [s.k for s in speeds] == [1, 3, 9]
    assert [round(s.rate) for s in speeds] == [20_000, 30_000, 31_000]
    assert all(s.eval_s == pytest.approx(0.5) and s.start_s == pytest.approx(10.0) for s in speeds)
    assert ge.Plan.make(ge.grid(1), speeds, ge.GPU).speed.k == 9  # the highest rate measured


def test_refuses_a_cpu_grid_and_missing_data(tmp_path):
    with pytest.raises(SystemExit):
        ge.parse_args(["--device", "cpu"])
    with pytest.raises(SystemExit):
        ge.parse_args(["--device", "cpu", "--quick", "--jpeg", str(tmp_path / "absent.tar.gz")])


# ----------------------------------------------------------------------------- the dry run, without Hydra


def dry_run(tmp_path, out: Path, *extra: str) -> list[str]:
    jpeg = tmp_path / "cifar10-jpeg-q75.tar.gz"
    if not jpeg.is_file():
        write_jpeg_tar(jpeg, CIFAR10, 20, 10)
    cmd = [sys.executable, "scripts/gpu_evidence.py", "--device", "cpu", "--quick", "--jpeg", str(jpeg),
           "--out", str(out), *extra]
    got = subprocess.run(cmd, cwd=ROOT, env=no_hydra_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    return got.stdout.splitlines()


@pytest.mark.slow
def test_the_dry_run_runs_every_stage_with_resnet18_and_a_second_call_continues_the_grid(tmp_path):
    """`make gpu-evidence ARGS="--device cpu --quick"`: the GPU's code path in a Python that cannot
    import Hydra, on a tiny JPEG copy in the official layout, ResNet18 in the preflight and the runs.
    The first call makes one wave; the second continues from its outputs."""
    first, second = tmp_path / "first", tmp_path / "second"
    lines = dry_run(tmp_path, first, "--waves", "1")
    assert [line.split()[1] for line in lines if line.startswith("PASS ")] == ["sync-free", "fp32-equal"]
    assert "resnet18" in next(line for line in lines if line.startswith("PASS fp32-equal"))
    assert sum(line.startswith("speed: 3 at once") for line in lines) == 1
    assert any(line.startswith("plan: 30 runs to go in 10 waves of 3;") for line in lines)
    assert "stop: --waves 1 made; 9 waves not made" in lines
    assert {f.name for f in first.iterdir()} == OUTPUTS  # at most 8 files: what the device call brings back
    done = pd.read_csv(first / "runs.csv")
    assert set(done["status"]) == {"finished"} and set(done["train.iterations"]) == {ge.QUICK.iterations}
    assert set(done["run_id"].str.split("/").str[-1]) == {r.name for r in ge.grid(1)[:3]}

    bench = json.loads((first / "provenance.json").read_text())["calls"][0]["fused_bench"]  # the budget left
    assert "| kind | K | processes | separate | fused | fused / processes | fused / separate |" in bench

    lines = dry_run(tmp_path, second, "--waves", "1", "--committed", str(first), "--budget-s", "110")
    assert "grid: 27 of 30 runs to go (3 committed)" in lines
    runs = pd.read_csv(second / "runs.csv")
    assert set(runs["run_id"].str.split("/").str[-1]) == {r.name for r in ge.grid(1)[:6]}
    kept = runs.iloc[:3][done.columns]  # the committed rows kept as they were (R1's rows add plateau columns)
    pd.testing.assert_frame_equal(kept, done, check_dtype=False)
    provenance = json.loads((second / "provenance.json").read_text())
    assert len(provenance["calls"]) == 2 and provenance["n_runs"] == len(runs)
    record = provenance["calls"][-1]
    assert "fused_bench" not in record  # under 90 s left after its wave
    assert record["card"] == "cpu" and record["speeds_from"] == "measured" and record["compile"] == "none"
    assert {r["status"] for r in record["preflight"].values()} == {"PASS"}
    assert all(w["wall_s"] > 0 for w in record["waves"])
    evals, curves = pd.read_csv(second / "evals.csv"), pd.read_csv(second / "curves.csv")
    assert evals.groupby("run_id").size().eq(ge.QUICK.validations).all()
    # averaging and GAF start from the same weights on the same microbatches: the same first distance
    first_d = curves[curves["iter"] == 1].set_index("run_id")["d_mean"]
    assert first_d["sweep/R2-noise40-averaging-seed0"] == pytest.approx(first_d["sweep/R2-noise40-gaf-seed0"])
    table = (second / "table.md").read_text()
    assert "| R2 | 40% | GAF (tau 0.97) | 1 |" in table and "GAF minus averaging" in table
    assert "| fp32-equal | PASS |" in (second / "preflight.md").read_text()


def test_the_readmes_summary_of_the_grid_is_what_the_committed_results_give():
    out = ROOT / "results" / ge.EXPERIMENT
    if not (out / "runs.csv").is_file():
        pytest.skip("no committed grid results in this checkout")
    assert evidence_report.readme_table(out, ge.REGIMES) in (ROOT / "README.md").read_text()


def test_the_grids_second_call_planned_from_the_firsts_recorded_rate_within_15_percent():
    """results/gpu-grid: the first call predicted its first wave from another day's speeds (189 s for
    364 s: calls differ); the second, planned from the rate the first call's wave measured, predicted
    its wave within 15%."""
    calls = json.loads((ROOT / "results" / ge.EXPERIMENT / "provenance.json").read_text())["calls"]
    first, second = calls[0], calls[1]
    speed = ge.call_speeds(first)[0]
    wave = second["waves"][0]
    runs = [r for r in ge.grid(3) if r.name in wave["runs"]]
    predicted = ge.Plan(waves=[runs], speed=speed, iterations=ge.GPU.iterations, validations=ge.GPU.validations,
                        scale=ge.GPU).wave_s(runs)
    assert predicted == pytest.approx(wave["predicted_s"], abs=0.1)
    assert abs(predicted / wave["wall_s"] - 1) <= 0.15
