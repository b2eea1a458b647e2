"""optim.schedule: the lr a run steps with, per iteration, on every path, and across a resume.

plateau (the default) is ReduceLROnPlateau exactly as before (its resume:
tests/test_train_bookkeeping.py); cosine sets lr * 0.5 * (1 + cos(pi (t - 1) / T)) before
step t, read back here from the run's own metrics.csv.
"""

import math

import pytest
import torch
from torch import nn

from gaf.config import RunConfig, validate
from gaf.fast import FastPlainStep, StandInGraphs
from gaf.optim import build_optimizer
from gaf.schedule import CosineSchedule, PlateauSchedule, build_schedule, cosine_lr
from gaf.step import PlainStep
from gaf.train import run
from run_files import read_csv, tiny_config, without_times

LR, ITERATIONS = 0.05, 20
COSINE = dict(optim={"lr": LR, "schedule": "cosine"}, train={"iterations": ITERATIONS, "val_every": 5})
COTEACHING = {"name": "coteaching", "batch_size": 20, "forget_rate": 0.3, "ramp_epochs": 0.5}


def expected_lr(t: int) -> float:
    return LR * 0.5 * (1 + math.cos(math.pi * (t - 1) / ITERATIONS))


def lrs(run_dir, name="metrics.csv") -> dict[int, float]:
    return {int(r["iter"]): float(r["lr"]) for r in read_csv(run_dir / name)}


def cosine_config(**sections):
    merged = {k: {**COSINE.get(k, {}), **sections.get(k, {})} for k in ("optim", "train")}
    return tiny_config(**{**sections, **merged})


# --------------------------------------------------------------------------- the schedule alone


def test_cosine_lr_is_the_formula_from_the_full_lr_down_to_near_zero():
    values = [cosine_lr(LR, t, ITERATIONS) for t in range(1, ITERATIONS + 1)]
    assert values[0] == LR and values == [expected_lr(t) for t in range(1, ITERATIONS + 1)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert 0 < values[-1] < LR * 0.01 and cosine_lr(LR, 11, 20) == pytest.approx(LR / 2)


def test_plateau_schedule_is_reduce_lr_on_plateau_and_checkpoints_its_state_dict():
    """The same lr as torch's scheduler for the same validation losses; before_step never
    touches the lr; the checkpointed state is ReduceLROnPlateau's own (the format of old checkpoints)."""
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    ours_opt, ref_opt = torch.optim.SGD([p], lr=0.1), torch.optim.SGD([q], lr=0.1)
    ours = build_schedule("plateau", ours_opt, lr=0.1, iterations=10, plateau_factor=0.5, plateau_patience=1)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, mode="min", factor=0.5, patience=1)
    assert isinstance(ours, PlateauSchedule)
    for it, loss in enumerate([3.0, 2.0, 2.5, 2.5, 2.5, 1.0, 1.5, 1.5], start=1):
        ours.before_step(it)
        assert ours_opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
        ours.after_validation(loss)
        ref.step(loss)
    assert ours_opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] < 0.1 / 3
    assert ours.state_dict() == ref.state_dict()
    again = build_schedule("plateau", torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), lr=0.1,
                           iterations=10, plateau_factor=0.5, plateau_patience=1)
    again.load_state_dict(ref.state_dict())
    assert again.state_dict() == ref.state_dict()


def test_cosine_schedule_sets_every_group_and_refuses_iterations_outside_it():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 1.0}], lr=LR)
    schedule = build_schedule("cosine", opt, lr=LR, iterations=ITERATIONS)
    assert isinstance(schedule, CosineSchedule) and schedule.state_dict() == {}
    schedule.before_step(4)
    assert [g["lr"] for g in opt.param_groups] == [expected_lr(4)] * 2
    schedule.after_validation(1.0)  # the loss changes nothing
    assert opt.param_groups[0]["lr"] == expected_lr(4)
    for it in (0, ITERATIONS + 1):
        with pytest.raises(ValueError, match="outside the schedule's 1..20"):
            schedule.before_step(it)
    with pytest.raises(ValueError, match="unknown schedule 'foo'"):
        build_schedule("foo", opt, lr=LR, iterations=ITERATIONS)


