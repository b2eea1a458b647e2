"""hydra/launcher=fused: a sweep's points as fused groups, each an ordinary run equal to the basic launcher's."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["data.noise=0,0.4", "method=averaging,gaf", "seed=0,1", "model=tiny", "data=random", "train.iterations=12",
         "train.val_every=4", "device=cpu", "train.memorisation_samples=20"]


def train(args, tmp_path, *more) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "experiments/train.py", "-m", *args, *more], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_fused_launcher_writes_the_runs_the_basic_one_does(tmp_path):
    fused = train(SWEEP, tmp_path, "hydra/launcher=fused", f"hydra.sweep.dir={tmp_path}/fused")
    basic = train(SWEEP, tmp_path, f"hydra.sweep.dir={tmp_path}/basic")
    assert fused.returncode == 0 and basic.returncode == 0, fused.stderr[-2000:] + basic.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "basic").iterdir() if p.is_dir())
    assert len(runs) == 8 and sorted(p.name for p in (tmp_path / "fused").iterdir() if p.is_dir()) == runs
    for name in runs:
        f, b = tmp_path / "fused" / name, tmp_path / "basic" / name
        assert {p.name for p in f.iterdir()} == {p.name for p in b.iterdir()}  # an ordinary run's files
        fm, bm = pd.read_csv(f / "metrics.csv"), pd.read_csv(b / "metrics.csv")
        assert list(fm["stepped"]) == list(bm["stepped"]) and list(fm["accepted"]) == list(bm["accepted"])
        # fp32: the fused step's grouped kernels sum in another order than one model's
        assert fm["loss"].to_numpy() == pytest.approx(bm["loss"].to_numpy(), abs=1e-4)
        fe, be = pd.read_csv(f / "eval.csv"), pd.read_csv(b / "eval.csv")
        assert fe["val_acc"].to_numpy() == pytest.approx(be["val_acc"].to_numpy(), abs=1e-4)


def test_the_fused_launchers_dry_run_lists_its_groups_and_bad_groups_are_refused_in_one_line(tmp_path):
    got = train(["data.noise=0,0.4", "method=gaf,baseline", "model=tiny", "data=random", "device=cpu"], tmp_path,
                "hydra/launcher=fused", "hydra.launcher.max_fused=1", "dry_run=true")
    assert got.returncode == 0, got.stderr[-2000:]
    assert "fused: 4 groups (at most 1 runs each)" in got.stdout
    got = train(["data.noise=0,0.4", "method=gaf,baseline", "model=tiny", "data=random", "device=cpu"], tmp_path,
                "hydra/launcher=fused", "dry_run=true")
    assert "fused: 2 groups (at most 32 runs each)" in got.stdout  # GAF's microbatches and the baseline's batches
    bad = train(["seed=0,1", "method=coteaching", "model=tiny", "data=random", "device=cpu"], tmp_path,
                "hydra/launcher=fused", f"hydra.sweep.dir={tmp_path}/bad")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: hydra/launcher=fused: a fused group runs method=gaf or baseline with optim=sgd on one device; got "
        "method=coteaching, optim=sgd, distributed=False"]
    assert not (tmp_path / "bad").exists()  # a refused launch makes nothing
