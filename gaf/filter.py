"""Gradient Agreement Filtering on tensors: cosine distances, Gram matrices, weights.

Every GAF decision is a function of the n x n Gram matrix G = F F^T of the
flattened micro-gradients F (n, P). With the running aggregate written as
``w @ F`` for a weight vector w, its cosine distance to micro-gradient k is

    D(w @ F, F[k]) = 1 - (w^T G e_k) / sqrt((w^T G w) * G_kk)

so the whole filter runs on an n x n matrix: on one device G is one matmul, across
ranks it is an all-reduce of partial Grams over gradient shards. The decision stays
on the device (no ``.item()``), which lets a training step be captured as a graph.

Conventions (documented behaviour, tested):
- A zero-norm vector has cosine distance 1 to anything (it is treated as orthogonal),
  which is what ``torch.nn.functional.cosine_similarity`` gives and therefore what the
  authors' package does: with tau >= 1 a zero micro-gradient is accepted, below 1 not.
- ``filter_gradients`` raises on a non-finite micro-gradient, naming it. The
  sync-free ``agreement_weights`` cannot raise without a host sync: there a
  non-finite Gram matrix rejects every later micro-gradient, so the step is skipped
  and the distances involving the bad micro-gradient read NaN.

The threshold tau is a ``gaf.threshold.Threshold`` (fixed or adaptive); this module decides
with the value it gives. It imports only torch and gaf.threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gaf.threshold import D_MAX, D_MIN, Tau, as_threshold, check_tau

MERGES = ("halving", "mean")


def check_merge(merge: str) -> str:
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    return merge


def check_n(n: int, counted: str = "") -> None:
    """GAF compares later micro-gradients with the first: it needs at least two."""
    if n < 2:
        raise ValueError(f"GAF needs n >= 2 micro-gradients (one per microbatch), got n={n}"
                         + (f" ({counted})" if counted else ""))


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - a.b / (|a| |b|)`` over all elements, as a 0-d tensor in [0, 2].

    A zero-norm input gives distance 1 (see the module docstring).
    """
    if a.numel() != b.numel():
        raise ValueError(f"cosine_distance needs equal sizes, got {a.numel()} and {b.numel()}")
    a, b = a.reshape(-1), b.reshape(-1)
    dot = torch.dot(a, b)
    norms = a.norm() * b.norm()
    sim = torch.where(norms > 0, dot / norms.clamp(min=torch.finfo(norms.dtype).tiny), 0.0)
    return (1.0 - sim).clamp(D_MIN, D_MAX)


def gram_matrix(grads: torch.Tensor) -> torch.Tensor:
    """G = F F^T for micro-gradients F of shape (n, P), accumulated in at least fp32."""
    f = grads if grads.dtype in (torch.float32, torch.float64) else grads.float()
    return f @ f.T


def agreement_weights(
    gram: torch.Tensor, tau: float | torch.Tensor, merge: str = "halving"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sequential GAF decision from the n x n Gram matrix alone.

    Walks k = 1..n-1: micro-gradient k is accepted iff the cosine distance from the
    running aggregate ``w @ F`` to ``F[k]`` is <= tau; an accepted one is merged by
    ``merge``: ``"halving"`` is the authors' package, ``w <- (w + e_k) / 2``;
    ``"mean"`` their multi-GPU script, ``w <- (c w + e_k) / (c + 1)`` with c the
    count merged so far.

    Returns ``(weights (n,), accepted (n,) bool, distances (n-1,))``, all on
    ``gram``'s device, with no host synchronisation; the aggregate is
    ``weights @ F`` and a step should be taken iff ``accepted[1:].any()``.
    ``tau`` may be a float or a 0-d tensor (an adaptive threshold).
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square (n, n) matrix, got shape {tuple(gram.shape)}")
    check_n(gram.shape[0])
    check_merge(merge)
    if not isinstance(tau, torch.Tensor):
        check_tau(tau)
    return agreement_weights_unchecked(gram, tau, merge)


def agreement_weights_unchecked(
    gram: torch.Tensor, tau: float | torch.Tensor, merge: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``agreement_weights`` on arguments validated once where the step was set up: what a
    stepper calls at every step."""
    n = gram.shape[0]
    g = gram.double() if gram.device.type == "cpu" else gram.float()
    if isinstance(tau, torch.Tensor):  # compared in the distances' precision, as a Python number is
        tau = tau.to(device=g.device, dtype=g.dtype)
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    w = eye[0].clone()
    count = torch.ones((), dtype=g.dtype, device=g.device)  # micro-gradients merged
    accepted, distances = [torch.ones((), dtype=torch.bool, device=g.device)], []
    finite = torch.isfinite(g).all()
    for k in range(1, n):
        gw = g @ w
        dot, agg_sq = gw[k], torch.dot(w, gw).clamp(min=0)
        norms = (agg_sq * g[k, k].clamp(min=0)).sqrt()
        sim = torch.where(norms > 0, dot / norms.clamp(min=torch.finfo(g.dtype).tiny), 0.0)
        d = torch.where(torch.isfinite(norms), (1.0 - sim).clamp(D_MIN, D_MAX), torch.nan)
        ok = (d <= tau) & finite
        if merge == "halving":
            merged = 0.5 * (w + eye[k])
        else:
            merged = (count * w + eye[k]) / (count + 1)
        w = torch.where(ok, merged, w)
        count = count + ok.to(g.dtype)
        accepted.append(ok)
        distances.append(d)
    return w.to(gram.dtype), torch.stack(accepted), torch.stack(distances).to(gram.dtype)


@dataclass
class FilterResult:
    aggregate: torch.Tensor  # (P,) == weights @ grads
    accepted: torch.Tensor  # (n,) bool; accepted[0] is True
    distances: torch.Tensor  # (n-1,) distance of g_k to the aggregate at that point
    weights: torch.Tensor  # (n,)
    step: bool  # at least one later micro-gradient accepted


class NonFiniteGradientError(ValueError):
    """A micro-gradient holds NaN or Inf (training diverged): there is nothing to filter."""


def check_finite(grads: torch.Tensor) -> None:
    """Raise ``NonFiniteGradientError`` naming the micro-gradients (rows) that hold NaN or Inf
    (one host sync)."""
    finite = torch.isfinite(grads).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise NonFiniteGradientError(f"micro-gradient(s) {bad} contain NaN or Inf; cannot filter")


def filter_gradients(grads: torch.Tensor, tau: Tau, merge: str = "halving") -> FilterResult:
    """Filter flattened micro-gradients ``grads`` (n, P) by agreement; the readable API.
    ``tau``: a number, a one-value tensor or a ``gaf.threshold.Threshold`` (it observes the distances).

    Raises ValueError on bad shapes, n < 2, tau outside [0, 2], an unknown merge,
    or a non-finite micro-gradient (naming its index).
    """
    if not isinstance(grads, torch.Tensor) or grads.dim() != 2:
        shape = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
        raise ValueError(f"grads must be an (n, P) tensor of flattened micro-gradients, got {shape}")
    check_n(grads.shape[0])
    threshold = as_threshold(tau)
    check_merge(merge)
    check_finite(grads)
    weights, accepted, distances = agreement_weights_unchecked(gram_matrix(grads), threshold.current(grads.device),
                                                               merge)
    threshold.observe(distances)
    aggregate = weights.to(grads.dtype) @ grads
    return FilterResult(aggregate, accepted, distances, weights, bool(accepted[1:].any()))
