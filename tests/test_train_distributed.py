"""The trainer under torchrun (gloo, CPU): K ranks take the step one process takes with n = K."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["data=random", "data.random_train=120", "data.random_test=30", "data.num_classes=5", "model=tiny",
          "train.iterations=6", "train.val_every=3", "train.memorisation_samples=40", "device=cpu", "seed=3"]
GAF = ["method.per_class=2", "method.tau=0.55"]


def launch(args, run_dir, nproc=None):
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    cmd = head + [str(ROOT / "experiments/train.py"), *args, f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("k, settings, mode", [
    (2, [*GAF, "method.n_micro=2"], []),
    (3, [*GAF, "method.n_micro=3"], ["dist_mode=allgather"]),
    # a robust loss too (its distances want another tau to both take and refuse steps)
    (2, ["method.per_class=2", "method.tau=0.95", "method.n_micro=2", "loss=sce"], [])])
def test_torchrun_equals_one_process(tmp_path, k, settings, mode):
    single, dist = tmp_path / "single", tmp_path / "dist"
    launch(COMMON + settings, single)
    launch(COMMON + settings + mode + ["distributed=true"], dist, nproc=k)
    a = torch.load(single / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(dist / "checkpoint.pt", weights_only=False)["model"]
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5, msg=key)
    m1, m2 = rows(single / "metrics.csv"), rows(dist / "metrics.csv")
    assert [r["stepped"] for r in m1] == [r["stepped"] for r in m2]
    assert {r["stepped"] for r in m1} == {"0", "1"}, "the comparison should see both taken and skipped steps"
    for r1, r2 in zip(m1, m2):
        assert float(r1["d_mean"]) == pytest.approx(float(r2["d_mean"]), abs=1e-5)
    summary = json.loads((dist / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["config"]["distributed"] is True


@pytest.mark.slow
def test_torchrun_run_killed_and_relaunched_resumes(tmp_path):
    args = COMMON + GAF + ["method.n_micro=2", "distributed=true"]
    launch(args, tmp_path / "unbroken", nproc=2)
    launch(args + ["train.stop_after=4"], tmp_path / "broken", nproc=2)  # between checkpoints 3 and 6
    out = launch(args, tmp_path / "broken", nproc=2)
    assert "resuming at iteration 3" in out.stdout + out.stderr
    drop_time = lambda rows_: [{k: v for k, v in r.items() if k != "time_s"} for r in rows_]  # noqa: E731
    for name in ("metrics.csv", "eval.csv"):
        assert drop_time(rows(tmp_path / "broken" / name)) == drop_time(rows(tmp_path / "unbroken" / name))
    a = torch.load(tmp_path / "unbroken/checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "broken/checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_baseline_averages_the_ranks_batchnorm_statistics(tmp_path):
    """The baseline all-reduces one gradient with per-rank BatchNorm statistics (DDP, not
    one process), and the running statistics are the ranks' average. After one step the
    first BatchNorm layer has seen the same inputs on both sides, so its running mean is
    the single-process one exactly when the ranks' means are averaged (rank 0's alone,
    their sum or a sequential merge all differ); the second layer's is not (each rank
    normalised its own half). The replica check at the validation passes either way:
    these errors are the same on every rank. tests/test_distributed.py checks every
    buffer over several steps against DDP emulated in one process."""
    args = COMMON + ["method=baseline", "method.batch_size=20", "train.iterations=1", "train.val_every=1"]
    single, dist = tmp_path / "single", tmp_path / "dist"
    launch(args + ["distributed=true"], dist, nproc=2)
    launch(args, single)
    summary = json.loads((dist / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["images_seen"] == 20
    assert len(rows(dist / "eval.csv")) == 1
    a = torch.load(single / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(dist / "checkpoint.pt", weights_only=False)["model"]
    assert [k for k in b if k.endswith("num_batches_tracked")] and \
        all(int(b[k]) == 1 for k in b if k.endswith("num_batches_tracked"))
    torch.testing.assert_close(b["1.running_mean"], a["1.running_mean"], atol=1e-6, rtol=1e-5)
    assert (b["5.running_mean"] - a["5.running_mean"]).abs().max() > 1e-6


@pytest.mark.slow
def test_torchrun_refuses_n_not_divisible_by_ranks(tmp_path):
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "experiments/train.py"), *COMMON, *GAF, "method.n_micro=3", "distributed=true",
                          f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0
    assert "method.n_micro=3 must be a multiple of the number of ranks (2)" in out.stderr + out.stdout
