"""The GAF decision: Gram-based weights against a direct running computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from gaf import AdaptiveTau, agreement_weights, cosine_distance, filter_gradients, gram_matrix


def direct_filter(grads, tau, merge):
    """The algorithm as docs/paper.md states it, on vectors (no Gram matrix): the oracle."""
    agg, count = grads[0].double().clone(), 1
    accepted, distances = [True], []
    for g in grads[1:].double():
        d = float(1 - F.cosine_similarity(agg, g, dim=0))
        distances.append(d)
        ok = d <= tau
        accepted.append(ok)
        if ok:
            agg = (agg + g) / 2 if merge == "halving" else (count * agg + g) / (count + 1)
            count += 1
    return agg, accepted, distances


def adversarial_sets():
    torch.manual_seed(0)
    a, b = torch.randn(64), torch.randn(64)
    b_orth = torch.cat([torch.zeros(32), b[32:]])  # exactly orthogonal to a_half
    a_half = torch.cat([a[:32], torch.zeros(32)])
    z = torch.zeros(64)
    return {
        "identical": torch.stack([a, a, a, a]),
        "opposite": torch.stack([a, -a, a, -a]),
        "orthogonal": torch.stack([a_half, b_orth, a_half, b_orth]),
        "zero_first": torch.stack([z, a, b, a]),
        "zero_later": torch.stack([a, z, b, z]),
        "all_zero": torch.stack([z, z, z]),
        "scaled": torch.stack([a, 0.5 * a, 2 * a]),
    }


@pytest.mark.parametrize("merge", ["halving", "mean"])
@pytest.mark.parametrize("tau", [0.0, 0.5, 0.97, 1.0, 1.05, 2.0])
def test_gram_decisions_equal_direct_on_random(merge, tau):
    gen = torch.Generator().manual_seed(1)
    for n in range(2, 9):
        # Correlated gradients so that every tau splits some decisions.
        base = torch.randn(1, 200, generator=gen)
        grads = base * torch.rand(n, 1, generator=gen) + torch.randn(n, 200, generator=gen)
        agg, accepted, distances = direct_filter(grads, tau, merge)
        res = filter_gradients(grads, tau, merge)
        assert res.accepted.tolist() == accepted
        torch.testing.assert_close(res.distances.double(), torch.tensor(distances, dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(res.aggregate.double(), agg, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.weights.double() @ grads.double(), agg, atol=1e-5, rtol=1e-5)
        assert res.step == any(accepted[1:])


@pytest.mark.parametrize("merge", ["halving", "mean"])
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.5, 2.0])
@pytest.mark.parametrize("name", list(adversarial_sets()))
def test_gram_decisions_equal_direct_on_adversarial(name, tau, merge):
    grads = adversarial_sets()[name]
    agg, accepted, distances = direct_filter(grads, tau, merge)
    res = filter_gradients(grads, tau, merge)
    assert res.accepted.tolist() == accepted, (res.distances, distances)
    torch.testing.assert_close(res.distances.double(), torch.tensor(distances, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.aggregate.double(), agg, atol=1e-4, rtol=1e-5)


def test_adversarial_distances_have_documented_values():
    sets = adversarial_sets()
    assert filter_gradients(sets["identical"], 0.0).distances.tolist() == pytest.approx([0, 0, 0], abs=1e-6)
    # a vs -a: opposite (2); after rejecting, agg is still a, so a again is 0.
    assert filter_gradients(sets["opposite"], 1.0).distances.tolist() == pytest.approx([2, 0, 2], abs=1e-6)
    assert filter_gradients(sets["orthogonal"], 0.5).distances.tolist() == pytest.approx([1, 0, 1], abs=1e-6)
    # Zero-norm vectors are orthogonal to everything: accepted at tau >= 1 only.
    assert filter_gradients(sets["all_zero"], 1.0).accepted.tolist() == [True, True, True]
    assert filter_gradients(sets["all_zero"], 0.99).accepted.tolist() == [True, False, False]
    assert not filter_gradients(sets["all_zero"], 0.99).step


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_tau_two_is_plain_averaging_with_mean_merge(n):
    grads = torch.randn(n, 300, generator=torch.Generator().manual_seed(n))
    res = filter_gradients(grads, 2.0, "mean")
    assert res.accepted.all() and res.step
    torch.testing.assert_close(res.aggregate, grads.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.weights, torch.full((n,), 1.0 / n))


def test_halving_weights_are_geometric():
    res = filter_gradients(torch.randn(4, 10), 2.0, "halving")
    torch.testing.assert_close(res.weights, torch.tensor([0.125, 0.125, 0.25, 0.5]))


def test_agreement_weights_from_partial_grams_equal_full_gram():
    """Summing Grams of column shards (what ranks all-reduce) gives the same decision."""
    grads = torch.randn(4, 1000, generator=torch.Generator().manual_seed(3))
    full = agreement_weights(gram_matrix(grads), 1.0)
    partial = sum(gram_matrix(shard) for shard in grads.chunk(7, dim=1))
    for a, b in zip(full, agreement_weights(partial, 1.0)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_agreement_weights_take_tensor_tau_and_reject_nan():
    g = torch.randn(3, 50)
    g[1] = float("nan")
    w, acc, d = agreement_weights(gram_matrix(g), torch.tensor(2.0))
    assert acc.tolist() == [True, False, False]  # any non-finite gradient skips the step
    assert torch.isnan(d[0])
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0, 0.0]))


def test_cosine_distance():
    a = torch.tensor([1.0, 0.0])
    assert float(cosine_distance(a, a)) == pytest.approx(0.0)
    assert float(cosine_distance(a, torch.tensor([0.0, 3.0]))) == pytest.approx(1.0)
    assert float(cosine_distance(a, -a)) == pytest.approx(2.0)
    assert float(cosine_distance(a, torch.zeros(2))) == pytest.approx(1.0)
    assert float(cosine_distance(torch.ones(2, 3), torch.ones(6))) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="equal sizes"):
        cosine_distance(torch.ones(3), torch.ones(4))


@pytest.mark.parametrize("tau", [-0.1, 2.01, float("nan"), "0.9", True])
def test_bad_tau_is_a_clear_error(tau):
    with pytest.raises(ValueError, match="tau"):
        filter_gradients(torch.randn(2, 5), tau)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="n >= 2.*n=1"):
        filter_gradients(torch.randn(1, 5), 1.0)
    with pytest.raises(ValueError, match=r"\(n, P\).*\(5,\)"):
        filter_gradients(torch.randn(5), 1.0)
    with pytest.raises(ValueError, match="'sum'"):
        filter_gradients(torch.randn(2, 5), 1.0, merge="sum")
    with pytest.raises(ValueError, match="square"):
        agreement_weights(torch.randn(2, 3), 1.0)
    g = torch.randn(3, 5)
    g[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"micro-gradient\(s\) \[2\]"):
        filter_gradients(g, 1.0)


def test_adaptive_tau_follows_mean_plus_k_std():
    tau = AdaptiveTau(tau_max=1.0, k=2.0, window=4)
    assert float(tau.current()) == 1.0  # no history yet
    history = [0.90, 0.92, 0.94, 0.96, 0.80, 0.82]
    for d in history:
        tau.observe(torch.tensor([d]))
    window = torch.tensor(history[-4:], dtype=torch.float64)
    expected = min(1.0, float(window.mean() + 2.0 * window.std()))
    assert float(tau.current()) == pytest.approx(expected, abs=1e-6)
    tau.observe(torch.tensor([5.0, 5.0, 5.0, 5.0, 5.0]))  # more than a window at once
    assert float(tau.current()) == pytest.approx(1.0)  # capped at tau_max


def test_adaptive_tau_is_usable_as_tau_and_checkpointable():
    gen = torch.Generator().manual_seed(5)
    tau = AdaptiveTau(tau_max=1.0, k=0.0, window=10)
    grads = torch.randn(3, 100, generator=gen)
    first = filter_gradients(grads, tau)  # uses tau_max, records 2 distances
    assert first.accepted.tolist() == direct_filter(grads, 1.0, "halving")[1]
    mean = float(first.distances.mean())
    assert float(tau.current()) == pytest.approx(min(1.0, mean), abs=1e-6)
    clone = AdaptiveTau()
    clone.load_state_dict(tau.state_dict())
    assert float(clone.current()) == pytest.approx(float(tau.current()))
    with pytest.raises(ValueError, match="window"):
        AdaptiveTau(1.0, 1.0, window=1)
    with pytest.raises(ValueError, match="tau"):
        AdaptiveTau(tau_max=3.0)


def test_decision_is_finite_for_huge_gradients():
    g = torch.randn(3, 10) * 1e18
    res = filter_gradients(g, 2.0)
    assert torch.isfinite(res.distances).all() and res.step
    assert not math.isnan(float(res.aggregate.sum()))
