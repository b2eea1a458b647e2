"""scripts/gpu_check.py's dry run on a CPU: the script the GPU runs cannot rot."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_check_on_cpu(tmp_path, capsys):
    results = gpu_check.main(["--device", "cpu", "--quick", "--out-dir", str(tmp_path)])
    assert list(results) == list(gpu_check.CHECKS)
    assert all(r["status"] == "PASS" for r in results.values()), {k: r["detail"] for k, r in results.items()}
    out = capsys.readouterr().out
    assert sum(line.startswith("PASS ") for line in out.splitlines()) == len(gpu_check.CHECKS)
    report = json.loads(next(tmp_path.glob("*-cpu.json")).read_text())
    assert report["environment"]["card"] == "cpu" and set(report["checks"]) == set(gpu_check.CHECKS)
    fp32 = results["fp32-equal"]["figures"]
    assert 0 < fp32["taken"] < fp32["steps"] and fp32["identical_decisions"] == fp32["steps"]
    assert results["speed"]["figures"]["rows"][0]["fast_graph"] > 0
    assert "| fp32-equal | PASS |" in next(tmp_path.glob("*-cpu.md")).read_text()


def test_gpu_check_refuses_unknown_checks_and_cuda_without_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="nope"):
        gpu_check.main(["--device", "cpu", "--only", "nope", "--out-dir", str(tmp_path)])
    if not gpu_check.torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.main(["--device", "cuda"])


def test_a_failing_check_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def broken(ctx):
        raise RuntimeError("planted")

    monkeypatch.setitem(gpu_check.CHECKS, "sync-free", broken)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--device", "cpu", "--quick", "--only", "sync-free", "compile", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "FAIL sync-free" in out and "RuntimeError: planted" in out and "PASS compile" in out


# ----------------------------------------------------------------------------- the preflight on ResNet18


def resnet18_context(tmp_path):
    """The preflight's setting with the sweep's real network, on few images (seconds on a CPU)."""
    ctx = gpu_check.context(gpu_check.parse_args(["--device", "cpu", "--quick", "--out-dir", str(tmp_path)]))
    ctx.model, ctx.classes, ctx.m, ctx.merge = "resnet18", 10, 1, "mean"
    return ctx


@pytest.mark.slow
def test_fp32_equal_passes_on_resnet18_one_step_at_a_time(tmp_path):
    result = gpu_check.check_fp32_equal(resnet18_context(tmp_path))
    f = result["figures"]
    assert result["status"] == "PASS", f
    assert 0 < f["taken"] < f["identical_decisions"] == f["steps"]
    assert f["worst_update"] <= gpu_check.RELATIVE_BOUND and f["worst_skipped_moved"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("bug", ["merge weight", "batchnorm statistic"])
def test_fp32_equal_fails_for_a_planted_bug_in_the_fast_step(tmp_path, monkeypatch, bug):
    import torch

    import gaf.fast

    if bug == "merge weight":  # the aggregate's weights off by 5% (a wrong merge)
        right = gaf.fast.agreement_weights_unchecked

        def wrong(gram, tau, merge):
            weights, accepted, distances = right(gram, tau, merge)
            return weights * torch.linspace(1.05, 0.95, len(weights), dtype=weights.dtype), accepted, distances

        monkeypatch.setattr(gaf.fast, "agreement_weights_unchecked", wrong)
    else:  # one BatchNorm's running variance left as it was before the step
        run = gaf.fast.FastGAFStep._run

        def stale(self, xs, ys):
            norm = [m for m in self.model.modules() if isinstance(m, torch.nn.BatchNorm2d)][3]
            before = norm.running_var.clone()
            out = run(self, xs, ys)
            norm.running_var.copy_(before)
            return out

        monkeypatch.setattr(gaf.fast.FastGAFStep, "_run", stale)
    result = gpu_check.check_fp32_equal(resnet18_context(tmp_path))
    f = result["figures"]
    assert result["status"] == "FAIL"
    worst = f["worst_update"] if bug == "merge weight" else f["worst_batchnorm"]
    assert worst > 100 * gpu_check.RELATIVE_BOUND, f


@pytest.mark.slow
def test_fused_equal_passes_on_tiny_and_fails_for_a_wrong_merge_weight(tmp_path, monkeypatch):
    import torch

    import gaf.fused

    ctx = gpu_check.context(gpu_check.parse_args(["--device", "cpu", "--quick", "--out-dir", str(tmp_path)]))
    ctx.merge = "mean"
    result = gpu_check.check_fused_equal(ctx)
    assert result["status"] == "PASS" and result["figures"]["worst_over_bound"] <= 1, result["figures"]
    right = gaf.fused.agreement_weights_unchecked

    def wrong(gram, tau, merge):
        weights, accepted, distances = right(gram, tau, merge)
        return weights * torch.linspace(1.05, 0.95, weights.shape[-1], dtype=weights.dtype), accepted, distances

    monkeypatch.setattr(gaf.fused, "agreement_weights_unchecked", wrong)
    assert gpu_check.check_fused_equal(ctx)["figures"]["worst_over_bound"] > 100

