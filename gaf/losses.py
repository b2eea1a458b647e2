"""Losses robust to noisy labels, the alternatives a practitioner would try before GAF.

Plain functions of logits (N, C) and integer targets (N,), the mean over the batch
(``reduction="none"``: one value per sample, which co-teaching ranks):

- ``generalized_cross_entropy``: (1 - p_y^q) / q (Zhang & Sabuncu, 2018). q -> 0 is
  cross-entropy, q = 1 the mean absolute error; q = 0.7 is the paper's choice.
- ``symmetric_cross_entropy``: alpha CE + beta RCE (Wang et al., 2019), where the reverse
  cross-entropy RCE = -sum_k p_k log(onehot_k) with log 0 taken as ``RCE_LOG_ZERO`` = -4,
  the paper's A. (Its public code clamps the one-hot at 1e-4, whose natural log is -9.2:
  RCE 2.3 times larger for the same beta.)
- label smoothing is torch's own ``nn.CrossEntropyLoss(label_smoothing=...)``.

``build_loss`` turns a loss name and its settings into the callable every stepper takes.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOSSES = ("ce", "label_smoothing", "gce", "sce")
REDUCTIONS = ("mean", "none")
RCE_LOG_ZERO = -4.0

# Wang et al.'s settings, chosen by the number of classes of the data that actually ran
# (a CIFAR-10 stand-in for CIFAR-100 gets CIFAR-10's): (alpha, beta).
SCE_DEFAULTS = {10: (0.1, 1.0), 100: (6.0, 0.1)}


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return per_sample.mean() if reduction == "mean" else per_sample


def _check_q(q: float) -> None:
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1] (q -> 0 is cross-entropy, 1 the mean absolute error), got {q}")


def generalized_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, q: float = 0.7,
                              reduction: str = "mean") -> torch.Tensor:
    """(1 - p_y^q) / q, with p_y^q computed as exp(q log p_y) so that a confident wrong
    prediction neither underflows nor overflows."""
    _check_q(q)
    log_p_y = F.log_softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)
    return _reduce(-torch.expm1(q * log_p_y) / q, reduction)


def reverse_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """-sum_k p_k log(onehot_k) with log 0 = ``RCE_LOG_ZERO``: -A times the probability
    given to every class but the label."""
    p = F.softmax(logits.float(), dim=1)
    off_label = p.sum(1) - p.gather(1, targets[:, None]).squeeze(1)  # gather, not one_hot: vmap can batch it
    return _reduce(-RCE_LOG_ZERO * off_label, reduction)


def symmetric_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, alpha: float, beta: float,
                            reduction: str = "mean") -> torch.Tensor:
    """alpha CE + beta RCE."""
    if alpha < 0 or beta < 0 or alpha + beta == 0:
        raise ValueError(f"alpha and beta must be >= 0 and not both 0, got alpha={alpha}, beta={beta}")
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return _reduce(alpha * ce + beta * reverse_cross_entropy(logits, targets, "none"), reduction)


def sce_weights(num_classes: int, alpha: float | None, beta: float | None) -> tuple[float, float]:
    """(alpha, beta): the given ones, else Wang et al.'s for the nearest of CIFAR-10/100."""
    nearest = min(SCE_DEFAULTS, key=lambda c: abs(c - num_classes))
    default_alpha, default_beta = SCE_DEFAULTS[nearest]
    return (default_alpha if alpha is None else alpha, default_beta if beta is None else beta)


def build_loss(name: str, num_classes: int, *, smoothing: float = 0.1, q: float = 0.7, alpha: float | None = None,
               beta: float | None = None, reduction: str = "mean") -> LossFn:
    """The loss ``name`` (one of ``LOSSES``) as a callable of (logits, targets)."""
    if name == "ce":
        return nn.CrossEntropyLoss(reduction=reduction)
    if name == "label_smoothing":
        if not 0 <= smoothing < 1:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        return nn.CrossEntropyLoss(label_smoothing=smoothing, reduction=reduction)
    if name == "gce":
        _check_q(q)
        return partial(generalized_cross_entropy, q=q, reduction=reduction)
    if name == "sce":
        a, b = sce_weights(num_classes, alpha, beta)
        return partial(symmetric_cross_entropy, alpha=a, beta=b, reduction=reduction)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
