"""Co-teaching's exchange: each network steps on exactly the samples its peer finds easiest."""

import copy

import pytest
import torch
from torch import nn

from gaf.coteaching import CoTeachingStep, kept_count, small_loss_indices
from gaf.losses import build_loss


def test_small_loss_indices_keeps_exactly_the_smallest_fraction():
    losses = torch.tensor([0.9, 0.1, 0.5, 0.1, 2.0, 0.3])
    assert small_loss_indices(losses, 3).tolist() == [1, 3, 5]  # ties by position
    assert kept_count(10, 0.0) == 10 and kept_count(10, 0.4) == 6 and kept_count(10, 0.99) == 1
    assert kept_count(128, 0.4) == 76  # int((1 - 0.4) * 128): Han et al.'s rounding


def _pair(seed=0):
    torch.manual_seed(seed)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    return a, b, torch.optim.SGD(a.parameters(), lr=0.5), torch.optim.SGD(b.parameters(), lr=0.5)


def _expected(net, x, y, pick, lr=0.5):
    net = copy.deepcopy(net)
    nn.functional.cross_entropy(net(x[pick]), y[pick]).backward()
    return [p.detach() - lr * p.grad for p in net.parameters()]


def test_each_network_updates_on_its_peers_small_loss_samples():
    a, b, opt_a, opt_b = _pair()
    x, y = torch.randn(2, 4, 5), torch.randint(0, 3, (2, 4))
    per_sample = build_loss("ce", 3, reduction="none")
    flat_x, flat_y = x.flatten(0, 1), y.flatten()
    with torch.no_grad():
        loss_a, loss_b = per_sample(a(flat_x), flat_y), per_sample(b(flat_x), flat_y)
    step = CoTeachingStep(a, b, opt_a, opt_b, per_sample, forget_rate=0.5, ramp_epochs=0, train_size=8)
    assert step.forget_fraction() == 0.5  # no ramp: R = forget_rate at once
    keep = kept_count(8, 0.5)
    want_a = _expected(a, flat_x, flat_y, small_loss_indices(loss_b, keep))  # a learns from b's choice
    want_b = _expected(b, flat_x, flat_y, small_loss_indices(loss_a, keep))
    assert not torch.equal(small_loss_indices(loss_a, keep).sort().values,
                           small_loss_indices(loss_b, keep).sort().values), "the example must tell the two apart"
    step(x, y)
    for got, want in zip(list(a.parameters()) + list(b.parameters()), want_a + want_b):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-6)
    assert step.images_seen == 8


def test_forget_fraction_ramps_over_the_first_epochs_then_holds():
    a, b, opt_a, opt_b = _pair()
    step = CoTeachingStep(a, b, opt_a, opt_b, build_loss("ce", 3, reduction="none"), 0.4, ramp_epochs=10,
                          train_size=100)
    for seen, want in [(0, 0.0), (500, 0.2), (1000, 0.4), (5000, 0.4)]:
        step.images_seen = seen
        assert step.forget_fraction() == pytest.approx(want)


def test_state_dict_round_trips_the_peer_and_its_optimizer():
    a, b, opt_a, opt_b = _pair()
    step = CoTeachingStep(a, b, opt_a, opt_b, build_loss("ce", 3, reduction="none"), 0.2, 1, 8)
    step(torch.randn(1, 8, 5), torch.randint(0, 3, (1, 8)))
    state = copy.deepcopy(step.state_dict())
    a2, b2, opt_a2, opt_b2 = _pair(seed=1)
    other = CoTeachingStep(a2, b2, opt_a2, opt_b2, build_loss("ce", 3, reduction="none"), 0.2, 1, 8)
    other.load_state_dict(state)
    assert other.images_seen == 8
    for p, q in zip(b.parameters(), b2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kwargs, match", [({"forget_rate": 1.0}, "forget_rate"), ({"ramp_epochs": -1}, "ramp_epochs")])
def test_bad_settings(kwargs, match):
    a, b, opt_a, opt_b = _pair()
    args = {"forget_rate": 0.2, "ramp_epochs": 10, "train_size": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        CoTeachingStep(a, b, opt_a, opt_b, build_loss("ce", 3, reduction="none"), **args)
