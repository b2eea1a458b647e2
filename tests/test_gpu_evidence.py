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
import wave_plan as wp  # noqa: E402
from cifar_fixtures import write_jpeg_tar  # noqa: E402
from gaf.config import RunConfig, validate  # noqa: E402
from gaf.report import tables  # noqa: E402

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
    assert call["sweep_wall_s"] == measured_s
    predicted = wp.call_speed(call).seconds(call["images_seen"], 20)
    assert abs(predicted / measured_s - 1) <= 0.15, predicted


def test_the_grids_second_call_planned_from_the_firsts_recorded_rate_within_15_percent():
    """results/gpu_small: the first call predicted its first wave from another day's speeds (189 s for
    364 s: calls differ); the second, planned from the rate the first call's wave measured, predicted
    its wave (three runs, one per process) within 15%."""
    calls = json.loads((ROOT / "results" / ge.EXPERIMENT / "provenance.json").read_text())["calls"]
    first, second = calls[0], calls[1]
    wave = second["waves"][0]
    points = [p for p in ge.grid(3) if p.folder in wave["runs"]]
    predicted = wp.call_speed(first).wave_s(points, max_fused=1)
    assert predicted == pytest.approx(wave["predicted_s"], abs=0.1)
    assert abs(predicted / wave["wall_s"] - 1) <= 0.15


def test_the_newest_recorded_call_of_the_card_gives_the_speed(tmp_path):
    old = {"card": "X", "date": "2026-12-01 10:00 UTC", "plan": {"k": 1},
           "speeds": [{"k": 1, "iter_s": 0.01, "eval_s": 0.5, "start_s": 9.0}]}
    new = {"card": "X", "date": "2026-12-02 10:00:00 UTC", "speed_after": {"rate": 50_000.0, "eval_s": 0.4,
                                                                          "start_s": 12.0}}
    other = {"card": "Y", "date": "2026-12-03 10:00:00 UTC", "speed_after": new["speed_after"], "speeds": [{}]}
    for name, p in (("a", {"gpu-small": old}), ("b", {"calls": [new, other]})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "provenance.json").write_text(json.dumps(p))
    assert wp.recorded_speed("X", tmp_path) == wp.Speed(50_000.0, 0.4, 12.0)
    assert wp.recorded_speed("Z", tmp_path) is None
    assert wp.call_speed(old) == wp.Speed(200 / 0.01, 0.5, 9.0)


def test_a_wave_is_fused_groups_and_its_validations_are_the_largest_groups():
    """The first 12 points: 8 GAF-shaped runs (averaging and GAF), 4 baselines, 20 validations each."""
    points = ge.grid(1)[:12]
    assert [[p.kind for p in job] for job in wp.jobs(points, 32)] == [["baseline"] * 4, ["gaf"] * 8]
    assert [len(job) for job in wp.jobs(points, 3)] == [3, 1, 3, 3, 2]
    assert wp.load(points, 32) == (16_000 * (4 * 128 + 8 * 200), 8 * 20)
    assert wp.load(points, 1) == (16_000 * (4 * 128 + 8 * 200), 20)  # one run per process: all validate at once
    speed = wp.Speed(100_000.0, 0.5, 10.0)
    assert speed.wave_s(points, 32) == pytest.approx(10 + 16_000 * 2112 / 100_000 + 160 * 0.5)


def test_a_wave_remeasures_the_speed_and_the_next_is_the_longest_run_of_points_that_fits():
    speed, points = wp.Speed(100_000.0, 0.5, 10.0), ge.grid(1)
    wave = wp.next_wave(points, speed, 32, left_s=400)
    assert speed.wave_s(wave, 32) <= 400 < speed.wave_s(points[: len(wave) + 1], 32)
    slower = speed.remeasured(*wp.load(wave, 32), wall_s=2 * speed.wave_s(wave, 32))
    assert slower.wave_s(wave, 32) == pytest.approx(2 * speed.wave_s(wave, 32))  # the same wave: what it took
    assert len(wp.next_wave(points, slower, 32, left_s=400)) < len(wave)
    assert wp.next_wave(points, speed, 32, left_s=1) == points[:1]  # at least one


