"""gaf_step against the authors' package, and the skip semantics of a GAF step."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from gaf import gaf_step

reference = pytest.importorskip("gradient_agreement_filtering")


def small_cnn(classes=5):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    )


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)


def max_difference(a, b, opt_a, opt_b):
    diffs = [(p - q).abs().max() for p, q in zip(a.state_dict().values(), b.state_dict().values()) if p.is_floating_point()]
    for p, q in zip(a.parameters(), b.parameters()):
        ma, mb = opt_a.state.get(p, {}), opt_b.state.get(q, {})
        assert ma.keys() == mb.keys()
        if "momentum_buffer" in ma:
            diffs.append((ma["momentum_buffer"] - mb["momentum_buffer"]).abs().max())
    return float(max(diffs))


@pytest.mark.parametrize("n", [2, 3, 4, 5])
@pytest.mark.parametrize("tau", [0.5, 0.97, 1.0, 2.0])
def test_gaf_step_equals_authors_step_GAF(n, tau):
    gen = torch.Generator().manual_seed(100 * n + int(100 * tau))
    size, steps = 6, 6
    x = torch.randn(steps * n * size, 3, 8, 8, generator=gen)
    y = torch.randint(0, 5, (steps * n * size,), generator=gen)
    dataset = TensorDataset(x, y)
    ours, theirs = small_cnn(), small_cnn()
    opt_ours, opt_theirs = sgd(ours), sgd(theirs)
    loss_fn = nn.CrossEntropyLoss()
    decisions = set()
    for s in range(steps):
        idx = [list(range((s * n + i) * size, (s * n + i + 1) * size)) for i in range(n)]
        mine = gaf_step(ours, opt_ours, loss_fn, [(x[i], y[i]) for i in idx], tau)
        ref = reference.step_GAF(theirs, opt_theirs, loss_fn, [Subset(dataset, i) for i in idx],
                                 wandb=False, verbose=False, cos_distance_thresh=tau)
        assert mine["accepted"] == ref["agreed_count"]
        assert mine["distances"][-1] == pytest.approx(ref["cosine_distance"], abs=1e-5)
        assert mine["accuracy"] == pytest.approx(ref["train_accuracy"])
        decisions.add(mine["stepped"])
    diff = max_difference(ours, theirs, opt_ours, opt_theirs)
    print(f"n={n} tau={tau} decisions={decisions} max |param/momentum diff| = {diff:.3g}")
    assert diff <= 1e-6
    if True in decisions:  # the comparison is not vacuous: training moved the weights
        moved = max(float((p - q).detach().abs().max()) for p, q in zip(ours.parameters(), small_cnn().parameters()))
        assert moved > 1e-3


def test_the_differential_grid_exercises_both_decisions():
    """Guard against a vacuous differential test: its data must make GAF both step and skip."""
    seen = set()
    for n, tau in [(2, 0.5), (2, 2.0), (3, 0.97), (3, 1.0)]:
        model = small_cnn()
        opt = sgd(model)
        gen = torch.Generator().manual_seed(100 * n + int(100 * tau))
        x, y = torch.randn(n * 6, 3, 8, 8, generator=gen), torch.randint(0, 5, (n * 6,), generator=gen)
        mbs = [(x[i * 6:(i + 1) * 6], y[i * 6:(i + 1) * 6]) for i in range(n)]
        seen.add(gaf_step(model, opt, nn.CrossEntropyLoss(), mbs, tau)["stepped"])
    assert seen == {True, False}


@pytest.mark.parametrize("make_opt", [
    lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
])
def test_no_agreement_leaves_params_and_optimizer_untouched(make_opt):
    model = small_cnn()
    opt = make_opt(model)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    batch = lambda: [(torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 5, (4,), generator=gen)) for _ in range(3)]
    gaf_step(model, opt, loss_fn, batch(), tau=2.0)  # one real step creates optimizer state
    params = copy.deepcopy([p.detach() for p in model.parameters()])
    state = copy.deepcopy(opt.state_dict())
    out = gaf_step(model, opt, loss_fn, batch(), tau=0.0)  # distinct gradients never agree at 0
    assert out == {**out, "stepped": False, "accepted": 0}
    for p, q in zip(params, model.parameters()):
        assert torch.equal(p, q)
    after = opt.state_dict()
    for key, st in state["state"].items():
        for name, value in st.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][key][name])), name
    assert all(p.grad is None for p in model.parameters())


def test_gaf_step_reports_metrics():
    model = small_cnn()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    out = gaf_step(model, sgd(model), nn.CrossEntropyLoss(), [(x[:4], y[:4]), (x[4:], y[4:])], tau=2.0, merge="mean")
    assert set(out) == {"loss", "accuracy", "distances", "accepted", "stepped", "weights"}
    assert out["stepped"] and out["accepted"] == 1 and len(out["distances"]) == 1
    assert out["weights"] == pytest.approx([0.5, 0.5])
    assert 0 <= out["accuracy"] <= 1 and out["loss"] > 0


def test_gaf_step_bad_input():
    model = small_cnn()
    opt, loss_fn = sgd(model), nn.CrossEntropyLoss()
    mb = (torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,)))
    with pytest.raises(ValueError, match="n >= 2"):
        gaf_step(model, opt, loss_fn, [mb], tau=1.0)
    with pytest.raises(ValueError, match="2.5"):
        gaf_step(model, opt, loss_fn, [mb, mb], tau=2.5)
    with pytest.raises(ValueError, match="'avg'"):
        gaf_step(model, opt, loss_fn, [mb, mb], tau=1.0, merge="avg")
    with pytest.raises(ValueError, match="microbatch 1 has 2 inputs but 3 targets"):
        gaf_step(model, opt, loss_fn, [mb, (mb[0], torch.zeros(3, dtype=torch.long))], tau=1.0)
