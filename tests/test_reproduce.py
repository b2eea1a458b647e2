"""A short SCALE=tiny slice of `make reproduce`: a preset's sweep and its baseline, collected and plotted.

It brings its own data, so it runs the same on a clone without ../shared: a CIFAR-10 JPEG
copy in the official layout (10 classes, 20 + 10 images per class, the runs shortened to
take that many) as the offline copy ($GAF_OFFLINE_DATA), an empty data.root, and downloads
that fail (no network: conftest points them at a closed loopback port). The tiny scale must
find its data in that order and say where it came from."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from cifar_fixtures import write_jpeg_tar

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.slow
def test_tiny_slice_of_reproduce_end_to_end(tmp_path):
    offline = tmp_path / "offline"
    write_jpeg_tar(offline / "cifar10-jpeg" / "cifar10-jpeg-q75.tar.gz", CLASSES, n_train=20, n_test=10)
    (tmp_path / "data").mkdir()
    env = {**os.environ, "CI": "true", "MPLBACKEND": "Agg", "GAF_OFFLINE_DATA": str(offline)}
    cmd = [sys.executable, str(ROOT / "scripts/reproduce.py"), "--scale", "tiny", "--only", "fig9",
           "--out", str(tmp_path), "train.iterations=4", "train.val_every=2", "train.progress=false",
           "data.train_per_class=20", "data.test_per_class=10", "train.memorisation_samples=20",
           f"data.root={tmp_path / 'data'}"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = pd.read_csv(tmp_path / "results/fig9/runs.csv")
    assert sorted(runs.loc[runs["method.name"] == "gaf", "method.n_micro"]) == [2, 4]  # the tiny grid (fig9.yaml)
    assert (runs["method.name"] == "baseline").sum() == 1
    assert set(runs["status"]) == {"finished"} and set(runs["scale"]) == {"custom"}  # shortened: not the tiny scale
    # Every result names what stood in and where it came from: the offline copy, after
    # data.root and a download were tried.
    assert runs["data_note"].str.contains("substituted the CIFAR-10 JPEG copy").all()
    assert runs["data_note"].str.contains(f"from {offline}/cifar10-jpeg/cifar10-jpeg-q75.tar.gz (the offline copy)",
                                          regex=False).all()
    for suffix in ("png", "pdf"):
        assert (tmp_path / f"results/fig9/fig9.{suffix}").stat().st_size > 0
    provenance = json.loads((tmp_path / "results/fig9/provenance.json").read_text())
    assert "reproduce.py --scale tiny" in provenance["command"]
    # Re-launching skips every finished run (one run at a time: the trainer skips it, whichever launcher;
    # the first launch went through reproduce.py's default, joblib with a run per core).
    again = subprocess.run(cmd + ["--no-plot", "--jobs", "1"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=900, env=env)
    assert again.returncode == 0 and again.stdout.count("nothing to do") == 3, again.stdout[-3000:]


@pytest.mark.data_sources
def test_reproduce_without_any_data_source_stops_at_once_with_one_error(tmp_path):
    env = {**os.environ, "CI": "true", "GAF_OFFLINE_DATA": str(tmp_path / "empty")}
    (tmp_path / "data").mkdir()
    cmd = [sys.executable, str(ROOT / "scripts/reproduce.py"), "--scale", "tiny", "--only", "fig9", "--out",
           str(tmp_path), f"data.root={tmp_path / 'data'}"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "CIFAR-10 not found" in errors[0] and "download of cifar-10-python.tar.gz" in errors[0]
    assert "offline copy" in errors[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()  # nothing launched


def load_reproduce():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import reproduce
    finally:
        sys.path.pop(0)
    return reproduce


def test_runs_on_a_cpu_take_one_core_each_and_sweeps_one_point_per_core(tmp_path, monkeypatch):
    reproduce = load_reproduce()
    calls = []
    monkeypatch.setattr(reproduce.subprocess, "run",
                        lambda cmd, cwd, env: calls.append((cmd, env)) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(reproduce.os, "cpu_count", lambda: 8)
    assert reproduce.default_jobs(["device=cpu"]) == 8
    assert reproduce.default_jobs(["device=cuda"]) == 1  # a GPU run speeds up its own step instead
    reproduce.launch("fig6", [], True, "tiny", 4, ["train.progress=true"], tmp_path)
    reproduce.launch("fig7", ["method=baseline"], False, "tiny", 4, [], tmp_path)
    reproduce.launch("fig9", [], True, "tiny", 1, [], tmp_path)
    (sweep, sweep_env), (single, single_env), (serial, serial_env) = calls
    assert "hydra/launcher=joblib" in sweep and "hydra.launcher.n_jobs=4" in sweep
    assert sweep_env["OMP_NUM_THREADS"] == "2"  # 8 cores shared by 4 runs
    assert [a for a in sweep if a.startswith("train.progress=")] == ["train.progress=true"]  # the caller's, once
    assert single_env["OMP_NUM_THREADS"] == "2" and not any("launcher" in a for a in single)  # the same share
    assert serial_env is None and not any("launcher" in a for a in serial)  # jobs = 1: torch's own default


def test_a_job_count_below_one_is_refused_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        load_reproduce().main(["--scale", "tiny", "--jobs", "0", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and "--jobs must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is made


RUNS_AT_SCALE = {"tiny": 48, "small": 150, "paper": 150, "gpu": 90}


@functools.cache
def planned_at(scale: str) -> tuple[list, list[str], list]:
    """reproduce.py's launches at a scale and its check of every point: (launches, errors, [(RunConfig,
    folder)]), composed once per test module (every point is a Hydra composition)."""
    reproduce = load_reproduce()
    launches = reproduce.plan(scale, None)
    errors, planned = reproduce.check_plan(launches, scale, [], show=False)
    return launches, errors, planned


@pytest.mark.parametrize("scale", sorted(p.stem for p in (ROOT / "configs/scale").glob("*.yaml")))
def test_every_presets_declared_launches_compose_and_validate(scale):
    """Every scale file is a scale reproduce.py runs, and what it runs is what the presets declare
    (their `launches`), every point valid; the gpu scale is made for experiment=gpu_small alone
    (configs/scale/gpu.yaml: scale_for)."""
    reproduce = load_reproduce()
    assert scale in reproduce.SCALES and scale in RUNS_AT_SCALE, f"a new scale: say how many runs {scale} makes"
    runs = RUNS_AT_SCALE[scale]
    launches, errors, planned = planned_at(scale)
    presets = {path.stem for path in (ROOT / "configs/experiment").glob("*.yaml")} - {"smoke", "gpu_small"}
    expected = {"gpu_small"} if scale == "gpu" else presets - ({"table1"} if scale == "tiny" else set())
    assert {preset for preset, _, _ in launches} == expected
    presets |= {"gpu_small"}
    configs = [rc for rc, _ in planned]
    assert errors == [] and len(configs) == runs
    assert {c.scale for c in configs} == {scale} and all(c.experiment in presets for c in configs)


def test_the_committed_tiny_results_are_the_runs_reproduce_makes_at_tiny():
    """results/'s tiny rows: per preset, as many finished runs as `make reproduce SCALE=tiny` plans."""
    _, _, planned = planned_at("tiny")
    runs = pd.concat([pd.read_csv(p) for p in sorted((ROOT / "results").glob("*/runs.csv"))])
    tiny = runs[runs["scale"] == "tiny"]
    if tiny.empty:
        pytest.skip("no committed tiny results in this checkout")
    assert set(tiny["status"]) == {"finished"}
    assert tiny["experiment"].value_counts().to_dict() == pd.Series([rc.experiment for rc, _ in planned]).value_counts().to_dict()


@pytest.mark.parametrize("entry, message", [
    ("{multirun: true, scale: [tiny]}", "figx.yaml: launches[0] must be a mapping of multirun, overrides, scales"),
    ("{scales: [huge]}", "figx.yaml: launches[0].scales: ['huge'] are not scales; allowed: gpu, paper, small, tiny"),
])
def test_a_malformed_launch_is_one_error_naming_it(tmp_path, entry, message):
    (tmp_path / "figx.yaml").write_text(f"launches:\n  - {entry}\n")
    with pytest.raises(ValueError) as e:
        load_reproduce().declared_launches(tmp_path / "figx.yaml")
    assert str(e.value).startswith(message)
