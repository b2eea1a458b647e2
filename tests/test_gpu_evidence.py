"""scripts/gpu_evidence.py: the budget logic on made-up speeds, and the dry run end to end (no Hydra)."""

import json
import math
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
import collect  # noqa: E402
from gaf.config import validate  # noqa: E402
import gpu_evidence as ge  # noqa: E402
from cifar_fixtures import write_jpeg_tar  # noqa: E402

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
GPU = ge.GPU
OUTPUTS = {"runs.csv", "curves.csv", "evals.csv", "provenance.json", "gpu-small.png", "gpu-small.pdf", "table.md",
           "preflight.md"}


def no_hydra_env(tmp_path) -> dict:
    """An environment whose Python cannot import hydra or omegaconf (as on the lent GPU), for
    every process it starts too: a sitecustomize on PYTHONPATH."""
    shim = tmp_path / "no_hydra"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['hydra'] = None\nsys.modules['omegaconf'] = None\n")
    path = os.pathsep.join([str(shim), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- the budget logic


def test_run_length_is_the_longest_that_fits():
    speed = ge.Speed(k=3, iter_s=0.01, eval_s=0.5, start_s=10.0)
    # 9 runs = 3 waves of 100 s: 100 - 10 s start - 20 validations x 0.5 s = 80 s = 8,000 iterations
    assert ge.run_length(300, speed, 9, 20, cap=16_000) == 8000
    for budget in (75.3, 300, 301.7, 500.9):
        its = ge.run_length(budget, speed, 9, 20, cap=16_000)
        assert its % 20 == 0
        assert ge.predicted_s(speed, 9, its, 20) <= budget < ge.predicted_s(speed, 9, its + 20, 20)
    assert ge.run_length(10_000, speed, 9, 20, cap=16_000) == 16_000  # capped
    assert ge.run_length(30, speed, 9, 20, cap=16_000) == 0  # not even the start-up fits
    assert ge.run_length(100, speed, 3, 20, cap=16_000) == ge.run_length(100, speed, 1, 20, cap=16_000) == 8000


def test_run_length_counts_waves():
    one, three = ge.Speed(1, 0.004, 0.3, 8.0), ge.Speed(3, 0.006, 0.4, 10.0)
    # nine runs one at a time: 9 waves; three at a time: 3 waves of slower runs
    assert ge.run_length(450, one, 9, 20, 16_000) == 9000  # 450 / 9 - 8 - 20 x 0.3 = 36 s
    assert ge.run_length(300, one, 9, 20, 16_000) == 4820  # 300 / 9 - 14 = 19.3 s
    assert ge.run_length(300, three, 9, 20, 16_000) == 13_660  # 300 / 3 - 10 - 20 x 0.4 = 82 s


def test_the_plan_takes_every_seed_only_at_the_cap():
    fast = [ge.Speed(1, 0.001, 0.1, 5.0), ge.Speed(9, 0.002, 0.2, 8.0)]
    plan = ge.make_plan(400, fast, GPU, seeds=2)
    assert len(plan.runs) == 18 and plan.iterations == GPU.cap and plan.at_cap and plan.k == 9
    assert plan.predicted_s <= 400

    medium = [ge.Speed(1, 0.004, 0.3, 8.0), ge.Speed(3, 0.012, 0.4, 10.0), ge.Speed(9, 0.03, 0.8, 15.0)]
    plan = ge.make_plan(400, medium, GPU, seeds=2)
    assert len(plan.runs) == 9 and {r.seed for r in plan.runs} == {0}
    assert GPU.floor <= plan.iterations < GPU.cap and "18 runs would get" in plan.why
    best = max(ge.run_length(400, s, 9, GPU.validations, GPU.cap) for s in medium)
    assert plan.iterations == best and plan.predicted_s <= 400
    assert plan.k == 9  # one wave of nine beats three waves of three here
    assert plan.iterations == ge.run_length(400, medium[2], 9, GPU.validations, GPU.cap)


def test_a_short_budget_still_answers_the_main_question():
    slow = [ge.Speed(1, 0.01, 0.5, 10.0), ge.Speed(3, 0.02, 0.8, 12.0)]
    plan = ge.make_plan(120, slow, GPU, seeds=2)
    assert [(r.noise, r.arm) for r in plan.runs] == [(0.4, "baseline"), (0.4, "averaging"), (0.4, "gaf")]
    assert plan.iterations >= GPU.floor and "9 runs would get" in plan.why
    hopeless = ge.make_plan(20, slow, GPU, seeds=2)
    assert len(hopeless.runs) == 3 and hopeless.iterations == GPU.floor and "OVER the budget" in hopeless.why
    assert hopeless.predicted_s > 20


def test_one_seed_asked_for_is_not_a_reason():
    plan = ge.make_plan(10_000, [ge.Speed(1, 0.001, 0.1, 1.0)], GPU, seeds=1)
    assert len(plan.runs) == 9 and plan.why == "all that was asked for fits" and plan.at_cap
    assert "(the cap)" in plan.describe(10_000)


def test_the_sweep_order_puts_the_40_percent_triplet_first_and_shares_seeds():
    runs = ge.sweep_runs(2)
    assert len(runs) == 18 and [r.noise for r in runs[:3]] == [0.4] * 3
    assert [r.arm for r in runs[:3]] == ["baseline", "averaging", "gaf"] and {r.seed for r in runs[:9]} == {0}
    assert len({r.name for r in runs}) == 18


def test_the_arms_differ_only_in_the_method_and_the_control_in_tau_alone(tmp_path):
    jpeg = write_jpeg_tar(tmp_path / "c.tar.gz", CIFAR10, 4, 1)
    a = ge.parse_args(["--device", "cpu", "--quick", "--jpeg", str(jpeg)])
    configs = {arm: ge.run_config(a, ge.Run(0.4, arm, 0), 40, "none", 4) for arm in ge.ARMS}
    assert all(c.keys() == configs["gaf"].keys() and c["data"] == configs["gaf"]["data"] for c in configs.values())
    avg, gaf = configs["averaging"]["method"], configs["gaf"]["method"]
    assert {k: v for k, v in avg.items() if k != "tau"} == {k: v for k, v in gaf.items() if k != "tau"}
    assert (avg["tau"], gaf["tau"], avg["merge"], gaf["n_micro"]) == (2.0, 0.97, "mean", 2)
    assert configs["baseline"]["method"] == {"name": "baseline", "batch_size": 128}
    assert configs["gaf"]["train"]["val_every"] == 10
    ge.RunConfig.from_dict(configs["gaf"])  # a valid RunConfig


def test_robust_adds_the_practitioners_arms_each_a_valid_run_named_as_results_name_it(tmp_path):
    jpeg = write_jpeg_tar(tmp_path / "c.tar.gz", CIFAR10, 4, 1)
    assert list(ge.parse_args(["--device", "cpu", "--quick", "--jpeg", str(jpeg)]).arms) == list(ge.ARMS)
    a = ge.parse_args(["--device", "cpu", "--quick", "--jpeg", str(jpeg), "--robust"])
    assert list(a.arms) == [*ge.ARMS, *ge.ROBUST_ARMS] and len(a.arms) == 8
    for arm in a.arms:
        c = ge.run_config(a, ge.Run(0.4, arm, 0), 40, "none", 4)
        validate(ge.RunConfig.from_dict(c))
        row = {"method.name": c["method"]["name"], "method.tau": c["method"].get("tau", math.nan),
               "loss.name": c["loss"]["name"]}
        assert ge.arm_of(row) == arm
    coteaching = ge.run_config(a, ge.Run(0.4, "coteaching", 0), 40, "graph", 4)["train"]
    assert (coteaching["fast"], coteaching["compile"]) == (False, "none")  # its readable path has no graphs
    assert ge.run_config(a, ge.Run(0.4, "gaf_gce", 0), 40, "graph", 4)["train"]["compile"] == "graph"
    plan = ge.make_plan(10_000, [ge.Speed(1, 0.001, 0.1, 1.0)], GPU, seeds=1, arms=a.arms)
    assert len(plan.runs) == 24 and [r.arm for r in plan.runs[:8]] == list(a.arms)


def test_speed_from_a_measurement_reproduces_its_wall_time(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    pd.DataFrame({"iter": range(1, 301), "time_s": [1.5 + 0.01 * i for i in range(300)]}).to_csv(d / "metrics.csv")
    summary = {"iterations": 300, "train_time_s": 4.5, "wall_time_s": 5.0}  # the 200 its after 100: 2.0 s
    got = {"wall_s": 12.0, "summaries": [summary]}
    speed = ge.Speed.measured(1, got, [d], warm=100)
    assert speed.iter_s == pytest.approx((4.5 - 2.5) / 199)
    assert speed.eval_s == pytest.approx(0.5)
    assert speed.wave_s(300, 1) == pytest.approx(12.0)  # the straight line goes through the measurement


def test_graph_capture_only_where_it_equals_eager():
    ok = {"status": "PASS", "figures": {}}
    graph_differs = {"status": "FAIL", "figures": {"fast_vs_gaf_step_state": 3e-7, "fast_vs_gaf_step_momentum": 1e-8}}
    eager_wrong = {"status": "FAIL", "figures": {"fast_vs_gaf_step_state": 0.2, "fast_vs_gaf_step_momentum": 1e-8}}
    assert ge.sweep_compile({"sync-free": ok, "fp32-equal": ok}, "cuda") == "graph"
    assert ge.sweep_compile({"sync-free": ok, "fp32-equal": ok}, "cpu") == "none"
    assert ge.sweep_compile({"sync-free": ok, "fp32-equal": graph_differs}, "cuda") == "none"
    assert ge.sweep_compile({"sync-free": ok, "fp32-equal": eager_wrong}, "cuda") is None
    assert ge.sweep_compile({"sync-free": {"status": "FAIL"}, "fp32-equal": ok}, "cuda") is None


def fake_sweep(monkeypatch, tmp_path, k: int, late: bool) -> tuple[list, list]:
    """gpu_evidence.sweep with launch and write_outputs recorded instead of run."""
    now = time.perf_counter()
    a = SimpleNamespace(t0=now, deadline=now - 1 if late else now + 600, scale=ge.QUICK, jpeg=None, device="cpu",
                        arms=ge.ARMS)
    launched, written = [], []
    monkeypatch.setattr(ge, "launch", lambda a, configs, dirs: launched.append([d.name for d in dirs])
                        or {"images": 10 * len(dirs), "wall_s": 1.0})
    monkeypatch.setattr(ge, "write_outputs", lambda out, work, record, scale: written.append(record["images_seen"]))
    ge.sweep(a, ge.Plan(ge.sweep_runs(1), k, 24, 10.0, "test"), "none", tmp_path, tmp_path / "out", {"images_seen": 0})
    return launched, written


def test_the_sweep_writes_as_each_triplet_completes(monkeypatch, tmp_path):
    launched, written = fake_sweep(monkeypatch, tmp_path, k=1, late=False)
    assert [d for wave in launched for d in wave] == [r.name for r in ge.sweep_runs(1)]
    assert written == [30, 60, 90]
    launched, written = fake_sweep(monkeypatch, tmp_path, k=9, late=False)
    assert len(launched) == 1 and written == [90]


def test_the_sweep_stops_at_the_deadline_and_writes_what_it_has(monkeypatch, tmp_path, capsys):
    launched, written = fake_sweep(monkeypatch, tmp_path, k=1, late=True)
    assert len(launched) == 1 and written == [10]
    assert "FAIL the deadline" in capsys.readouterr().out


def test_graphed_runs_that_fail_fall_back_to_the_eager_fast_step(monkeypatch, tmp_path, capsys):
    def measure(a, work, compile):
        if compile == "graph":
            raise SystemExit("a run failed (exit 1): planted")
        return [ge.Speed(1, 0.01, 0.1, 1.0)]

    monkeypatch.setattr(ge, "measure_speeds", measure)
    a = SimpleNamespace(deadline=time.perf_counter() + 600)
    assert ge.measure_or_fall_back(a, tmp_path, "graph") == ([ge.Speed(1, 0.01, 0.1, 1.0)], "none")
    assert "FAIL the trainer with train.compile=graph: a run failed (exit 1): planted" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="planted"):  # the eager step failing too ends the call
        monkeypatch.setattr(ge, "measure_speeds", lambda a, work, compile: measure(a, work, "graph"))
        ge.measure_or_fall_back(a, tmp_path, "none")


def test_refuses_a_cpu_sweep_and_missing_data(tmp_path, monkeypatch):
    with pytest.raises(SystemExit):
        ge.parse_args(["--device", "cpu"])
    with pytest.raises(SystemExit):
        ge.parse_args(["--device", "cpu", "--quick", "--jpeg", str(tmp_path / "absent.tar.gz")])


# ----------------------------------------------------------------------------- no Hydra on the device


def test_imports_without_hydra(tmp_path):
    code = ("import importlib.util as u, sys; sys.path.insert(0, 'scripts'); "
            "assert u.find_spec('hydra') is None or 'hydra' in sys.modules; "
            "import gpu_evidence; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf') and sys.modules[m]]; "
            "assert not bad, bad; print('imported')")
    blocked = subprocess.run([sys.executable, "-c", "import hydra"], env=no_hydra_env(tmp_path), capture_output=True)
    assert blocked.returncode != 0  # the shim works: hydra cannot be imported
    got = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=no_hydra_env(tmp_path), capture_output=True,
                         text=True)
    assert got.returncode == 0 and "imported" in got.stdout, got.stderr


@pytest.mark.slow
def test_the_dry_run_writes_every_output_in_the_real_format_without_hydra(tmp_path):
    """`make gpu-evidence ARGS="--device cpu --quick"`: the same code path as on a GPU, in a Python
    that cannot import Hydra (its run processes neither), on a tiny JPEG copy in the official layout."""
    jpeg = write_jpeg_tar(tmp_path / "cifar10-jpeg-q75.tar.gz", CIFAR10, 20, 10)
    out = tmp_path / "gpu-small"
    cmd = [sys.executable, "scripts/gpu_evidence.py", "--device", "cpu", "--quick", "--jpeg", str(jpeg),
           "--out", str(out), "--seeds", "1", "--budget-s", "300"]
    got = subprocess.run(cmd, cwd=ROOT, env=no_hydra_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    lines = got.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("PASS ")] == ["sync-free", "fp32-equal"]
    assert sum(line.startswith("speed: ") for line in lines) >= 2 and "| runs | wall (s) |" in got.stdout
    plan = next(line for line in lines if line.startswith("plan: "))
    assert "9 runs" in plan and f"{ge.QUICK.cap} iterations each (the cap)" in plan

    assert {f.name for f in out.iterdir()} == OUTPUTS  # at most 8 files: what the device call brings back
    assert sum(f.stat().st_size for f in out.iterdir()) < ge.MAX_BYTES and not list(out.rglob("*.pt"))

    runs = pd.read_csv(out / "runs.csv")
    assert list(runs.columns[:3 + len(collect.SWEPT + collect.SUMMARY)]) == ["run_id", "experiment", "scale",
                                                                            *collect.SWEPT, *collect.SUMMARY]
    assert len(runs) == 9 and set(runs["status"]) == {"finished"} and set(runs["experiment"]) == {"gpu-small"}
    assert sorted(runs["data.noise"].unique()) == [0.0, 0.4, 0.8] and set(runs["iterations"]) == {ge.QUICK.cap}
    arms = runs.apply(ge.arm_of, axis=1)
    assert sorted(arms.value_counts().to_dict().items()) == [("averaging", 3), ("baseline", 3), ("gaf", 3)]
    evals, curves = pd.read_csv(out / "evals.csv"), pd.read_csv(out / "curves.csv")
    assert {"val_acc", "mem_flipped_noisy_acc"} <= set(evals.columns)
    assert evals.groupby("run_id").size().eq(ge.QUICK.validations).all()
    # averaging and GAF start from the same weights on the same microbatches: the same first distance
    first = curves[curves["iter"] == 1].set_index("run_id")["d_mean"]
    for noise in (0, 40, 80):
        assert first[f"sweep/noise{noise}-averaging-seed0"] == pytest.approx(first[f"sweep/noise{noise}-gaf-seed0"])

    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["experiment"] == "gpu-small" and provenance["n_finished"] == 9
    record = provenance["gpu-small"]
    assert record["card"] == "cpu" and record["torch"] and record["wall_s"] > 0 and record["images_per_s"] > 0
    assert record["plan"]["iterations"] == ge.QUICK.cap and len(record["plan"]["runs"]) == 9
    assert all(s["iter_s"] > 0 for s in record["speeds"]) and record["compile"] == "none"
    assert {r["status"] for r in record["preflight"].values()} == {"PASS"}
    table = (out / "table.md").read_text()
    assert table.count("| 40% |") == 3 and "averaging (tau 2)" in table and "images seen" in table
    assert "| sync-free | PASS |" in (out / "preflight.md").read_text()
    assert not math.isnan(first.iloc[0])
