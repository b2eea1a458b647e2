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

This module imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

MERGES = ("halving", "mean")

# Cosine distance lies in [0, 2]; rounding can push it slightly outside.
_D_MIN, _D_MAX = 0.0, 2.0


class AdaptiveTau:
    """Adaptive threshold, the paper's future work: tau_t = min(tau_max, mean + k*std).

    The mean and (unbiased) standard deviation are over the last ``window``
    distances observed. Until two distances have been seen, tau_t = tau_max.
    The history lives in a ring buffer on the distances' device, so ``current()``
    and ``observe()`` never synchronise with the host. Use it wherever a float tau
    is accepted: ``filter_gradients``, ``gaf_step`` and the trainer call
    ``current()`` before a decision and ``observe()`` with the step's distances.
    """

    def __init__(self, tau_max: float = 1.0, k: float = 1.0, window: int = 200):
        check_tau(tau_max)
        if not (isinstance(window, int) and window >= 2):
            raise ValueError(f"AdaptiveTau window must be an integer >= 2, got {window!r}")
        if not math.isfinite(k):
            raise ValueError(f"AdaptiveTau k must be finite, got {k!r}")
        self.tau_max, self.k, self.window = float(tau_max), float(k), window
        self._buffer: torch.Tensor | None = None  # (window,) ring buffer of distances
        self._count: torch.Tensor | None = None  # 0-d long: distances seen so far

    def _ensure(self, device: torch.device) -> None:
        if self._buffer is None:
            self._buffer = torch.zeros(self.window, dtype=torch.float32, device=device)
            self._count = torch.zeros((), dtype=torch.long, device=device)
        elif self._buffer.device != device:
            self._buffer, self._count = self._buffer.to(device), self._count.to(device)

    def current(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The threshold for the next decision, as a 0-d float32 tensor on ``device`` (None:
        where the history lives, the CPU before any). A step calls it once, on its gradients' device."""
        if device is None:
            device = self._buffer.device if self._buffer is not None else "cpu"
        self._ensure(torch.device(device))
        filled = self._count.clamp(max=self.window)
        valid = (torch.arange(self.window, device=self._buffer.device) < filled).float()
        denom = filled.clamp(min=1).float()
        mean = (self._buffer * valid).sum() / denom
        var = (((self._buffer - mean) * valid) ** 2).sum() / (filled - 1).clamp(min=1).float()
        adaptive = mean + self.k * var.sqrt()
        tau_max = torch.full((), self.tau_max, device=self._buffer.device)
        tau = torch.where(filled >= 2, torch.minimum(tau_max, adaptive), tau_max)
        return tau.clamp(_D_MIN, _D_MAX)

    def observe(self, distances: torch.Tensor) -> None:
        """Append a step's distances (any shape) to the history, on the device."""
        d = distances.detach().reshape(-1).float()
        self._ensure(d.device)
        m = d.numel()
        if m == 0:
            return
        if m > self.window:
            d = d[-self.window :]
            self._count += m - self.window
            m = self.window
        slots = (self._count + torch.arange(m, device=d.device)) % self.window
        self._buffer.index_copy_(0, slots, d.to(self._buffer.device))
        self._count += m

    def state_dict(self) -> dict:
        return {
            "tau_max": self.tau_max,
            "k": self.k,
            "window": self.window,
            "buffer": None if self._buffer is None else self._buffer.cpu(),
            "count": None if self._count is None else self._count.cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.tau_max, self.k, self.window = state["tau_max"], state["k"], state["window"]
        self._buffer, self._count = state["buffer"], state["count"]

    def __repr__(self) -> str:
        return f"AdaptiveTau(tau_max={self.tau_max}, k={self.k}, window={self.window})"


Tau = Union[float, torch.Tensor, AdaptiveTau]


def check_tau(tau: float) -> float:
    """Validate a numeric threshold; cosine distance lives in [0, 2]."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise ValueError(f"tau must be a number in [0, 2] or an AdaptiveTau, got {tau!r}")
    if not (0.0 <= tau <= 2.0):
        raise ValueError(f"tau must lie in [0, 2] (cosine distance range), got {tau}")
    return float(tau)


def check_threshold(tau: Tau) -> None:
    """Validate a threshold of any kind: a number in [0, 2], a one-value tensor (read at every
    step, so it may change in place) or an ``AdaptiveTau`` (checked when it was made)."""
    if isinstance(tau, AdaptiveTau):
        return
    if isinstance(tau, torch.Tensor):
        if tau.numel() != 1:
            raise ValueError(f"tau tensor must hold one value, got shape {tuple(tau.shape)}")
        return
    check_tau(tau)


def check_merge(merge: str) -> str:
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    return merge


def check_n(n: int, counted: str = "") -> None:
    """GAF compares later micro-gradients with the first: it needs at least two."""
    if n < 2:
        raise ValueError(f"GAF needs n >= 2 micro-gradients (one per microbatch), got n={n}"
                         + (f" ({counted})" if counted else ""))


def check_gaf_settings(tau: Tau, merge: str) -> None:
    """The settings of a GAF step, validated once where a step is set up or entered."""
    check_threshold(tau)
    check_merge(merge)


def resolve_tau(tau: Tau, device: torch.device | str) -> float | torch.Tensor:
    """The threshold to decide with now (validated by ``check_threshold`` beforehand): a float,
    or a 0-d tensor (no sync). Call it once per step: an ``AdaptiveTau`` computes it."""
    if isinstance(tau, AdaptiveTau):
        return tau.current(device)
    if isinstance(tau, torch.Tensor):
        return tau.reshape(())
    return float(tau)


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
    return (1.0 - sim).clamp(_D_MIN, _D_MAX)


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
        d = torch.where(torch.isfinite(norms), (1.0 - sim).clamp(_D_MIN, _D_MAX), torch.nan)
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

    Raises ValueError on bad shapes, n < 2, tau outside [0, 2], an unknown merge,
    or a non-finite micro-gradient (naming its index).
    """
    if not isinstance(grads, torch.Tensor) or grads.dim() != 2:
        shape = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
        raise ValueError(f"grads must be an (n, P) tensor of flattened micro-gradients, got {shape}")
    check_n(grads.shape[0])
    check_gaf_settings(tau, merge)
    check_finite(grads)
    weights, accepted, distances = agreement_weights_unchecked(gram_matrix(grads), resolve_tau(tau, grads.device),
                                                               merge)
    if isinstance(tau, AdaptiveTau):
        tau.observe(distances)
    aggregate = weights.to(grads.dtype) @ grads
    return FilterResult(aggregate, accepted, distances, weights, bool(accepted[1:].any()))
