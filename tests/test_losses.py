"""The robust losses against values computed by hand on a 3-class example."""

import math

import pytest
import torch
import torch.nn.functional as F

from gaf.losses import (LOSSES, RCE_LOG_ZERO, build_loss, generalized_cross_entropy, reverse_cross_entropy,
                        sce_weights, symmetric_cross_entropy)

# log-probabilities as logits: softmax gives back p = (0.5, 0.3, 0.2) exactly (up to rounding)
P = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
LOGITS = P.log().repeat(2, 1)
TARGETS = torch.tensor([0, 2])


def test_gce_by_hand():
    expected = [(1 - 0.5**0.7) / 0.7, (1 - 0.2**0.7) / 0.7]  # 0.54919, 0.96553
    got = generalized_cross_entropy(LOGITS, TARGETS, q=0.7, reduction="none")
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(generalized_cross_entropy(LOGITS, TARGETS, q=0.7)) == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_gce_tends_to_cross_entropy_as_q_goes_to_zero_and_is_mae_at_one():
    ce = F.cross_entropy(LOGITS, TARGETS, reduction="none")
    gaps = [float((generalized_cross_entropy(LOGITS, TARGETS, q, "none") - ce).abs().max())
            for q in (0.5, 0.1, 0.01, 0.001)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps  # monotone approach
    assert gaps[-1] < 2e-3
    at_one = generalized_cross_entropy(LOGITS, TARGETS, q=1.0, reduction="none")
    assert at_one.tolist() == pytest.approx([1 - 0.5, 1 - 0.2], rel=1e-6)  # 1 - p_y


def test_gce_is_finite_for_confident_wrong_predictions():
    logits = torch.tensor([[80.0, -80.0, 0.0]], requires_grad=True)
    loss = generalized_cross_entropy(logits, torch.tensor([1]))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(1 / 0.7)  # p_y ~ 0: the bounded maximum 1/q
    assert torch.isfinite(logits.grad).all()


def test_rce_and_sce_by_hand():
    # RCE = -A (1 - p_y) with A = -4: 4 * 0.5 and 4 * 0.8
    assert RCE_LOG_ZERO == -4.0
    rce = reverse_cross_entropy(LOGITS, TARGETS, reduction="none")
    assert rce.tolist() == pytest.approx([2.0, 3.2], rel=1e-6)
    sce = symmetric_cross_entropy(LOGITS, TARGETS, alpha=6.0, beta=0.1, reduction="none")
    assert sce.tolist() == pytest.approx([6 * -math.log(0.5) + 0.2, 6 * -math.log(0.2) + 0.32], rel=1e-6)


def test_rce_is_clipped_at_minus_a():
    # all mass on a wrong class: log 0 is clipped, so RCE is 4, not infinite; all mass on the label: 0
    logits = torch.tensor([[0.0, 60.0, 0.0], [60.0, 0.0, 0.0]])
    assert reverse_cross_entropy(logits, torch.tensor([0, 0]), "none").tolist() == pytest.approx([4.0, 0.0], abs=1e-6)


def test_label_smoothing_is_torchs_and_matches_hand_value():
    s = 0.1  # target distribution (1 - s) onehot + s / 3
    t = [(1 - s) + s / 3, s / 3, s / 3]
    expected = -sum(tk * math.log(pk) for tk, pk in zip(t, P.tolist()))  # 0.74068
    loss = build_loss("label_smoothing", 3, smoothing=s)
    assert isinstance(loss, torch.nn.CrossEntropyLoss) and loss.label_smoothing == s
    assert float(loss(LOGITS[:1], TARGETS[:1])) == pytest.approx(expected, rel=1e-6)


def test_sce_defaults_follow_the_data_that_ran():
    assert sce_weights(100, None, None) == (6.0, 0.1)
    assert sce_weights(10, None, None) == (0.1, 1.0)
    assert sce_weights(10, 2.0, None) == (2.0, 1.0)


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_builds_and_reduces(name):
    fn, per_sample = build_loss(name, 3), build_loss(name, 3, reduction="none")
    assert per_sample(LOGITS, TARGETS).shape == (2,)
    assert float(fn(LOGITS, TARGETS)) == pytest.approx(float(per_sample(LOGITS, TARGETS).mean()), rel=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: build_loss("mse", 3), "loss must be one of"),
    (lambda: build_loss("gce", 3, q=0.0), r"q must be in \(0, 1\]"),
    (lambda: build_loss("label_smoothing", 3, smoothing=1.0), r"in \[0, 1\)"),
    (lambda: symmetric_cross_entropy(LOGITS, TARGETS, 0.0, 0.0), "not both 0"),
    (lambda: generalized_cross_entropy(LOGITS, TARGETS, reduction="sum"), "reduction must be one of"),
])
def test_bad_settings_are_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
