"""One GAF step on a model: the stepper contract, the micro-gradient loop, the readable reference.

``StepStats`` is what every stepper returns (this module's ``ReferenceGAFStep`` and
``PlainStep``, ``gaf.fast``'s and ``gaf.distributed``'s steppers). ``micrograds`` is the
one loop that turns n microbatches into the rows of an (n, P) micro-gradient matrix; the
reference, the fast and the distributed GAF paths all run it.

``gaf_step`` is the readable reference, a drop-in for the authors' ``step_GAF``:
one forward/backward per microbatch (model in train mode, so BatchNorm sees each
microbatch's own statistics and updates its running statistics once per
microbatch, as in the sequential algorithm), then the filter, then
``optimizer.step()`` only if some later micro-gradient agreed. A skipped step
leaves parameters, optimizer state (momentum, step counts) and ``.grad`` untouched
except that ``.grad`` is cleared.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, NamedTuple, Sequence

import torch
from torch import nn

from gaf.filter import (NonFiniteGradientError, agreement_weights_unchecked, check_finite, check_merge, check_n,
                        gram_matrix)
from gaf.threshold import Tau, Threshold, as_threshold

Microbatch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepStats:
    """What one step of any stepper reports: device tensors, read without a host sync.

    - ``loss``: 0-d float32, the mean loss over the step's samples;
    - ``correct``: 0-d long, top-1 hits over them (0 where outputs are not class scores);
    - ``distances``: (n-1,) float32, each later micro-gradient's cosine distance to the
      aggregate at its turn; empty for an unfiltered step; NaN where a micro-gradient was
      non-finite (such a step is skipped);
    - ``accepted``: 0-d long, how many of the n-1 later micro-gradients were merged;
    - ``stepped``: 0-d bool, whether the optimizer stepped;
    - ``tau``: 0-d float32, the threshold decided with; NaN for an unfiltered step;
    - ``samples``: how many samples ``loss`` and ``correct`` are over (a host int, from shapes).

    A distributed stepper reports the whole step, over all ranks, identically on each.
    """

    loss: torch.Tensor
    correct: torch.Tensor
    distances: torch.Tensor
    accepted: torch.Tensor
    stepped: torch.Tensor
    tau: torch.Tensor
    samples: int

    @classmethod
    def unfiltered(cls, loss: torch.Tensor, correct: torch.Tensor, samples: int) -> "StepStats":
        """A step that averages without filtering (a baseline): no distances, nothing to
        accept, always stepped, no threshold."""
        dev = loss.device
        return cls(loss.detach().float(), correct, torch.zeros(0, device=dev),
                   torch.zeros((), dtype=torch.long, device=dev), torch.ones((), dtype=torch.bool, device=dev),
                   torch.full((), float("nan"), device=dev), samples)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "samples"}

    def clone(self) -> "StepStats":
        return dataclasses.replace(self, **{k: v.clone() for k, v in self.tensors().items()})

    def copy_(self, other: "StepStats") -> None:
        """Overwrite these tensors in place (a captured graph's static outputs)."""
        for k, v in self.tensors().items():
            v.copy_(getattr(other, k))
        self.samples = other.samples


# ----------------------------------------------------------------------------- parameters and gradients


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters GAF filters over: every one that takes a gradient (BatchNorm too)."""
    return [p for p in model.parameters() if p.requires_grad]


def param_views(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One view per parameter of a flat buffer, (P,) or (n, P): consecutive columns viewed
    as (*leading, *p.shape) in p's memory layout (channels_last weights included), so that
    copying a gradient in or out is a plain copy."""
    leading, views, offset = flat.shape[:-1], [], 0
    for p in params:
        chunk = flat[..., offset : offset + p.numel()]
        if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
            o, i, h, w = p.shape
            views.append(chunk.view(*leading, o, h, w, i).movedim(-1, -3))
        else:
            views.append(chunk.view(*leading, *p.shape))
        offset += p.numel()
    return views


def set_grads(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Make every ``p.grad`` its view (``param_views``) of the flat gradient ``flat`` (P,)."""
    for p, g in zip(params, param_views(flat, params)):
        p.grad = g


# ----------------------------------------------------------------------------- the micro-gradient loop


def is_class_scores(out: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether ``out`` (..., C) scores classes for integer labels ``y`` (...)."""
    return out.dim() == y.dim() + 1 and not y.is_floating_point()


def count_correct(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 hits of ``out`` against ``y``, a 0-d long tensor; 0 where ``out`` is not class scores."""
    if is_class_scores(out, y):
        return (out.detach().argmax(-1) == y).sum()
    return torch.zeros((), dtype=torch.long, device=y.device)


class Micrograds(NamedTuple):
    losses: torch.Tensor  # (n,) float32: each microbatch's loss
    correct: torch.Tensor  # (n,) long: each microbatch's top-1 hits (0 where not class scores)
    classified: bool  # every microbatch's outputs were class scores


def micrograds(forward: Callable[[torch.Tensor], torch.Tensor], loss_fn: LossFn, params: Sequence[torch.Tensor],
               rows: Sequence[Sequence[torch.Tensor]], microbatches: Iterable[Microbatch],
               autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> Micrograds:
    """For each microbatch i: forward, loss, and the gradient of ``params`` written into
    ``rows[i]`` (``param_views`` of row i of the (n, P) micro-gradient matrix).

    Nothing waits for the device, so a CUDA graph can capture it. The model's mode is the
    caller's: in train mode each forward updates BatchNorm's running statistics once, as
    the sequential algorithm does. ``.grad`` is left as it was.
    """
    losses, correct, classified = [], [], True
    for row, (x, y) in zip(rows, microbatches, strict=True):
        with torch.enable_grad(), autocast():
            out = forward(x)
            loss = loss_fn(out, y)
        torch._foreach_copy_(list(row), list(torch.autograd.grad(loss, params, materialize_grads=True)))
        losses.append(loss.detach().float())
        correct.append(count_correct(out, y))
        classified &= is_class_scores(out, y)
    return Micrograds(torch.stack(losses), torch.stack(correct), classified)


# ----------------------------------------------------------------------------- the readable reference


def _check_microbatches(microbatches: Sequence[Microbatch]) -> None:
    check_n(len(microbatches))
    for i, mb in enumerate(microbatches):
        if not (isinstance(mb, (tuple, list)) and len(mb) == 2):
            raise ValueError(f"microbatch {i} must be an (inputs, targets) pair, got {type(mb).__name__}")
        if len(mb[0]) != len(mb[1]):
            raise ValueError(f"microbatch {i} has {len(mb[0])} inputs but {len(mb[1])} targets")


class _Reference(NamedTuple):
    stats: StepStats
    mean_loss: float  # the loss summed on the host in float64, as gaf_step reports it
    weights: torch.Tensor  # (n,) the aggregate's weights over the microbatches
    classified: bool


def _reference_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                    microbatches: Sequence[Microbatch], threshold: Threshold, merge: str,
                    raise_non_finite: bool) -> _Reference:
    """One readable GAF step on validated arguments. A non-finite micro-gradient raises
    ``NonFiniteGradientError`` (``raise_non_finite``) or, as on the fast path, skips the step."""
    params = trainable_parameters(model)
    size = sum(p.numel() for p in params)
    grads = torch.empty(len(microbatches), size, dtype=params[0].dtype, device=params[0].device)
    model.train()
    micro = micrograds(model, loss_fn, params, [param_views(row, params) for row in grads], microbatches)
    if raise_non_finite:
        try:
            check_finite(grads)
        except NonFiniteGradientError:
            model.zero_grad(set_to_none=True)
            raise
    tau = threshold.current(grads.device)
    weights, accepted, distances = agreement_weights_unchecked(gram_matrix(grads), tau, merge)
    threshold.observe(distances)
    stepped = accepted[1:].any()
    if bool(stepped):
        set_grads(params, weights.to(grads.dtype) @ grads)
        optimizer.step()
    model.zero_grad(set_to_none=True)
    sizes = [len(y) for _, y in microbatches]
    mean_loss = sum(loss * s for loss, s in zip(micro.losses.tolist(), sizes)) / sum(sizes)
    dev = grads.device
    tau = torch.as_tensor(tau, dtype=torch.float32, device=dev).reshape(())
    stats = StepStats(torch.tensor(mean_loss, device=dev), micro.correct.sum(), distances.float(), accepted[1:].sum(),
                      stepped, tau, sum(sizes))
    return _Reference(stats, mean_loss, weights, micro.classified)


def gaf_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    microbatches: Sequence[Microbatch],
    tau: Tau,
    merge: str = "halving",
) -> dict:
    """One Gradient Agreement Filtering step over ``microbatches`` (a list of (x, y)).

    Returns a dict of host values: ``loss`` (mean over all samples), ``accuracy`` (top-1
    over all samples, or None when outputs are not class scores), ``distances`` (list of
    n-1 floats), ``accepted`` (how many of the n-1 later micro-gradients were merged),
    ``stepped`` (whether the optimizer stepped) and ``weights`` (the aggregate's weights
    over the microbatches, a list of n floats). A non-finite micro-gradient raises
    ``NonFiniteGradientError`` naming it (``.grad`` cleared, nothing stepped).
    """
    threshold = as_threshold(tau)
    check_merge(merge)
    _check_microbatches(microbatches)  # all before spending any compute
    ref = _reference_step(model, optimizer, loss_fn, microbatches, threshold, merge, raise_non_finite=True)
    s = ref.stats
    return {
        "loss": ref.mean_loss,
        "accuracy": int(s.correct) / s.samples if ref.classified else None,
        "distances": s.distances.tolist(),
        "accepted": int(s.accepted),
        "stepped": bool(s.stepped),
        "weights": ref.weights.tolist(),
    }


class ReferenceGAFStep:
    """The trainer's readable GAF stepper: ``gaf_step``'s step on (n, b, ...) inputs, returning
    ``StepStats``; a non-finite micro-gradient skips the step and reads as NaN distances."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, tau: Tau,
                 merge: str = "halving"):
        self.threshold, self.merge = as_threshold(tau), check_merge(merge)
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        check_n(len(xs))
        return _reference_step(self.model, self.optimizer, self.loss_fn, list(zip(xs, ys)), self.threshold,
                               self.merge, raise_non_finite=False).stats


class PlainStep:
    """The readable baseline: one forward/backward over the whole (n * b) batch and an
    optimizer step; ``StepStats.unfiltered``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        x, y = xs.flatten(0, 1), ys.flatten()
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(x)
        loss = self.loss_fn(out, y)
        loss.backward()
        self.optimizer.step()
        return StepStats.unfiltered(loss, count_correct(out, y), y.numel())
