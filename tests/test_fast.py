"""The fast path: masked optimizers against torch.optim, FastGAFStep against gaf_step."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from gaf import AdaptiveTau, gaf_step
from gaf.fast import FastGAFStep, FastPlainStep, StandInGraphs
from gaf.optim import MaskedAdam, MaskedAdamW, MaskedSGD, build_optimizer
from gaf.step import StepStats

ROOT = Path(__file__).resolve().parents[1]


def small_cnn(classes=5, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    )


def state_tensors(opt, params):
    """Each parameter's optimizer state; a missing momentum buffer reads as zeros (torch
    creates it at the first real step, the masked optimizer at the first call)."""
    out = []
    for p in params:
        st = dict(opt.state.get(p, {}))
        if isinstance(opt, (torch.optim.SGD, MaskedSGD)) and opt.param_groups[0]["momentum"]:
            st.setdefault("momentum_buffer", torch.zeros_like(p))
        out.append({k: torch.as_tensor(v).detach().clone() for k, v in st.items()})
    return out


def assert_same(a, b, exact=True, tol=1e-6):
    if exact:
        assert torch.equal(a, b), f"max diff {(a.float() - b.float()).abs().max():.3g}"
    else:
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol), f"max diff {(a - b).abs().max():.3g}"


# ----------------------------------------------------------------------------- masked optimizers

OPTIMIZER_PAIRS = {
    "sgd-nesterov-wd": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
                        lambda p: MaskedSGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "sgd-momentum": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8),
                     lambda p: MaskedSGD(p, lr=0.05, momentum=0.8)),
    "sgd-plain-wd": (lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=1e-3),
                     lambda p: MaskedSGD(p, lr=0.05, weight_decay=1e-3)),
    "adam": (lambda p: torch.optim.Adam(p, lr=1e-2), lambda p: MaskedAdam(p, lr=1e-2)),
    "adam-wd": (lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-2),
                lambda p: MaskedAdam(p, lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-2)),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
              lambda p: MaskedAdamW(p, lr=1e-2, weight_decay=0.1)),
}


def random_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 3, generator=gen), torch.randn(11, generator=gen), torch.randn(2, 3, 3, 3, generator=gen)]


@pytest.mark.parametrize("name", list(OPTIMIZER_PAIRS))
def test_masked_optimizer_equals_torch_and_skips_exactly(name):
    make_ref, make_masked = OPTIMIZER_PAIRS[name]
    ref_p = [nn.Parameter(t) for t in random_params()]
    our_p = [nn.Parameter(t.clone()) for t in random_params()]
    ref, ours = make_ref(ref_p), make_masked(our_p)
    gen = torch.Generator().manual_seed(1)
    masks = [False, True, True, False, True, False, False, True, True, True]  # a skipped first step too
    for take in masks:
        grads = [torch.randn(p.shape, generator=gen) for p in ref_p]
        before = [p.detach().clone() for p in our_p], state_tensors(ours, our_p)
        for p, q, g in zip(ref_p, our_p, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if take:
            ref.step()
        ours.step(torch.tensor(take))
        if not take:  # a skipped step keeps every bit: parameters, buffers, step counts
            for p, q in zip(before[0], our_p):
                assert_same(p, q)
            for s, t in zip(before[1], state_tensors(ours, our_p)):
                for k in t:  # state created by a skipped first step is all zeros (step 0)
                    assert_same(s[k], t[k]) if k in s else assert_same(t[k], torch.zeros_like(t[k]))
        for p, q in zip(ref_p, our_p):
            assert_same(p, q)
        if len(ref.state):
            for s, t in zip(state_tensors(ref, ref_p), state_tensors(ours, our_p)):
                for k in s:
                    assert_same(s[k], t[k])
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(ref_p, random_params()))
    assert moved > 1e-3


@pytest.mark.parametrize("name", ["sgd-nesterov-wd", "adam"])
def test_masked_optimizer_capturable_lr_and_plateau_scheduler(name):
    """lr lives in a device tensor refreshed from param_groups: ReduceLROnPlateau's change
    reaches the update; the capturable SGD path matches torch to rounding."""
    make_ref, make_masked = OPTIMIZER_PAIRS[name]
    ref_p = [nn.Parameter(t) for t in random_params()]
    our_p = [nn.Parameter(t.clone()) for t in random_params()]
    ref, ours = make_ref(ref_p), make_masked(our_p)
    for g in ours.param_groups:
        g["capturable"] = True
    lr0 = ours.param_groups[0]["lr"]
    sched_ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref, factor=0.5, patience=0)
    sched_ours = torch.optim.lr_scheduler.ReduceLROnPlateau(ours, factor=0.5, patience=0)
    gen = torch.Generator().manual_seed(2)
    for i in range(6):
        grads = [torch.randn(p.shape, generator=gen) for p in ref_p]
        for p, q, g in zip(ref_p, our_p, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        ours.step(torch.tensor(True))
        sched_ref.step(1.0)  # a constant metric: lr drops after the first step
        sched_ours.step(1.0)
    assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"] < lr0 / 8
    for p, q in zip(ref_p, our_p):
        assert_same(p, q, exact=False)


def test_masked_optimizer_state_dict_roundtrip_and_torch_compatibility():
    params = [nn.Parameter(t) for t in random_params()]
    torch_adam = torch.optim.Adam(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    torch_adam.step()
    ours = MaskedAdam([nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    ours.load_state_dict(torch_adam.state_dict())  # torch's state loads into the masked class
    for p, q in zip(params, ours.param_groups[0]["params"]):
        q.grad = torch.ones_like(q)
    torch_adam.step()
    ours.step()
    for p, q in zip(params, ours.param_groups[0]["params"]):
        assert_same(p, q)
    saved = copy.deepcopy(ours.state_dict())
    exp_avg = ours.state[ours.param_groups[0]["params"][0]]["exp_avg"]
    ours.step(torch.tensor(True))
    ours.load_state_dict(saved)  # in place: the same state tensor objects (a captured graph stays valid)
    assert ours.state[ours.param_groups[0]["params"][0]]["exp_avg"] is exp_avg
    assert_same(exp_avg, saved["state"][0]["exp_avg"])
    assert float(ours.state[ours.param_groups[0]["params"][0]]["step"]) == 2


def test_build_optimizer_and_bad_input():
    params = lambda: [nn.Parameter(torch.zeros(3))]
    assert type(build_optimizer("sgd", params(), lr=0.1)) is torch.optim.SGD
    assert type(build_optimizer("adamw", params(), lr=0.1)) is torch.optim.AdamW
    sgd = build_optimizer("sgd", params(), lr=0.1, weight_decay=1e-2, masked=True)
    assert type(sgd) is MaskedSGD and sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.9
    assert type(build_optimizer("adam", params(), lr=0.1, masked=True)) is MaskedAdam
    assert type(build_optimizer("adamw", params(), lr=0.1, betas=[0.8, 0.9], masked=True)) is MaskedAdamW
    with pytest.raises(ValueError, match="'lion'"):
        build_optimizer("lion", params(), lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        MaskedSGD(params(), lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        MaskedSGD(params(), lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        MaskedAdam(params(), betas=(0.9, 1.5))
    opt = MaskedSGD(params(), lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    with pytest.raises(ValueError, match="0-d bool"):
        opt.step(torch.tensor([True]))
    with pytest.raises(ValueError, match="0-d bool"):
        opt.step(True)
    adam = MaskedAdam(params() + params())
    adam.param_groups[0]["params"][0].grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"parameters \[1\]"):
        adam.step()


# ----------------------------------------------------------------------------- FastGAFStep vs gaf_step


def make_batches(steps, n, size=6, classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, size, 3, 8, 8, generator=gen), torch.randint(0, classes, (n, size), generator=gen))
            for _ in range(steps)]


def run_pair(n, tau, merge, optim, steps=4, seed=0, tau_ref=None, bias=True, **fast_kwargs):
    ref_model, fast_model = small_cnn(seed=seed, bias=bias), small_cnn(seed=seed, bias=bias)
    if optim == "sgd":
        ref_opt = build_optimizer("sgd", ref_model.parameters(), lr=0.05, weight_decay=1e-2)
        fast_opt = build_optimizer("sgd", fast_model.parameters(), lr=0.05, weight_decay=1e-2, masked=True)
    else:
        ref_opt = build_optimizer("adam", ref_model.parameters(), lr=1e-2)
        fast_opt = build_optimizer("adam", fast_model.parameters(), lr=1e-2, masked=True)
    loss_fn = nn.CrossEntropyLoss()
    step = FastGAFStep(fast_model, fast_opt, loss_fn, tau, merge, **fast_kwargs)
    decisions = []
    for xs, ys in make_batches(steps, n, seed=seed + 7):
        ref = gaf_step(ref_model, ref_opt, loss_fn, list(zip(xs, ys)), tau if tau_ref is None else tau_ref, merge)
        out = step(xs, ys)
        assert isinstance(out, StepStats) and out.samples == xs.shape[0] * xs.shape[1]
        assert set(out.tensors()) == {"loss", "correct", "distances", "accepted", "stepped", "tau"}
        assert all(isinstance(v, torch.Tensor) for v in out.tensors().values())
        assert out.distances.shape == (n - 1,) and out.distances.dtype == torch.float32
        assert out.loss.dtype == torch.float32 and out.tau.dtype == torch.float32
        assert int(out.accepted) == ref["accepted"] and bool(out.stepped) == ref["stepped"]
        assert out.distances.tolist() == pytest.approx(ref["distances"], abs=1e-6)
        assert float(out.loss) == pytest.approx(ref["loss"], rel=1e-6)
        assert int(out.correct) == round(ref["accuracy"] * xs.shape[0] * xs.shape[1])
        decisions.append(ref["stepped"])
    return ref_model, fast_model, ref_opt, fast_opt, decisions


def assert_models_equal(ref_model, fast_model, ref_opt, fast_opt, exact=True, tol=1e-6):
    for (name, a), b in zip(ref_model.state_dict().items(), fast_model.state_dict().values()):
        assert_same(a, b, exact, tol)  # parameters, BatchNorm running stats, num_batches_tracked
    for s, t in zip(state_tensors(ref_opt, list(ref_model.parameters())),
                    state_tensors(fast_opt, list(fast_model.parameters()))):
        for k in s:
            assert_same(s[k], t[k], exact, tol)


@pytest.mark.parametrize("optim", ["sgd", "adam"])
@pytest.mark.parametrize("merge", ["halving", "mean"])
@pytest.mark.parametrize("tau", [0.5, 0.97, 2.0])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_fast_step_equals_gaf_step(n, tau, merge, optim):
    ref_model, fast_model, ref_opt, fast_opt, _ = run_pair(n, tau, merge, optim, seed=n)
    assert_models_equal(ref_model, fast_model, ref_opt, fast_opt)


@pytest.mark.parametrize("optim", ["sgd", "adam"])
@pytest.mark.parametrize("merge", ["halving", "mean"])
@pytest.mark.parametrize("n", [2, 3])
def test_batched_vmap_step_equals_gaf_step(n, merge, optim):
    """One vmap(grad) pass: per-microbatch BatchNorm statistics, running stats and
    num_batches_tracked as n sequential passes; equal up to summation order. (No conv bias
    before BatchNorm: its true gradient is 0, and Adam would amplify rounding noise.)"""
    ref_model, fast_model, ref_opt, fast_opt, decisions = run_pair(n, 0.97, merge, optim, seed=n, bias=False,
                                                                   batched=True)
    assert_models_equal(ref_model, fast_model, ref_opt, fast_opt, exact=False, tol=1e-5)
    assert int(fast_model[1].num_batches_tracked) == 4 * n


def test_equivalence_grid_sees_steps_and_skips():
    """Guard against a vacuous equivalence test: its data make GAF both step and skip."""
    seen = set()
    for n, tau in [(2, 0.97), (3, 0.97), (5, 0.5), (2, 2.0)]:
        seen.update(run_pair(n, tau, "halving", "sgd", seed=n)[-1])
    assert seen == {True, False}


def test_fast_step_adaptive_tau_equals_gaf_step():
    tau_fast, tau_ref = AdaptiveTau(tau_max=1.0, k=0.5, window=4), AdaptiveTau(tau_max=1.0, k=0.5, window=4)
    ref_model, fast_model, ref_opt, fast_opt, decisions = run_pair(3, tau_fast, "mean", "sgd", steps=6,
                                                                   tau_ref=tau_ref)
    assert_models_equal(ref_model, fast_model, ref_opt, fast_opt)
    assert torch.equal(tau_fast.current(), tau_ref.current()) and int(tau_fast._count) == 12


def test_fast_step_skipped_changes_nothing_but_bn_running_stats():
    model = small_cnn()
    opt = build_optimizer("sgd", model.parameters(), lr=0.1, weight_decay=1e-2, masked=True)
    step = FastGAFStep(model, opt, nn.CrossEntropyLoss(), tau=2.0)
    (xs, ys), (xs2, ys2) = make_batches(2, 3)
    assert bool(step(xs, ys).stepped)  # a real step creates the momentum buffers
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    running = model[1].running_mean.clone()
    step.tau = 0.0  # distinct micro-gradients never agree at 0
    out = step(xs2, ys2)
    assert not bool(out.stepped) and int(out.accepted) == 0
    for p, q in zip(params, model.parameters()):
        assert_same(p, q)
    for key, st in state["state"].items():
        for name, value in st.items():
            assert_same(value, opt.state_dict()["state"][key][name])
    assert not torch.equal(running, model[1].running_mean)  # the forward passes still ran
    assert all(p.grad is None for p in model.parameters())


def test_fast_step_channels_last_and_bf16_on_cpu():
    """Layout changes only the summation order: equal to rounding. bf16 autocast keeps
    fp32 master weights and reports fp32 distances close to the fp32 reference."""
    ref_model, fast_model, ref_opt, fast_opt, _ = run_pair(3, 2.0, "halving", "sgd", steps=3, channels_last=True)
    assert fast_model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_models_equal(ref_model, fast_model, ref_opt, fast_opt, exact=False, tol=1e-5)
    model = small_cnn()
    opt = build_optimizer("sgd", model.parameters(), lr=0.05, masked=True)
    step = FastGAFStep(model, opt, nn.CrossEntropyLoss(), 2.0, amp_dtype=torch.bfloat16)
    xs, ys = make_batches(1, 3)[0]
    out = step(xs, ys)
    ref = gaf_step(small_cnn(), torch.optim.SGD(small_cnn().parameters(), lr=0.05), nn.CrossEntropyLoss(),
                   list(zip(xs, ys)), 2.0)
    assert out.distances.dtype == torch.float32 and model[0].weight.dtype == torch.float32
    assert out.distances.tolist() == pytest.approx(ref["distances"], abs=0.05)


def test_fast_plain_step_equals_a_torch_step():
    ref_model, fast_model = small_cnn(), small_cnn()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
    fast_opt = build_optimizer("sgd", fast_model.parameters(), lr=0.05, weight_decay=1e-2, masked=True)
    step, loss_fn = FastPlainStep(fast_model, fast_opt, nn.CrossEntropyLoss()), nn.CrossEntropyLoss()
    for xs, ys in make_batches(3, 2):
        ref_opt.zero_grad()
        loss = loss_fn(ref_model(xs.flatten(0, 1)), ys.flatten())
        loss.backward()
        ref_opt.step()
        out = step(xs, ys)
        assert float(out.loss) == float(loss.detach()) and bool(out.stepped)
    assert_models_equal(ref_model, fast_model, ref_opt, fast_opt)


def test_fast_step_bad_input():
    model = small_cnn()
    loss_fn = nn.CrossEntropyLoss()
    opt = build_optimizer("sgd", model.parameters(), lr=0.1, masked=True)
    with pytest.raises(ValueError, match="masked optimizer"):
        FastGAFStep(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, 1.0)
    with pytest.raises(ValueError, match="float16"):
        FastGAFStep(model, opt, loss_fn, 1.0, amp_dtype=torch.float16)
    with pytest.raises(ValueError, match="CUDA"):
        FastGAFStep(model, opt, loss_fn, 1.0, compile=True)
    with pytest.raises(ValueError, match="2.5"):
        FastGAFStep(model, opt, loss_fn, 2.5)
    with pytest.raises(ValueError, match="'avg'"):
        FastGAFStep(model, opt, loss_fn, 1.0, merge="avg")
    step = FastGAFStep(model, opt, loss_fn, 1.0)
    xs, ys = make_batches(1, 2)[0]
    with pytest.raises(ValueError, match="n >= 2"):
        step(xs[:1], ys[:1])
    with pytest.raises(ValueError, match=r"\(n, b\)"):
        step(xs, ys[:, :3])


# ----------------------------------------------------------------------------- the benchmark, in CI


def test_bench_quick_runs_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.csv"
    rows = bench.main(["--device", "cpu", "--quick", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| n |" in text and "cpu" in text and torch.__version__ in text
    assert out.exists() and len(out.read_text().splitlines()) == len(rows) + 1
    for row in rows:
        for key in ("authors", "gaf_step", "fast", "plain"):
            assert row[f"{key}_images_per_s"] > 0
    assert rows[0]["check_max_distance_diff"] < 1e-4 and rows[0]["check_same_decisions"] == 1.0


# ----------------------------------------------------------------------------- tau changes and graph bookkeeping


def capturable_twin(seed=0):
    """An eager fast step reading lr from its device tensor, as a graphed one does."""
    model = small_cnn(seed=seed)
    opt = build_optimizer("sgd", model.parameters(), lr=0.05, weight_decay=1e-2, masked=True)
    opt.param_groups[0]["capturable"] = True
    return model, opt


def test_changing_a_float_tau_changes_decision_and_report():
    model, opt = capturable_twin()
    step = FastGAFStep(model, opt, nn.CrossEntropyLoss(), tau=2.0)
    xs, ys = make_batches(1, 3)[0]
    out = step(xs, ys)
    assert bool(out.stepped) and float(out.tau) == 2.0
    step.tau = 0.0
    out = step(xs, ys)
    assert not bool(out.stepped) and float(out.tau) == 0.0
    with pytest.raises(ValueError, match="2.5"):
        step.tau = 2.5


def test_graph_bookkeeping_with_a_stand_in():
    """Warm-up count, one capture, static input copies, cloned outputs, the same numbers
    as eager; a new float tau is read without recapture; a new shape, reloaded optimizer
    state or a tau of another kind recaptures."""
    graphs = StandInGraphs()
    model, opt = capturable_twin()
    twin, twin_opt = capturable_twin()
    step = FastGAFStep(model, opt, nn.CrossEntropyLoss(), tau=2.0, compile="graph", graphs=graphs)
    eager = FastGAFStep(twin, twin_opt, nn.CrossEntropyLoss(), tau=2.0)
    batches = make_batches(8, 3)
    outs = []
    for i, (xs, ys) in enumerate(batches[:6]):
        if i == 5:
            step.tau = eager.tau = 0.0  # a float: no recapture, but the decision follows it
        outs.append(step(xs, ys))
        ref = eager(xs, ys)
        for k, v in ref.tensors().items():
            assert torch.equal(getattr(outs[-1], k), v), (i, k)
    assert (graphs.warmups, graphs.captures, graphs.replays) == (FastGAFStep.warmup, 1, 3)
    assert not bool(outs[-1].stepped) and bool(outs[-2].stepped)
    assert float(outs[3].tau) == 2.0  # an earlier result is not overwritten by later replays
    assert_models_equal(twin, model, twin_opt, opt)
    w = FastGAFStep.warmup
    small = [(xs[:2], ys[:2]) for xs, ys in batches[6:8]]
    step(*small[0])  # a new shape: warm up again
    assert graphs.warmups == w + 1 and graphs.captures == 1
    for _ in range(w):
        step(*small[1])
    assert graphs.warmups == 2 * w and graphs.captures == 2
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # copied into the same tensors: the graph stays valid
    step(*small[1])
    assert graphs.captures == 2 and graphs.warmups == 2 * w
    step.tau = torch.tensor(1.0)  # a tensor the graph would read by address: warm up, then capture again
    step(*small[1])
    assert graphs.warmups == 2 * w + 1 and graphs.captures == 2


def test_torch_compile_of_the_forward_through_the_fast_step_on_cpu():
    """compile=True (torch.compile + graph) with stand-in graphs: inductor's CPU code for the
    model's forward and backward gives the eager step's decisions and weights to rounding."""
    graphs = StandInGraphs()
    model, opt = capturable_twin()
    twin, twin_opt = capturable_twin()
    step = FastGAFStep(model, opt, nn.CrossEntropyLoss(), tau=0.97, compile=True, graphs=graphs)
    eager = FastGAFStep(twin, twin_opt, nn.CrossEntropyLoss(), tau=0.97)
    for xs, ys in make_batches(FastGAFStep.warmup + 2, 3):
        out, ref = step(xs, ys), eager(xs, ys)
        assert out.distances.tolist() == pytest.approx(ref.distances.tolist(), abs=1e-5)
        assert int(out.accepted) == int(ref.accepted)
    assert graphs.captures == 1 and graphs.replays == 2
    assert_models_equal(twin, model, twin_opt, opt, exact=False, tol=1e-5)


def test_bench_checks_fp32_like_with_like_and_the_timed_options_apart():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--device", "cpu", "--quick", "--n", "2", "--amp", "bf16", "--channels-last"])
    row = rows[0]
    assert row["check_max_distance_diff"] < 1e-5 and row["check_same_decisions"] == 1.0  # fp32 vs fp32
    assert 0 < row["check_amp_max_distance_diff"] < 0.1  # bf16's rounding, reported on its own


def test_bench_plans_check_steps_only_for_the_checked_point():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--device", "cpu", "--quick", "--steps", "4", "--warmup", "1", "--check-steps", "50"])
    assert bench.make_plan(args, 2, 1, checked=True).shape == (50, 2, 100)
    assert bench.make_plan(args, 3, 1, checked=False).shape == (5, 3, 100)


def test_graphed_step_recaptures_when_an_adaptive_history_is_reloaded():
    """Resuming loads an AdaptiveTau's history into new tensors, which a captured graph
    would not see: the step must warm up and capture again, then decide as eager does."""
    graphs = StandInGraphs()
    model, opt = capturable_twin()
    twin, twin_opt = capturable_twin()
    tau, twin_tau = AdaptiveTau(1.0, k=0.5, window=4), AdaptiveTau(1.0, k=0.5, window=4)
    step = FastGAFStep(model, opt, nn.CrossEntropyLoss(), tau, compile="graph", graphs=graphs)
    eager = FastGAFStep(twin, twin_opt, nn.CrossEntropyLoss(), twin_tau)
    batches = make_batches(FastGAFStep.warmup + 6, 3)
    w = FastGAFStep.warmup
    for xs, ys in batches[: w + 2]:
        step(xs, ys), eager(xs, ys)
    assert graphs.captures == 1
    saved = {**tau.state_dict(), "buffer": torch.linspace(0.9, 1.0, 4), "count": torch.tensor(9)}
    tau.load_state_dict(saved)
    twin_tau.load_state_dict(copy.deepcopy(saved))
    for xs, ys in batches[w + 2:]:
        out, ref = step(xs, ys), eager(xs, ys)
        assert torch.equal(out.tau, ref.tau) and torch.equal(out.accepted, ref.accepted)
    assert graphs.warmups == 2 * w and graphs.captures == 2
