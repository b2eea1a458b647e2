"""The fused step (gaf/fused.py): K runs stepped as one program equal K single runs.

Why not bit for bit: vmap turns each member's convolution into one grouped convolution
over K members and each BatchNorm into one over K*C channels, and the Gram matrix and
aggregate into bmm; those kernels sum in another order than the single run's, so
gradients, distances and statistics differ by fp32 rounding (measured below: ~1e-7).
What must be exact: every decision, every step taken, and a refused member's bits.

Why the tight comparisons use ``smooth`` copies of tiny and cnn4 (ReLU -> SiLU, max-pool ->
average pool): at a ReLU or max-pool kink the gradient jumps with the forward's last bit.
Seen here: a cnn4 pre-ReLU value of 4e-7, whose sign the two summation orders disagreed
on, moved a step's first-layer momentum by 4.4e-3 of the step's change (L2; ~3e-6 where no
kink flips), and one of its elements by 0.7% of the step. On smooth networks the
bound is a property and not one seed's luck; the real ReLU networks are compared with a
bound that a kink cannot break but a wrong weight, statistic or setting does (resnet18 too).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gaf.fast import FastGAFStep, FastPlainStep, StandInGraphs
from gaf.filter import agreement_weights_unchecked
from gaf.fused import FusedSteps, unstack_stats
from gaf.models import build_model
from gaf.optim import MaskedSGD

# Bounds, each well above the worst difference measured on this CPU (torch 2.14, 1 thread).
DIST_TOL = 1e-6  # cosine distances, absolute (measured <= 1.2e-7: one ulp near 1)
# Smooth networks, the state after one step from the same state: |fused - single| <= STEP_REL * |the step's
# change| + STEP_ULPS ulps of the tensor's largest value. Measured beyond 2 ulps: <= 3.1e-6 of the change
# (smooth tiny), 2.8e-6 (smooth cnn4); integer buffers (num_batches_tracked) exactly equal.
STEP_REL, STEP_ULPS = 1e-4, 2
TRAJ_TOL = 1e-5  # smooth tiny's whole 10-step trajectory, absolute (measured <= 1.2e-7)
# ReLU networks, one step from the same state: per tensor, |fused - single| (L2, beyond one fp32 rounding per
# element) <= KINK_REL * |the step's change| (L2), as scripts/gpu_check.py's fp32-equal. Measured: <= 4.1e-6
# (tiny, cnn4, resnet18) except the one step where a cnn4 kink flipped: 4.4e-3.
KINK_REL = 3e-2

MOMENTUM, NESTEROV = 0.9, True
LABEL_SMOOTHING = nn.CrossEntropyLoss(label_smoothing=0.1)


def smooth(model):
    """ReLU -> SiLU and max-pool -> average pool, in place (module docstring)."""
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU):
            setattr(model, name, nn.SiLU())
        elif isinstance(child, nn.MaxPool2d):
            setattr(model, name, nn.AvgPool2d(child.kernel_size, child.stride))
        else:
            smooth(child)
    return model


def models_of(name, seeds, classes=10, smoothed=False, **size):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(build_model(name, classes, **size))
    return [smooth(m) for m in out] if smoothed else out


def batches(K, n, b, steps, seed=0, size=16, classes=10):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(K, n, b, 3, size, size, generator=gen), torch.randint(0, classes, (K, n, b), generator=gen))
            for _ in range(steps)]


def single_runs(models, lrs, wds, taus, merges, losses):
    """One FastGAFStep (or FastPlainStep, tau None) with its own MaskedSGD per member, on copies."""
    runs = []
    for k, m in enumerate(models):
        m = copy.deepcopy(m)
        opt = MaskedSGD(m.parameters(), lr=lrs[k], momentum=MOMENTUM, nesterov=NESTEROV, weight_decay=wds[k])
        step = (FastPlainStep(m, opt, losses[k]) if taus is None else
                FastGAFStep(m, opt, losses[k], taus[k], merges[k]))
        runs.append((m, opt, step))
    return runs


def run_state(model, opt):
    """A single run's state as flat tensors by name: parameters, buffers, momentum."""
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        out[f"momentum.{i}"] = opt.state[p]["momentum_buffer"].clone() if p in opt.state else torch.zeros_like(p)
    return out


