"""hydra/launcher=fused: a sweep's points as fused groups, each an ordinary run equal to the basic launcher's."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra import initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import launch  # noqa: E402
# Eight points, two fused groups of four (hydra.launcher.max_fused=4), each member its own noise, tau and
# seed; a small random data set (4 classes of 20 images) and a few iterations: seconds per run.
SWEEP = ["data.noise=0,0.4", "method=averaging,gaf", "seed=0,1", "model=tiny", "data=random", "data.num_classes=4",
         "data.random_train=80", "data.random_test=40", "train.iterations=4", "train.val_every=2", "device=cpu",
         "train.memorisation_samples=20"]


def train(args, tmp_path, *more) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "experiments/train.py", "-m", *args, *more], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_fused_launcher_writes_the_runs_the_basic_one_does(tmp_path):
    fused = train(SWEEP, tmp_path, "hydra/launcher=fused", "hydra.launcher.max_fused=4",
                  f"hydra.sweep.dir={tmp_path}/fused")
    basic = train(SWEEP, tmp_path, f"hydra.sweep.dir={tmp_path}/basic")
    assert fused.returncode == 0 and basic.returncode == 0, fused.stderr[-2000:] + basic.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "basic").iterdir() if p.is_dir())
    assert len(runs) == 8 and sorted(p.name for p in (tmp_path / "fused").iterdir() if p.is_dir()) == runs
    assert fused.stdout.count("fused group of 4: ") == 2, fused.stdout[-2000:]
    for name in runs:
        f, b = tmp_path / "fused" / name, tmp_path / "basic" / name
        assert {p.name for p in f.iterdir()} == {p.name for p in b.iterdir()}  # an ordinary run's files
        fm, bm = pd.read_csv(f / "metrics.csv"), pd.read_csv(b / "metrics.csv")
        assert list(fm["stepped"]) == list(bm["stepped"]) and list(fm["accepted"]) == list(bm["accepted"])
        # fp32: the fused step's grouped kernels sum in another order than one model's
        assert fm["loss"].to_numpy() == pytest.approx(bm["loss"].to_numpy(), abs=1e-4)
        fe, be = pd.read_csv(f / "eval.csv"), pd.read_csv(b / "eval.csv")
        assert fe["val_acc"].to_numpy() == pytest.approx(be["val_acc"].to_numpy(), abs=1e-4)
        logs = (f / "train.log").read_text(), (b / "train.log").read_text()
        assert all("iteration 4/4: val acc" in text for text in logs)  # its own log, as under the basic one
        assert not any(other in logs[0] for other in runs if other != name)


def test_the_fused_launchers_dry_run_lists_its_groups_and_bad_groups_are_refused_in_one_line(tmp_path):
    got = train(["data.noise=0,0.4", "method=gaf,baseline", "model=tiny", "data=random", "device=cpu"], tmp_path,
                "hydra/launcher=fused", "dry_run=true")
    assert got.returncode == 0, got.stderr[-2000:]
    assert "fused: 2 groups (at most 32 runs each)" in got.stdout  # GAF's microbatches and the baseline's batches
    # hydra.launcher.max_fused splits them: the same function the dry run above listed its groups with
    points = [[f"data.noise={noise}", f"method={method}", "model=tiny", "data=random", "device=cpu"]
              for noise in ("0", "0.4") for method in ("gaf", "baseline")]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        assert launch.fused_groups(points, 1) == [[0], [2], [1], [3]]  # GAF's split, then the baseline's
        assert launch.fused_groups(points, 32) == [[0, 2], [1, 3]]
    bad = train(["seed=0,1", "method=coteaching", "model=tiny", "data=random", "device=cpu"], tmp_path,
                "hydra/launcher=fused", f"hydra.sweep.dir={tmp_path}/bad")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: hydra/launcher=fused: a fused group runs method=gaf or baseline with optim=sgd on one device; got "
        "method=coteaching, optim=sgd, distributed=False"]
    assert not (tmp_path / "bad").exists()  # a refused launch makes nothing


# A group of seconds on CPU: 3 members, 4 classes of 20 images, checkpoints every 5 of 60 iterations.
SMALL = ["seed=0,1,2", "method=gaf", "model=tiny", "data=random", "data.num_classes=4", "data.random_train=80",
         "data.random_test=40", "method.per_class=2", "method.n_micro=3", "train.iterations=60", "train.val_every=5",
         "train.memorisation_samples=20", "device=cpu", "hydra/launcher=fused"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # the unbroken and the killed group sum alike
TIMING = ("wall_time_s", "images_per_s", "train_time_s", "started_at", "finished_at", "versions")


def numbers(run_dir: Path) -> str:
    """What a run computed: its metrics and eval rows and its summary, timing fields excluded (as JSON:
    every float to its last bit, and NaN equal to NaN)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return json.dumps([pd.read_csv(run_dir / "metrics.csv").drop(columns="time_s").to_dict("list"),
                       pd.read_csv(run_dir / "eval.csv").drop(columns="time_s").to_dict("list"),
                       {k: v for k, v in summary.items() if k not in TIMING}], sort_keys=True)


