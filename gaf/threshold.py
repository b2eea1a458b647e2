"""GAF's threshold tau: one interface, whatever decides its value.

A micro-gradient is accepted iff its cosine distance to the running aggregate is <= tau.
Every scheme is one ``Threshold`` subclass, and every step (``gaf.filter``, ``gaf.step``,
``gaf.fast``, ``gaf.distributed``) and the trainer use it the same way:

- ``current(device)``: the value to decide with at this step, a float or a 0-d tensor,
  computed without a host sync;
- ``observe(distances)``: after the step, what it may learn from (a fixed tau: nothing);
- ``state_dict()`` / ``load_state_dict()``: a checkpoint's entry, resumed exactly;
- ``capturable(device)`` and ``graph_key()``: what a captured CUDA graph needs (``gaf.fast``).

``as_threshold`` turns what a user passes (a number, a one-value tensor, a ``Threshold``)
into a threshold, validated once; ``THRESHOLDS`` names the schemes a run's config can ask
for (``gaf.config.threshold_of`` says which, and with which arguments).

This module imports only torch.
"""

from __future__ import annotations

import math
from typing import Union

import torch

# Cosine distance lies in [0, 2]; rounding can push it slightly outside.
D_MIN, D_MAX = 0.0, 2.0


def check_tau(tau: float) -> float:
    """Validate a numeric threshold; cosine distance lives in [0, 2]."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise ValueError(f"tau must be a number in [0, 2], a one-value tensor or a Threshold, got {tau!r}")
    if not (0.0 <= tau <= 2.0):
        raise ValueError(f"tau must lie in [0, 2] (cosine distance range), got {tau}")
    return float(tau)


class Threshold:
    """The interface of a threshold scheme; the defaults are a threshold that learns nothing."""

    def current(self, device: torch.device | str | None = None) -> float | torch.Tensor:
        """The threshold to decide with now: a float, or a 0-d tensor (no host sync). A step
        calls it once, on its gradients' device."""
        raise NotImplementedError

    def observe(self, distances: torch.Tensor) -> None:
        """After a step: its distances (n-1,), on the device."""

    def capturable(self, device: torch.device) -> bool:
        """Whether ``current(device)`` computes on ``device`` from tensors at stable addresses, so
        that a captured graph may compute it; if not, the fast step copies it in before each call."""
        return False

    def graph_key(self) -> tuple:
        """What a captured graph reads by address: a change means capture again."""
        return (type(self).__name__,)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict | None) -> None:
        """Nothing to restore (a checkpoint written before thresholds had state holds None)."""


class FixedTau(Threshold):
    """A constant tau: a number in [0, 2], or a one-value tensor (read at every step, so it
    may be changed in place)."""

    def __init__(self, tau: float | torch.Tensor):
        if isinstance(tau, torch.Tensor):
            if tau.numel() != 1:
                raise ValueError(f"tau tensor must hold one value, got shape {tuple(tau.shape)}")
            self.tau: float | torch.Tensor = tau
        else:
            self.tau = check_tau(tau)

    def current(self, device: torch.device | str | None = None) -> float | torch.Tensor:
        return self.tau.reshape(()) if isinstance(self.tau, torch.Tensor) else self.tau

    def capturable(self, device: torch.device) -> bool:
        return isinstance(self.tau, torch.Tensor) and self.tau.device == device

    def graph_key(self) -> tuple:
        return super().graph_key() + ((id(self.tau),) if isinstance(self.tau, torch.Tensor) else ())

    def __repr__(self) -> str:
        return f"FixedTau({self.tau})"


class AdaptiveTau(Threshold):
    """Adaptive threshold, the paper's future work: tau_t = min(tau_max, mean + k*std).

    The mean and (unbiased) standard deviation are over the last ``window``
    distances observed. Until two distances have been seen, tau_t = tau_max.
    The history lives in a ring buffer on the distances' device, so ``current()``
    and ``observe()`` never synchronise with the host.
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
        """A 0-d float32 tensor on ``device`` (None: where the history lives, the CPU before any)."""
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
        return tau.clamp(D_MIN, D_MAX)

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

    def capturable(self, device: torch.device) -> bool:
        return True  # the history moves to the device on the first call, then stays put

    def graph_key(self) -> tuple:
        return super().graph_key() + (id(self._buffer), id(self._count))  # a reloaded history is new tensors

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


# What a user may pass as tau.
Tau = Union[float, torch.Tensor, Threshold]


def as_threshold(tau: Tau) -> Threshold:
    """``tau`` as a ``Threshold``, validated (a number in [0, 2], a one-value tensor, or a
    ``Threshold``, validated when it was made): what a step calls once, where it is set up."""
    return tau if isinstance(tau, Threshold) else FixedTau(tau)


# The schemes a run's config can name (gaf.config.THRESHOLDS), each built from the keyword
# arguments gaf.config.threshold_of derives from the run's settings.
THRESHOLDS = {"fixed": FixedTau, "adaptive": AdaptiveTau}


def build_threshold(name: str, arguments: dict) -> Threshold:
    """The scheme ``name`` of THRESHOLDS, made from ``arguments`` (and validated by it)."""
    if name not in THRESHOLDS:
        raise ValueError(f"unknown threshold {name!r}; choose one of {tuple(THRESHOLDS)}")
    return THRESHOLDS[name](**arguments)