def test_where_timing_a_fused_group_fails_the_runs_go_one_per_process(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("planted")

    timed = []
    monkeypatch.setattr(wp.bench_fused, "fused", broken)
    monkeypatch.setattr(wp.bench_fused, "separate", lambda bench, kind, k: timed.append(kind) or 1000.0)
    a, record = SimpleNamespace(device="cpu", max_fused=32, call=ge.GPU), {"card": "cpu", "max_fused": 32}
    speed = ge.first_speed(a, ge.grid(1), record)
    assert a.max_fused == record["max_fused"] == 1 and speed.rate == pytest.approx(1000.0)
    assert timed == ["baseline", "gaf", "gaf"]  # the first three runs, each alone
    assert "FAIL timing the fused groups (RuntimeError: planted): the runs go one per process" in capsys.readouterr().out


def fake_sweep(monkeypatch, tmp_path, budget_s: float, slower: float, fail=(), runs=None) -> tuple[list, dict, str]:
    """gpu_evidence.sweep with launch (each wave taking ``slower`` times its prediction from a
    Speed of 100,000 images/s, of make-believe time) and write_outputs recorded instead of run."""
    clock, speed = [1000.0], wp.Speed(100_000.0, 0.5, 10.0)
    monkeypatch.setattr(ge.time, "perf_counter", lambda: clock[0])
    a = SimpleNamespace(t0=clock[0], budget_s=budget_s, runs=runs, deadline=clock[0] + budget_s + ge.GRACE_S,
                        jpeg=None, device="cuda", results=tmp_path, max_fused=32)
    launched, written = [], []

    def launch(a, wave, work):
        clock[0] += slower * speed.wave_s(wave, a.max_fused)
        launched.append([p.folder for p in wave])
        if len(launched) in fail:
            raise SystemExit("a run failed (exit 1): planted")
        return {"images": len(wave), "wall_s": slower * speed.wave_s(wave, a.max_fused)}

    monkeypatch.setattr(ge, "launch", launch)
    monkeypatch.setattr(ge, "write_outputs", lambda a, work, record: written.append(record["images_seen"]))
    record = {"images_seen": 0, "max_fused": a.max_fused}
    ge.sweep(a, ge.grid(1), speed, tmp_path, record)
    return launched, record, written


def test_the_sweep_fills_the_budget_replanned_after_each_wave_and_ends_within_it(monkeypatch, tmp_path, capsys):
    launched, record, written = fake_sweep(monkeypatch, tmp_path, budget_s=1200, slower=1.5)
    waves = record["waves"]
    assert waves[0]["predicted_s"] <= 600 and len(waves) >= 2  # the first within half the budget
    assert waves[1]["predicted_s"] == pytest.approx(waves[1]["wall_s"], rel=0.15)  # replanned from the first
    assert sum(w["wall_s"] for w in waves) <= 1200
    made = sum(map(len, launched))
    assert [p for wave in launched for p in wave] == [p.folder for p in ge.grid(1)[:made]]  # in the grid's order
    assert written == [sum(map(len, launched[: i + 1])) for i in range(len(launched))]
    assert f"stop: {30 - made} runs not made; the next wave is predicted" in capsys.readouterr().out


def test_the_first_wave_runs_whatever_its_prediction_a_failed_wave_costs_not_the_rest_and_runs_caps(
        monkeypatch, tmp_path, capsys):
    launched, _, written = fake_sweep(monkeypatch, tmp_path, budget_s=10, slower=1.0)
    assert len(launched) == 1 and len(launched[0]) == 1
    launched, record, written = fake_sweep(monkeypatch, tmp_path, budget_s=100_000, slower=1.0, fail=(1,))
    assert sum(map(len, launched)) == 30 and written[0] == 0 and written[-1] == 30 - len(launched[0])
    assert "FAIL wave 1: a run failed (exit 1): planted\na wave of fused groups failed: the runs go one per process" in capsys.readouterr().out
    assert record["max_fused"] == 1  # a fused group that failed would fail again
    launched, _, _ = fake_sweep(monkeypatch, tmp_path, budget_s=100_000, slower=1.0, runs=4)
    assert sum(map(len, launched)) == 4


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
    The first call makes one wave (a fused group of averaging and GAF, the baseline alone); the
    second continues its folder, one run per process; make figures draws them."""
    first = tmp_path / "first"
    lines = dry_run(tmp_path, first, "--runs", "3", "--budget-s", "3000")  # a budget a busy CPU cannot spend
    assert [line.split()[1] for line in lines if line.startswith("PASS ")] == ["sync-free", "fp32-equal", "fused-equal"]
    assert all("resnet18" in line for line in lines if line.startswith("PASS f"))
    assert next(line for line in lines if line.startswith("speed: ")).endswith("a validation 1.00 s (guessed)")
    assert "wave 1: 3 runs in 2 processes" in next(line for line in lines if line.startswith("wave 1: 3"))
    out = first / ge.EXPERIMENT
    assert {f.name for f in out.iterdir()} == OUTPUTS  # within what a device call brings back
    done = pd.read_csv(out / "runs.csv")
    assert set(done["status"]) == {"finished"} and set(done["train.iterations"]) == {ge.QUICK_SIZES["train"]["iterations"]}
    assert set(done["run_id"]) == {f"sweep/{p.folder}" for p in ge.grid(1)[:3]}
    assert set(done["experiment"]) == {"gpu_small"} and set(done["scale"]) == {"gpu"}

    bench = json.loads((out / "provenance.json").read_text())["calls"][0]["fused_bench"]  # the budget left
    assert "| kind | K | processes | separate | fused | fused / processes | fused / separate |" in bench

    lines = dry_run(tmp_path, first, "--runs", "2", "--budget-s", "3000", "--no-bench", "--max-fused", "1")
    assert "grid: 27 of 30 runs to go (3 committed)" in lines  # continues the folder it writes
    runs = pd.read_csv(out / "runs.csv")
    assert set(runs["run_id"]) == {f"sweep/{p.folder}" for p in ge.grid(1)[:5]}
    kept = runs.set_index("run_id").loc[done["run_id"], ["best_val_acc", "final_val_acc", "images_seen"]]
    pd.testing.assert_frame_equal(kept.reset_index(drop=True), done[kept.columns], check_dtype=False)
    provenance = json.loads((out / "provenance.json").read_text())
    assert len(provenance["calls"]) == 2 and provenance["n_runs"] == len(runs) == 5
    record = provenance["calls"][-1]
    assert "fused_bench" not in record  # --no-bench
    assert record["card"] == "cpu" and record["max_fused"] == 1 and record["compile"] == "none"
    assert "wave 1: 2 runs in 2 processes" in next(line for line in lines if line.startswith("wave 1: 2"))
    assert {n: r["status"] for n, r in record["preflight"].items()} == {"sync-free": "PASS", "fp32-equal": "PASS"}
    assert all(w["wall_s"] > 0 for w in record["waves"])
    evals, curves = pd.read_csv(out / "evals.csv"), pd.read_csv(out / "curves.csv")
    assert evals.groupby("run_id").size().eq(2).all()  # 8 iterations, validated every 4
    # averaging and GAF start from the same weights on the same microbatches: the same first distance
    first_d = curves[curves["iter"] == 1].set_index("run_id")["d_mean"]
    assert first_d["sweep/" + ge.grid(1)[1].folder] == pytest.approx(first_d["sweep/" + ge.grid(1)[2].folder])
    assert "| fp32-equal | PASS |" in (out / "preflight.md").read_text()

    from gaf.report.regenerate import regenerate

    made = regenerate(first, only=["gpu_small", "gpu_small_table"])  # make figures' figure and table, from these files
    assert set(made) == {"gpu_small", "gpu_small_table"} and (out / "gpu_small.png").is_file()
    assert "| lr 0.02, weight decay 0.0005, cosine | 40% | GAF | 1 |" in (out / "gpu_small.md").read_text()


def test_the_readmes_summary_of_the_grid_is_what_the_committed_results_give():
    df = tables.gpu_small_table(ROOT / "results")
    if df is None:
        pytest.skip("no committed grid results in this checkout")
    assert tables.markdown_table(tables.gaf_minus_averaging(df.attrs["runs"])) in (ROOT / "README.md").read_text()