def first_checkpoint(sweep: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until some member of the group has written a checkpoint (the group still running)."""
    deadline = time.monotonic() + timeout
    while not any(sweep.glob("*/checkpoint.pt")):
        assert proc.poll() is None, f"the group ended (exit {proc.returncode}) before a checkpoint was seen"
        assert time.monotonic() < deadline, "no checkpoint within the timeout"
        time.sleep(0.01)


@pytest.mark.slow
def test_a_group_killed_mid_way_and_relaunched_writes_the_files_of_an_unbroken_group(tmp_path):
    unbroken = subprocess.run([sys.executable, "experiments/train.py", "-m", *SMALL,
                               f"hydra.sweep.dir={tmp_path}/unbroken"], cwd=ROOT, env=ONE_THREAD,
                              capture_output=True, text=True, timeout=600)
    assert unbroken.returncode == 0, unbroken.stderr[-2000:]
    argv = [sys.executable, "experiments/train.py", "-m", *SMALL, f"hydra.sweep.dir={tmp_path}/killed"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first_checkpoint(tmp_path / "killed", proc)
    finally:
        proc.kill()  # SIGKILL: no handler runs, files stay as the kill found them
        proc.wait()
    runs = sorted(p.name for p in (tmp_path / "unbroken").iterdir() if p.is_dir())
    killed = [json.loads((tmp_path / "killed" / name / "summary.json").read_text())["status"] for name in runs]
    assert "running" in killed  # killed mid-group: some member had not finished
    relaunch = subprocess.run(argv, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert relaunch.returncode == 0, relaunch.stderr[-2000:]
    assert "resuming at iteration" in relaunch.stderr + relaunch.stdout
    for name in runs:
        assert numbers(tmp_path / "killed" / name) == numbers(tmp_path / "unbroken" / name), name


@pytest.mark.slow
def test_sigterm_stops_a_fused_sweep_as_it_stops_one_run(tmp_path):
    """Exit 143, every member checkpointed and its summary stopped by SIGTERM, no lock left."""
    proc = subprocess.Popen([sys.executable, "experiments/train.py", "-m", *SMALL, f"hydra.sweep.dir={tmp_path}"],
                            cwd=ROOT, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first_checkpoint(tmp_path, proc)
        proc.terminate()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    summaries = [json.loads((d / "summary.json").read_text()) for d in runs]
    assert len(runs) == 3 and {(s["status"], s["stopped_by"]) for s in summaries} == {("stopped", "SIGTERM")}
    assert all((d / "checkpoint.pt").exists() and not (d / "run.lock").exists() for d in runs)



@pytest.mark.slow
def test_the_fused_launchers_jobs_are_numbered_composed_and_listed_as_the_basic_launchers(tmp_path):
    """Its own job loop (Hydra's public helpers) does what Hydra's basic launcher does per job: the
    same job (id, num, overrides, folder), the same config, the same listing of the points."""
    sweep = ["seed=0,1", "method.per_class=2,3", "method=gaf", "model=tiny", "data=random", "data.num_classes=4",
             "data.random_train=80", "data.random_test=40", "method.n_micro=3", "train.iterations=4",
             "train.val_every=2", "train.memorisation_samples=20", "device=cpu"]
    fused = train(sweep, tmp_path, "hydra/launcher=fused", f"hydra.sweep.dir={tmp_path}/fused")
    basic = train(sweep, tmp_path, f"hydra.sweep.dir={tmp_path}/basic")
    assert fused.returncode == 0 and basic.returncode == 0, fused.stderr[-2000:] + basic.stderr[-2000:]
    listing = [[line.split("]", 2)[-1] for line in out.stdout.splitlines() if "Launching" in line or "\t#" in line]
               for out in (fused, basic)]
    assert listing[0] == listing[1] and len(listing[0]) == 5
    runs = sorted(p.name for p in (tmp_path / "basic").iterdir() if p.is_dir())
    assert len(runs) == 4 and sorted(p.name for p in (tmp_path / "fused").iterdir() if p.is_dir()) == runs
    for name in runs:
        got = [job_files(tmp_path / kind, name) for kind in ("fused", "basic")]
        assert got[0] == got[1], name
    assert sorted(job_files(tmp_path / "fused", name)[0]["num"] for name in runs) == [0, 1, 2, 3]


def job_files(sweep: Path, name: str) -> tuple:
    """A sweep job's .hydra/ record, its sweep folder left out: (hydra.job, its output folder, its
    overrides, its config)."""
    hydra = OmegaConf.load(sweep / name / ".hydra" / "hydra.yaml").hydra
    return (OmegaConf.to_container(hydra.job), str(Path(hydra.runtime.output_dir).relative_to(sweep)),
            (sweep / name / ".hydra" / "overrides.yaml").read_text(), (sweep / name / ".hydra" / "config.yaml").read_text())