def fused_state(fused, k):
    model, opt = fused.member_state(k)
    out = dict(model)
    for i, shape in enumerate(fused._shapes):
        st = opt["state"].get(i)
        out[f"momentum.{i}"] = st["momentum_buffer"] if st else torch.zeros(shape)
    return out


def worst(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def assert_close_step(before, fused_after, single_after):
    """Each tensor: the fused and single results agree to STEP_REL of what the step changed,
    plus STEP_ULPS ulps of its values (a value near 1 that moved by 1e-3 may differ by its last bit)."""
    eps = torch.finfo(torch.float32).eps
    for key in before:
        if not before[key].is_floating_point():
            assert torch.equal(fused_after[key], single_after[key]), key
            continue
        if not before[key].numel():
            continue
        change = (single_after[key].double() - before[key].double()).abs().max().item()
        ulp = eps * single_after[key].double().abs().max().item()
        diff = (fused_after[key].double() - single_after[key].double()).abs().max().item()
        assert diff <= STEP_REL * change + STEP_ULPS * ulp, (
            f"{key}: differs by {diff:.3g}, the step changed it by {change:.3g}")


def relative_l2(before, fused_after, single_after) -> float:
    """Worst over tensors of |fused - single| / |single's change| (L2 norms), each element's
    difference less one fp32 rounding of its value; integer buffers must be equal."""
    eps, worst_seen = torch.finfo(torch.float32).eps, 0.0
    for key in before:
        f, w, b = fused_after[key].double(), single_after[key].double(), before[key].double()
        if not before[key].is_floating_point():
            assert torch.equal(f, w), key
            continue
        beyond = ((f - w).abs() - eps * torch.maximum(f.abs(), w.abs())).clamp(min=0).norm().item()
        size = (w - b).norm().item()
        worst_seen = max(worst_seen, beyond / size if size > 0 else (0.0 if beyond == 0 else float("inf")))
    return worst_seen


def assert_same_decisions(fused_stats, single_stats):
    for k, (f, s) in enumerate(zip(unstack_stats(fused_stats), single_stats)):
        assert torch.equal(f.stepped, s.stepped) and torch.equal(f.accepted, s.accepted), f"member {k}"
        assert f.distances.shape == s.distances.shape
        if s.distances.numel():
            assert (f.distances - s.distances).abs().max().item() <= DIST_TOL, f"member {k}"
        assert torch.equal(f.correct, s.correct), f"member {k}"
        assert abs(f.loss.item() - s.loss.item()) <= 1e-5 * max(1.0, abs(s.loss.item()))
        assert f.tau.item() == s.tau.item() or (f.tau.isnan() and s.tau.isnan())
        assert f.samples == s.samples


def fused_group(models, taus, merges, lrs, wds, losses, **kw):
    return FusedSteps(models, lr=lrs, weight_decay=wds, momentum=MOMENTUM, nesterov=NESTEROV, tau=taus, merge=merges,
                      loss=losses, **kw)


def step_by_step(models, settings, data, check):
    """Fused group and single runs, each step from the same state (the fused member's, copied
    into its single run); ``check(before, fused_after, single_after)`` per member and step.
    Returns every member's every decision (stepped)."""
    fused, singles = fused_group(models, **settings), single_runs(models, **settings)
    decisions = []
    for xs, ys in data:
        for k, (m, opt, _) in enumerate(singles):
            model_state, opt_state = fused.member_state(k)
            m.load_state_dict(model_state), opt.load_state_dict(opt_state)
        before = [run_state(m, opt) for m, opt, _ in singles]
        stats = fused(xs, ys)
        assert_same_decisions(stats, [step(xs[k], ys[k]) for k, (_, _, step) in enumerate(singles)])
        for k, (m, opt, _) in enumerate(singles):
            check(before[k], fused_state(fused, k), run_state(m, opt))
        decisions += stats.stepped.tolist()
    return decisions


# --------------------------------------------------------------- a GAF group against its members alone

GAF_SETTINGS = dict(taus=[2.0, 0.97, 0.9], merges=["mean", "halving", "halving"], lrs=[0.05, 0.1, 0.02],
                    wds=[0.0, 5e-4, 1e-3], losses=[F.cross_entropy, F.cross_entropy, LABEL_SMOOTHING])
BASELINE = dict(taus=None, merges=None, lrs=[0.05, 0.1, 0.02], wds=[0.0, 5e-4, 1e-3],
                losses=[F.cross_entropy, LABEL_SMOOTHING, F.cross_entropy])
SIZES = {"tiny": {}, "cnn4": {"width": 8}}


@pytest.mark.parametrize("name", ["tiny", "cnn4"])
def test_gaf_group_equals_members_step_by_step(name):
    """Different initial weights, data, taus, merges, losses, lr and weight decay per member."""
    models = models_of(name, [0, 1, 2], smoothed=True, **SIZES[name])
    decisions = step_by_step(models, GAF_SETTINGS, batches(3, 3, 8, 10), assert_close_step)
    assert any(decisions) and not all(decisions), "the settings should produce both taken and refused steps"


def test_gaf_group_equals_members_whole_runs():
    """Smooth tiny is calm enough over 10 steps for whole trajectories to stay within fp32 rounding."""
    models = models_of("tiny", [3, 4, 5], smoothed=True)
    fused = fused_group(models, **GAF_SETTINGS)
    singles = single_runs(models, **GAF_SETTINGS)
    for xs, ys in batches(3, 3, 8, 10, seed=1):
        stats = fused(xs, ys)
        assert_same_decisions(stats, [step(xs[k], ys[k]) for k, (_, _, step) in enumerate(singles)])
    for k, (m, opt, _) in enumerate(singles):
        assert worst(fused_state(fused, k), run_state(m, opt)) <= TRAJ_TOL


def kink_bound(before, fused_after, single_after):
    assert relative_l2(before, fused_after, single_after) <= KINK_REL


@pytest.mark.parametrize("name", ["tiny", "cnn4"])
def test_relu_networks_step_by_step(name):
    """The networks as built (ReLU, max-pool): the bound that a kink cannot break."""
    models = models_of(name, [0, 1, 2], **SIZES[name])
    step_by_step(models, GAF_SETTINGS, batches(3, 3, 8, 6), kink_bound)
    step_by_step(models, BASELINE, batches(3, 1, 16, 6), kink_bound)


def test_resnet18_step_by_step():
    """The paper's network (chaotic over whole runs): two steps from the same state, b = 10."""
    settings = dict(taus=[2.0, 0.99], merges=["mean", "halving"], lrs=[0.05, 0.1], wds=[5e-4, 0.0],
                    losses=[F.cross_entropy, F.cross_entropy])
    step_by_step(models_of("resnet18", [0, 1], classes=100), settings, batches(2, 2, 10, 2, size=32, classes=100),
                 kink_bound)


def test_refused_member_keeps_its_bits_while_the_others_step():
    models = models_of("tiny", [0, 1, 2])
    fused = FusedSteps(models, lr=0.1, weight_decay=1e-3, momentum=MOMENTUM, nesterov=NESTEROV, tau=2.0)
    (x1, y1), (x2, y2) = batches(3, 2, 8, 2)
    fused(x1, y1)  # all take it: momentum is non-zero from here on
    fused.set_tau(1, 0.0)  # nothing agrees within distance 0
    before = [fused_state(fused, k) for k in range(3)]
    stats = fused(x2, y2)
    assert stats.stepped.tolist() == [True, False, True]
    after = [fused_state(fused, k) for k in range(3)]
    for key, value in before[1].items():
        if "running" in key or "num_batches" in key:  # the forward passes ran: statistics move as in FastGAFStep
            assert not torch.equal(value, after[1][key]), key
        else:
            assert torch.equal(value, after[1][key]), f"{key} changed on a refused step"
    for k in (0, 2):
        assert not torch.equal(before[k]["0.weight"], after[k]["0.weight"])
        assert not torch.equal(before[k]["momentum.0"], after[k]["momentum.0"])
    assert after[1]["1.num_batches_tracked"] == before[1]["1.num_batches_tracked"] + 2


def test_non_finite_member_is_refused_and_leaves_the_others_alone():
    """NaN micro-gradients (as FastGAFStep: NaN distances, no step, bits kept) in one member only."""
    models = models_of("tiny", [0, 1, 2], smoothed=True)
    fused = fused_group(models, **GAF_SETTINGS)
    singles = single_runs(models, **GAF_SETTINGS)
    data = batches(3, 3, 8, 2)
    fused(*data[0])
    for k, (_, _, step) in enumerate(singles):
        step(data[0][0][k], data[0][1][k])
    xs, ys = data[1]
    xs[1, 2, 0] = float("nan")  # member 1's third microbatch
    before = fused_state(fused, 1)
    stats = fused(xs, ys)
    single_stats = [step(xs[k], ys[k]) for k, (_, _, step) in enumerate(singles)]
    assert not stats.stepped[1] and stats.distances[1, 1].isnan() and single_stats[1].distances[1].isnan()
    after = fused_state(fused, 1)
    kept = [key for key in after if "running" not in key and "num_batches" not in key]  # statistics move
    assert all(torch.equal(before[key], after[key]) for key in kept)
    for k in (0, 2):
        assert torch.equal(stats.stepped[k], single_stats[k].stepped)
        assert worst(fused_state(fused, k), run_state(*singles[k][:2])) <= TRAJ_TOL


# --------------------------------------------------------------- the baseline: n = 1, plain steps


def test_baseline_group_equals_plain_steps():
    models = models_of("cnn4", [0, 1, 2], smoothed=True, width=8)
    fused = fused_group(models, **BASELINE)
    stats = fused(*batches(3, 1, 16, 1)[0])
    assert stats.distances.shape == (3, 0) and stats.stepped.all() and stats.tau.isnan().all()
    assert stats.accepted.eq(0).all() and stats.samples == 16
    step_by_step(models, BASELINE, batches(3, 1, 16, 6), assert_close_step)


# --------------------------------------------------------------- per-member state

def test_member_state_has_a_single_runs_format():
    models = models_of("tiny", [0, 1])
    fused = FusedSteps(models, lr=[0.1, 0.2], weight_decay=[0.0, 1e-3], momentum=MOMENTUM, nesterov=NESTEROV, tau=0.9)
    (m, opt, step), = single_runs(models[:1], [0.1], [0.0], [0.9], ["halving"], [F.cross_entropy])
    assert fused.member_state(0)[1] == {**opt.state_dict(), "param_groups": [
        {**opt.state_dict()["param_groups"][0], "capturable": True}]}  # before a step: no state yet
    xs, ys = batches(2, 2, 8, 1)[0]
    fused(xs, ys), step(xs[0], ys[0])
    model_state, opt_state = fused.member_state(1)
    assert list(model_state) == list(m.state_dict())
    ref = opt.state_dict()
    assert set(opt_state) == set(ref) and set(opt_state["state"]) == set(ref["state"])
    assert opt_state["param_groups"][0].keys() == ref["param_groups"][0].keys()
    assert opt_state["param_groups"][0]["lr"] == 0.2 and opt_state["param_groups"][0]["weight_decay"] == 1e-3
    for i, st in ref["state"].items():
        assert st.keys() == opt_state["state"][i].keys()
    other = copy.deepcopy(m)
    other.load_state_dict(model_state)  # strict: every key, every shape
    MaskedSGD(other.parameters(), lr=0.1, momentum=MOMENTUM, nesterov=NESTEROV).load_state_dict(opt_state)
    fused.load_member(1, model_state, fresh := MaskedSGD(other.parameters(), lr=0.3, momentum=MOMENTUM,
                                                           nesterov=NESTEROV).state_dict())
    assert fused.member_state(1)[1]["state"] == {} and fused.member_state(1)[1]["param_groups"][0]["lr"] == 0.3
    assert fresh["state"] == {} and fused.momentum_flat[1].eq(0).all()


def test_load_member_round_trip_and_resume():
    """A group rebuilt from other weights and loaded with the member states continues exactly
    as the unbroken group (same program, same data: bit for bit), and loads in place."""
    data = batches(3, 3, 8, 6, seed=2)
    unbroken = fused_group(models_of("tiny", [0, 1, 2]), **GAF_SETTINGS)
    for xs, ys in data[:3]:
        unbroken(xs, ys)
    saved = [copy.deepcopy(unbroken.member_state(k)) for k in range(3)]
    for xs, ys in data[3:]:
        unbroken(xs, ys)

    resumed = fused_group(models_of("tiny", [7, 8, 9]), **{**GAF_SETTINGS, "lrs": 1.0, "wds": 0.0})
    addresses = [resumed.flat.data_ptr(), resumed.momentum_flat.data_ptr()] + [
        t.data_ptr() for t in resumed.buffers.values()]
    for k, (model_state, opt_state) in enumerate(saved):
        resumed.load_member(k, model_state, opt_state)
    assert [fused_state(resumed, k)["0.weight"].tolist() for k in range(3)] == [
        s[0]["0.weight"].tolist() for s in saved]
    for xs, ys in data[3:]:
        resumed(xs, ys)
    for k in range(3):
        a, b = fused_state(resumed, k), fused_state(unbroken, k)
        assert all(torch.equal(a[key], b[key]) for key in a), f"member {k}"
        assert resumed.member_state(k)[1]["param_groups"] == unbroken.member_state(k)[1]["param_groups"]
    assert addresses == [resumed.flat.data_ptr(), resumed.momentum_flat.data_ptr()] + [
        t.data_ptr() for t in resumed.buffers.values()]


def test_lr_and_weight_decay_are_read_live():
    """A schedule writes param_groups[k][0]["lr"]; the next step uses it (as MaskedSGD.refresh_lr)."""
    models = models_of("tiny", [0, 1], smoothed=True)
    settings = dict(taus=[2.0, 2.0], merges=["mean", "mean"], lrs=[0.1, 0.1], wds=[0.0, 0.0],
                    losses=[F.cross_entropy] * 2)
    fused, singles = fused_group(models, **settings), single_runs(models, **settings)
    for it, (xs, ys) in enumerate(batches(2, 2, 8, 3)):
        fused.param_groups[1][0]["lr"] = singles[1][1].param_groups[0]["lr"] = 0.1 / (it + 1)
        fused.param_groups[0][0]["weight_decay"] = singles[0][1].param_groups[0]["weight_decay"] = 1e-2 * it
        fused(xs, ys)
        for k, (_, _, step) in enumerate(singles):
            step(xs[k], ys[k])
    for k, (m, opt, _) in enumerate(singles):
        assert worst(fused_state(fused, k), run_state(m, opt)) <= TRAJ_TOL


# --------------------------------------------------------------- the device-side pieces

def test_agreement_per_member_equals_the_scalar_one():
    """Per-member tau and merge (both merges in one group), a non-finite member included."""
    taus, merges = [2.0, 0.5, 0.8, 0.0, 0.9], ["mean", "halving", "mean", "halving", "halving"]
    fused = FusedSteps(models_of("tiny", [0] * 5), lr=0.1, tau=taus, merge=merges)
    f = torch.randn(5, 4, 50, generator=torch.Generator().manual_seed(0))
    f[2, 1] = f[2, 0] + 0.1 * f[2, 1]  # close to the first: accepted at 0.8
    gram = f @ f.mT
    gram[4, 2, 2] = float("nan")
    out = fused._agreement(gram)
    for k in range(5):
        ref = agreement_weights_unchecked(gram[k], torch.tensor(taus[k], dtype=torch.float64), merges[k])
        for a, r in zip(out, ref):
            assert torch.equal(a[k], r) or (a[k].isnan() == r.isnan()).all() and torch.equal(
                a[k].nan_to_num(), r.nan_to_num()), f"member {k}"
    assert out[1][:, 1:].any(1).tolist() == [True, False, True, False, False]


class _NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a device value to the host (.item(), bool(), nonzero)."""

    SYNCING = ("_local_scalar_dense", "nonzero", "is_nonzero", "masked_select")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("baseline", [False, True])
def test_the_step_reads_nothing_back_to_the_host(baseline):
    fused = fused_group(models_of("tiny", [0, 1, 2]), **(BASELINE if baseline else GAF_SETTINGS))
    data = batches(3, 1 if baseline else 3, 8, 2)
    fused(*data[0])
    fused.param_groups[0][0]["lr"] = 0.3  # a schedule's change is a fill, not a sync
    with _NoHostSync():
        fused(*data[1])


def test_graph_capture_bookkeeping_with_a_stand_in():
    """compile='graph': warm-up calls, one capture, replays on static inputs; equal to eager."""
    graphs = StandInGraphs()
    graphed = fused_group(models_of("tiny", [0, 1, 2]), **GAF_SETTINGS, compile="graph", graphs=graphs)
    eager = fused_group(models_of("tiny", [0, 1, 2]), **GAF_SETTINGS)
    for xs, ys in batches(3, 3, 8, 6):
        a, b = graphed(xs, ys), eager(xs, ys)
        assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    assert (graphs.warmups, graphs.captures, graphs.replays) == (3, 1, 3)
    assert torch.equal(graphed.flat, eager.flat) and torch.equal(graphed.momentum_flat, eager.momentum_flat)


# --------------------------------------------------------------- bad input

def test_bad_input_is_one_clear_value_error_each():
    tiny = models_of("tiny", [0, 1])
    ok = dict(lr=0.1, tau=0.9)
    cases = [
        (lambda: FusedSteps([tiny[0], build_model("tiny", 10, width=8)], **ok), "architecture"),
        (lambda: FusedSteps([tiny[0], build_model("cnn4", 10)], **ok), "architecture"),
        (lambda: FusedSteps([], **ok), "non-empty"),
        (lambda: FusedSteps(tiny, lr=0.1, tau=0.9, merge="median"), "merge"),
        (lambda: FusedSteps(tiny, lr=0.1, tau=[0.9, 2.5]), "tau"),
        (lambda: FusedSteps(tiny, lr=0.1, tau=-0.1), "tau"),
        (lambda: FusedSteps(tiny, lr=[0.1, 0.1, 0.1], tau=0.9), "one per member"),
        (lambda: FusedSteps(tiny, lr=-1.0, tau=0.9), "lr"),
        (lambda: FusedSteps(tiny, lr=0.1, nesterov=True, tau=0.9), "nesterov"),
    ]
    tied = [nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(2)]
    for m in tied:
        m[1].weight = m[0].weight
    cumulative = models_of("tiny", [0, 1])
    for m in cumulative:
        m[1].momentum = None
    cases += [(lambda: FusedSteps(tied, **ok), "also holds"), (lambda: FusedSteps(cumulative, **ok), "momentum")]
    for make, words in cases:
        with pytest.raises(ValueError, match=words):
            make()
    fused = FusedSteps(tiny, **ok, momentum=0.9)
    x, y = torch.randn(2, 2, 4, 3, 8, 8), torch.randint(0, 10, (2, 2, 4))
    for xs, ys in [(x[:1], y[:1]), (x, y[:, :, :3]), (x[:, :1], y[:, :1]), (x[0], y[0]), (x, y.float()[None])]:
        with pytest.raises(ValueError, match=r"\(K=2, n, b|n >= 2"):
            fused(xs, ys)
    with pytest.raises(ValueError, match="tau"):
        fused.set_tau(0, 3.0)
    model_state, opt_state = fused.member_state(0)
    with pytest.raises(ValueError, match="missing"):
        fused.load_member(1, {k: v for k, v in model_state.items() if k != "0.weight"}, opt_state)
    with pytest.raises(ValueError, match="momentum"):
        fused.load_member(1, model_state, {**opt_state, "param_groups": [{**opt_state["param_groups"][0],
                                                                          "momentum": 0.5}]})
    with pytest.raises(ValueError, match="member must be"):
        fused.member_state(2)