def test_the_fast_stepper_steps_with_each_iterations_lr_without_recapture():
    """A graphed fast step (stand-in graphs on CPU) under the cosine schedule: the device lr its
    captured update reads is the scheduled lr at every iteration, one capture serves them all,
    and the weights are the eager torch.optim step's under the same schedule."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    ref_model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    ref_model.load_state_dict(model.state_dict())
    opt = build_optimizer("sgd", model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=1e-2,
                          masked=True)
    ref_opt = build_optimizer("sgd", ref_model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=1e-2)
    graphs = StandInGraphs()
    step = FastPlainStep(model, opt, nn.CrossEntropyLoss(), compile="graph", graphs=graphs)
    ref_step = PlainStep(ref_model, ref_opt, nn.CrossEntropyLoss())
    schedule, ref_schedule = (build_schedule("cosine", o, lr=LR, iterations=ITERATIONS) for o in (opt, ref_opt))
    gen = torch.Generator().manual_seed(1)
    for it in range(1, ITERATIONS + 1):
        xs, ys = torch.randn(1, 8, 3, 2, 2, generator=gen), torch.randint(0, 5, (1, 8), generator=gen)
        schedule.before_step(it), ref_schedule.before_step(it)
        step(xs, ys), ref_step(xs, ys)
        assert float(opt._lr_tensors[0][1]) == expected_lr(it), it  # what the captured update read
    assert graphs.captures == 1 and graphs.replays == ITERATIONS - FastPlainStep.warmup
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # capturable lr: rounding, as tests/test_fast.py


# --------------------------------------------------------------------------- the setting


def test_the_default_is_plateau_and_its_settings_apply_only_to_it():
    assert RunConfig().optim.schedule == "plateau"
    validate(RunConfig.from_dict({"optim": {"schedule": "cosine"}}))
    with pytest.raises(ValueError) as e:
        validate(RunConfig.from_dict({"optim": {"schedule": "cosine", "plateau_patience": 5}}))
    assert str(e.value) == ("optim.plateau_patience=5 has no effect here: only optim.schedule=plateau reduces the lr "
                            "on validation loss; leave optim.plateau_patience unset")


def test_a_schedule_that_is_no_option_is_one_line_naming_the_options():
    with pytest.raises(ValueError) as e:
        validate(RunConfig.from_dict({"optim": {"schedule": "foo"}}))
    assert str(e.value) == "optim.schedule must be one of plateau, cosine, got 'foo'"


# --------------------------------------------------------------------------- runs


@pytest.mark.parametrize("fast", [False, True])
def test_a_cosine_runs_lr_per_iteration_is_the_formula(tmp_path, fast):
    """Read back from metrics.csv: the first step at the full lr, non-increasing, the last near 0;
    each validation's row shows the lr of the step it followed. train.fast=true: the fused step."""
    assert run(cosine_config(train={"fast": fast}), tmp_path)["status"] == "finished"
    lr = lrs(tmp_path)
    assert list(lr) == list(range(1, ITERATIONS + 1))
    assert lr == {t: expected_lr(t) for t in lr}
    assert lr[1] == LR and all(lr[t] >= lr[t + 1] for t in range(1, ITERATIONS)) and lr[ITERATIONS] < LR * 0.01
    assert lrs(tmp_path, "eval.csv") == {t: expected_lr(t) for t in (5, 10, 15, 20)}


def test_the_fast_path_follows_the_schedule_as_the_readable_one(tmp_path):
    run(cosine_config(train={"fast": False}), tmp_path / "reference")
    run(cosine_config(train={"fast": True}), tmp_path / "fast")
    ref, fast = read_csv(tmp_path / "reference" / "metrics.csv"), read_csv(tmp_path / "fast" / "metrics.csv")
    assert [r["lr"] for r in fast] == [r["lr"] for r in ref]
    assert {r["stepped"] for r in ref} == {"0", "1"}  # GAF skipped some steps: the lr still moved on
    for a, b in zip(fast, ref, strict=True):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5, abs=1e-6), a["iter"]


def test_coteachings_peer_steps_with_the_scheduled_lr(tmp_path, monkeypatch):
    seen = []
    original = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    run(cosine_config(method=COTEACHING), tmp_path)
    assert seen == [expected_lr(t) for t in range(1, ITERATIONS + 1) for _ in range(2)]  # first network, then peer
    assert lrs(tmp_path) == {t: expected_lr(t) for t in range(1, ITERATIONS + 1)}


@pytest.mark.parametrize("method, train", [({}, {}), ({}, {"fast": True}), ({"name": "baseline", "batch_size": 20}, {}),
                                           (COTEACHING, {})])
def test_a_stopped_cosine_run_relaunched_equals_the_unbroken_run(tmp_path, method, train):
    """Killed after iteration 7 (checkpoint at 5) and relaunched: every row and the final weights
    are the unbroken run's, bit for bit."""
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    run(cosine_config(method=method, train=train), unbroken)
    stopped = run(cosine_config(method=method, train={**train, "stop_after": 7}), broken)
    assert stopped["status"] == "stopped"
    assert torch.load(broken / "checkpoint.pt", weights_only=False)["state"]["iter"] == 5
    assert run(cosine_config(method=method, train=train), broken)["status"] == "finished"
    for name in ("metrics.csv", "eval.csv"):
        assert without_times(read_csv(broken / name)) == without_times(read_csv(unbroken / name)), name
    a = torch.load(unbroken / "checkpoint.pt", weights_only=False)
    b = torch.load(broken / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scheduler"] == b["scheduler"] == {}


def test_plateau_and_cosine_are_different_runs(tmp_path):
    run(tiny_config(), tmp_path / "plateau")
    run(cosine_config(train={"iterations": 6, "val_every": 2}), tmp_path / "cosine")
    assert set(lrs(tmp_path / "plateau").values()) == {LR}
    assert lrs(tmp_path / "cosine")[6] < LR


@pytest.mark.slow
def test_torchrun_ranks_step_with_the_scheduled_lr(tmp_path):
    """distributed=true (two gloo ranks) builds the trainer's schedule as one process does: the
    same lr at every iteration, and the one-process run's weights."""
    from test_train_distributed import COMMON, GAF, launch, rows

    settings = [*COMMON, *GAF, "method.n_micro=2", "optim.schedule=cosine", "optim.lr=0.05"]
    single, dist = tmp_path / "single", tmp_path / "dist"
    launch(settings, single)
    launch([*settings, "distributed=true"], dist, nproc=2)
    iterations = int(next(a for a in COMMON if a.startswith("train.iterations=")).split("=")[1])
    expected = [cosine_lr(LR, t, iterations) for t in range(1, iterations + 1)]
    lr = {name: [float(r["lr"]) for r in rows(tmp_path / name / "metrics.csv")] for name in ("single", "dist")}
    assert lr["dist"] == lr["single"] == expected
    a = torch.load(single / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(dist / "checkpoint.pt", weights_only=False)["model"]
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5, msg=key)
