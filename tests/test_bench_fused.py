"""scripts/bench_fused.py's dry run on a CPU: the benchmark a GPU call runs cannot rot."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_fused  # noqa: E402


def test_the_three_ways_of_running_k_members_are_measured_side_by_side(capsys):
    rows = bench_fused.main(["--device", "cpu", "--quick", "--k", "1", "2", "--kinds", "gaf", "baseline"])
    assert [(r["kind"], r["k"]) for r in rows] == [("gaf", 1), ("gaf", 2), ("baseline", 1), ("baseline", 2)]
    assert all(r[c] > 0 for r in rows for c in ("processes", "separate", "fused"))
    out = capsys.readouterr().out
    assert "| kind | K | processes | separate | fused | fused / processes | fused / separate |" in out
    assert "n x b: gaf 2 x 10, baseline 1 x 16" in out


def test_a_fused_member_starts_where_a_separate_run_of_its_seed_starts():
    a = bench_fused.parse_args(["--device", "cpu", "--quick"])
    fused_models, xs, _ = bench_fused.members(a, "gaf", 3)
    alone, xs1, _ = bench_fused.members(a, "gaf", 1, seed=2)
    assert all((p == q).all() for p, q in zip(fused_models[2].parameters(), alone[0].parameters()))
    assert xs.shape[1:4] == (3, 2, 10) and xs1.shape[1:4] == (1, 2, 10)


def test_on_a_gpu_it_measures_k_1_3_9_18_of_both_kinds_on_resnet18():
    a = bench_fused.parse_args(["--device", "cuda"])  # parsing only: main() checks that CUDA exists
    assert (a.k, a.kinds, a.model, a.steps) == ([1, 3, 9, 18], ["gaf", "baseline"], "resnet18", 100)
    assert [bench_fused.shape(a, kind) for kind in a.kinds] == [(2, 100), (1, 128)]


@pytest.mark.parametrize("args, line", [
    (["--k", "3", "0"], "error: --k takes group sizes >= 1, got 3 0"),
    (["--steps", "0"], "error: --steps takes a number of timed steps >= 1, got 0"),
    (["--k", "two"], "error: argument --k: invalid int value: 'two'"),
])
def test_bad_values_are_refused_in_one_line_naming_the_option(args, line, capsys):
    with pytest.raises(SystemExit) as e:
        bench_fused.parse_args(["--device", "cpu", "--quick", *args])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(line)
