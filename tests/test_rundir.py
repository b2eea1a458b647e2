"""The run directory: one owner at a time (a lock file), and files that cannot be read named."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gaf.rundir import RunDirError, RunDirLock, run_status
from gaf.train import run
from test_train import read_csv, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY = {"data": {"name": "random", "random_train": 200, "random_test": 50, "num_classes": 5},
        "model": {"name": "tiny"}, "method": {"name": "gaf", "n_micro": 3, "per_class": 2},
        "train": {"iterations": 20, "val_every": 5, "memorisation_samples": 100, "progress": False},
        "device": "cpu"}


def python(code: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


HOLD = """
import sys, time
from gaf.rundir import RunDirLock
RunDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_live_owner_is_named_and_a_dead_ones_lock_is_taken_over(tmp_path):
    owner = python(HOLD, tmp_path)
    try:
        assert owner.stdout.readline().strip() == "locked", owner.stderr.read()
        with pytest.raises(RunDirError, match=f"in use by pid {owner.pid} on {socket.gethostname()}; wait"):
            run(tiny_config(), tmp_path)
        assert not (tmp_path / "metrics.csv").exists() and not (tmp_path / "summary.json").exists()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert (tmp_path / "run.lock").read_text().split() == [str(owner.pid), socket.gethostname()]  # stale
    assert run(tiny_config(), tmp_path)["status"] == "finished"
    assert not (tmp_path / "run.lock").exists()


def test_a_lock_written_on_another_host_is_refused(tmp_path):
    (tmp_path / "run.lock").write_text("4242 some-other-host\n")
    with pytest.raises(RunDirError, match=r"locked by pid 4242 on some-other-host \(another host.*delete"):
        run(tiny_config(), tmp_path)


LAUNCH = """
import json, sys, time
from pathlib import Path
from gaf.config import RunConfig
from gaf.rundir import RunDirError
from gaf.train import run
cfg = RunConfig.from_dict(json.loads(sys.argv[2]))
Path(sys.argv[3]).touch()
while not Path(sys.argv[4]).exists():
    time.sleep(0.005)
try:
    print(run(cfg, sys.argv[1])["status"])
except RunDirError as e:
    print("refused:", e)
"""


def test_two_launches_at_once_train_once(tmp_path):
    run_dir, go = tmp_path / "run", tmp_path / "go"
    launches = [python(LAUNCH, run_dir, json.dumps(TINY), tmp_path / f"ready{i}", go) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # both call run() within milliseconds
    outs = [p.communicate(timeout=300) for p in launches]
    said = sorted(out.strip() for out, _ in outs)
    assert said[0] == "finished" and said[1].startswith("refused: run directory"), outs
    assert [int(r["iter"]) for r in read_csv(run_dir / "metrics.csv")] == list(range(1, 21))
    assert [int(r["iter"]) for r in read_csv(run_dir / "eval.csv")] == [5, 10, 15, 20]


def test_a_checkpoint_lacking_keys_is_named(tmp_path):
    run(tiny_config(train={"stop_after": 2}), tmp_path)
    torch.save({"model": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(RunDirError, match=r"checkpoint .*checkpoint.pt is not one of this trainer's \(it lacks "
                                          r"config, state, optimizer.*delete it"):
        run(tiny_config(train={"stop_after": 2}), tmp_path)


@pytest.mark.parametrize("name, text", [("summary.json", '{"status": "runn'), ("summary.json", "[1, 2]"),
                                        ("metrics.csv", "iter,loss\nabc,1\n"), ("eval.csv", "nothing here\n1\n")])
def test_a_corrupt_file_of_a_resumed_run_is_named(tmp_path, name, text):
    run(tiny_config(train={"stop_after": 3}), tmp_path)
    (tmp_path / name).write_text(text)
    with pytest.raises(RunDirError, match=f"{tmp_path / name} (is corrupt|is not a run summary).*delete"):
        run(tiny_config(), tmp_path)


def test_a_running_summary_whose_owner_died_reads_as_interrupted(tmp_path):
    """SIGKILL leaves summary.json at "running" and run.lock unheld: collect and show_run say "interrupted";
    while the owner lives it is "running"; a lock written on another host cannot be checked: "running"."""
    summary = {"status": "running"}
    assert run_status(tmp_path, summary) == "interrupted"  # no lock file at all
    owner = python(HOLD, tmp_path)
    try:
        assert owner.stdout.readline().strip() == "locked", owner.stderr.read()
        assert run_status(tmp_path, summary) == "running"
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert (tmp_path / "run.lock").exists() and run_status(tmp_path, summary) == "interrupted"
    (tmp_path / "run.lock").write_text("4242 some-other-host\n")
    assert run_status(tmp_path, summary) == "running"
    assert run_status(tmp_path, {"status": "finished"}) == "finished"


READ_WITHOUT_TORCH = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import show_run
from gaf.report import collect
from gaf.rundir import RunDirLock, read_json, run_status
run_dir = Path(sys.argv[1])
assert run_status(run_dir, read_json(run_dir / "summary.json")) == "interrupted"  # running, but no lock held
assert not RunDirLock(run_dir).held()
assert show_run.read_run(run_dir)["status"] == "interrupted"
assert "torch" not in sys.modules, "torch was imported"
"""


def test_run_files_are_read_without_torch(tmp_path):
    """gaf.report.collect and show_run.py read summaries and run status through gaf.rundir, which needs no torch."""
    (tmp_path / "summary.json").write_text(json.dumps({"status": "running", "config": {}}))
    reader = python(READ_WITHOUT_TORCH, tmp_path, ROOT / "scripts")
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
