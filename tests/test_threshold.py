"""GAF's threshold (gaf.threshold): one interface that every step uses alike, validated once,
and the registry a run's config builds its threshold from."""

import pytest
import torch
from torch import nn

from gaf import AdaptiveTau, filter_gradients, gaf_step
from gaf.config import RunConfig, threshold_of
from gaf.fast import FastGAFStep, StandInGraphs
from gaf.optim import build_optimizer
from gaf.step import ReferenceGAFStep
from gaf.threshold import THRESHOLDS, FixedTau, Threshold, as_threshold, build_threshold


class Halving(Threshold):
    """A scheme written against the interface alone: tau halves after every step. Its state
    lives on the device, updated in place, so a captured graph can compute and advance it."""

    def __init__(self, tau: float):
        self.tau = torch.tensor(tau)
        self.observed = 0

    def current(self, device=None):
        self.tau = self.tau.to(device or self.tau.device)
        return self.tau.clone()

    def observe(self, distances):
        self.tau.mul_(0.5)
        self.observed += 1

    def capturable(self, device):
        return True

    def graph_key(self):
        return super().graph_key() + (id(self.tau),)

    def state_dict(self):
        return {"tau": self.tau.cpu()}

    def load_state_dict(self, state):
        self.tau = state["tau"].clone()


def test_what_a_user_passes_becomes_a_threshold_validated_once():
    assert as_threshold(0.5).current("cpu") == 0.5
    value = torch.tensor([0.25])
    assert as_threshold(value).current("cpu").shape == () and float(as_threshold(value).current("cpu")) == 0.25
    adaptive = AdaptiveTau(1.0, k=0.5, window=4)
    assert as_threshold(adaptive) is adaptive
    for bad in (-0.1, 2.5, float("nan"), "0.9", True, None):
        with pytest.raises(ValueError, match="tau"):
            as_threshold(bad)
    with pytest.raises(ValueError, match="one value"):
        as_threshold(torch.ones(2))


def test_a_fixed_threshold_learns_nothing_and_resumes_from_any_checkpoint():
    fixed = FixedTau(0.97)
    fixed.observe(torch.tensor([0.1, 0.2]))
    assert fixed.current("cpu") == 0.97 and fixed.state_dict() == {}
    fixed.load_state_dict(None)  # a checkpoint written when only an adaptive tau had state
    assert fixed.current("cpu") == 0.97


@pytest.mark.parametrize("method, name, kind", [({"tau": 0.9}, "fixed", FixedTau),
                                                ({"tau": 0.9, "adaptive_k": 1.0, "adaptive_window": 50}, "adaptive",
                                                 AdaptiveTau)])
def test_a_runs_config_names_a_registered_scheme_and_builds_it(method, name, kind):
    cfg = RunConfig.from_dict({"method": method})
    scheme, arguments = threshold_of(cfg)
    assert scheme == name and THRESHOLDS[scheme] is kind
    threshold = build_threshold(scheme, arguments)
    assert isinstance(threshold, kind) and float(threshold.current("cpu")) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="unknown threshold 'nope'"):
        build_threshold("nope", arguments)


@pytest.mark.parametrize("scheme", sorted(THRESHOLDS))
def test_every_scheme_resumes_exactly_from_its_state(scheme):
    arguments = {"fixed": {"tau": 0.8}, "adaptive": {"tau_max": 1.0, "k": 0.5, "window": 4}}[scheme]
    threshold, resumed = build_threshold(scheme, arguments), build_threshold(scheme, arguments)
    for d in ([0.9, 0.95], [0.7, 0.99], [0.85, 0.8]):
        threshold.observe(torch.tensor(d))
    resumed.load_state_dict(threshold.state_dict())
    assert torch.equal(torch.as_tensor(resumed.current("cpu")), torch.as_tensor(threshold.current("cpu")))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 4))


def batches(steps, n=3, b=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, b, 12, generator=gen), torch.randint(0, 4, (n, b), generator=gen)) for _ in range(steps)]


def test_a_new_scheme_plugs_into_every_step_alike():
    """The filter, the readable step, the fast step eager and captured (a stand-in graph) read a
    scheme only through the interface: the same thresholds, decisions and weights."""
    grads = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    halving = Halving(2.0)
    assert filter_gradients(grads, halving).step and float(halving.current()) == 1.0 and halving.observed == 1
    loss = nn.CrossEntropyLoss()
    models = [tiny_model() for _ in range(3)]
    ref = ReferenceGAFStep(models[0], build_optimizer("sgd", models[0].parameters(), lr=0.1), loss, Halving(2.0))
    fast = [FastGAFStep(m, build_optimizer("sgd", m.parameters(), lr=0.1, masked=True), loss, Halving(2.0),
                        compile=compile, graphs=StandInGraphs() if compile else None)
            for m, compile in zip(models[1:], (False, "graph"))]
    for xs, ys in batches(FastGAFStep.warmup + 3):
        want = ref(xs, ys)
        for step in fast:
            got = step(xs, ys)
            assert torch.equal(got.tau, want.tau) and torch.equal(got.accepted, want.accepted)
    assert fast[1].graphs.captures == 1 and fast[1].tau.observed == FastGAFStep.warmup + 3
    for m in models[1:]:
        for p, q in zip(models[0].parameters(), m.parameters()):
            torch.testing.assert_close(p, q)


def test_gaf_step_observes_the_threshold_it_is_given():
    model, halving = tiny_model(), Halving(2.0)
    xs, ys = batches(1)[0]
    out = gaf_step(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), list(zip(xs, ys)),
                   halving)
    assert out["stepped"] and halving.observed == 1 and float(halving.current()) == 1.0
