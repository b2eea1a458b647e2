"""scripts/bench_concurrent.py runs K real training runs at once and reports their total throughput."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_concurrent  # noqa: E402


@pytest.mark.slow
def test_concurrent_runs_are_measured_side_by_side(capsys):
    rows = bench_concurrent.main(["--jobs", "1", "2", "--quick", "device=cpu"])
    assert [r["k"] for r in rows] == [1, 2]
    assert rows[1]["images"] == 2 * rows[0]["images"] == 2 * 40 * 2 * 4 * 10  # iterations x n x m x classes
    assert all(r["wall_s"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| 2 |" in out and "vs one run" in out and "summed loop images/s" in out
    assert all(r["loop_images_per_s"] > 0 for r in rows)


def test_jobs_must_include_one():
    with pytest.raises(SystemExit):
        bench_concurrent.main(["--jobs", "2", "4", "--quick"])


def test_runs_still_going_at_the_limit_are_ended(tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    quick = [sys.executable, "-c", "pass"]
    start = bench_concurrent.time.perf_counter()
    with pytest.raises(SystemExit, match="1 of 2 runs were still going at the 2 s limit"):
        bench_concurrent.launch([quick, sleeper], [tmp_path / "a", tmp_path / "b"], timeout=2)
    assert bench_concurrent.time.perf_counter() - start < 30
