"""A short SCALE=tiny slice of `make reproduce`: a preset's sweep and its baseline, collected and plotted."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
JPEG = ROOT.parent / "shared/data/cifar10-jpeg/cifar10-jpeg-q75.tar.gz"


@pytest.mark.slow
def test_tiny_slice_of_reproduce_end_to_end(tmp_path):
    data = [f"data.jpeg_path={JPEG}"] if JPEG.exists() else ["data.fallback=random"]
    cmd = [sys.executable, str(ROOT / "scripts/reproduce.py"), "--scale", "tiny", "--only", "fig9",
           "--out", str(tmp_path), "train.iterations=4", "train.val_every=2", "train.progress=false", *data]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={"CI": "true", "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = pd.read_csv(tmp_path / "results/fig9/runs.csv")
    assert sorted(runs.loc[runs["method.name"] == "gaf", "method.n_micro"]) == [2, 4, 10]
    assert (runs["method.name"] == "baseline").sum() == 1
    assert set(runs["status"]) == {"finished"} and set(runs["scale"]) == {"tiny"}
    assert runs["data_note"].str.contains("substituted").all()  # CIFAR-100 is absent here, and says so
    for suffix in ("png", "pdf"):
        assert (tmp_path / f"results/fig9/fig9.{suffix}").stat().st_size > 0
    provenance = json.loads((tmp_path / "results/fig9/provenance.json").read_text())
    assert "reproduce.py --scale tiny" in provenance["command"]
    # Re-launching skips every finished run.
    again = subprocess.run(cmd + ["--no-plot"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                           env={"CI": "true", "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"})
    assert again.returncode == 0 and again.stdout.count("nothing to do") == 4, again.stdout[-3000:]
