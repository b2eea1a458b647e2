"""One GAF step on a model: micro-gradients -> filter -> optimizer update.

``gaf_step`` is the readable reference, a drop-in for the authors' ``step_GAF``:
one forward/backward per microbatch (model in train mode, so BatchNorm sees each
microbatch's own statistics and updates its running statistics once per
microbatch, as in the sequential algorithm), then ``filter_gradients``, then
``optimizer.step()`` only if some later micro-gradient agreed. A skipped step
leaves parameters, optimizer state (momentum, step counts) and ``.grad`` untouched
except that ``.grad`` is cleared.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from gaf.filter import NonFiniteGradientError, Tau, check_merge, filter_gradients, resolve_tau

Microbatch = tuple[torch.Tensor, torch.Tensor]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters GAF filters over: every one that takes a gradient (BatchNorm too)."""
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(params: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate ``.grad`` of ``params`` into one vector (a missing grad counts as zero)."""
    grads = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
    return torch.cat(grads, out=out) if out is not None else torch.cat(grads)


def assign_flat_grad(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Write ``flat`` back into ``.grad`` of ``params`` (as views of a copy of ``flat``)."""
    flat = flat.detach().clone()
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    if offset != flat.numel():
        raise ValueError(f"flat gradient has {flat.numel()} elements, parameters have {offset}")


def unfiltered_stats(loss: torch.Tensor, correct: torch.Tensor) -> dict:
    """The stepper contract's dict for a step that averages without filtering (a baseline):
    no distances, nothing to accept, always stepped, no threshold."""
    dev = loss.device
    return {
        "loss": loss.detach().float(),
        "correct": correct,
        "distances": torch.zeros(0, device=dev),
        "accepted": torch.zeros((), dtype=torch.long, device=dev),
        "stepped": torch.ones((), dtype=torch.bool, device=dev),
        "tau": torch.full((), float("nan"), device=dev),
    }


def _check_microbatches(microbatches: Sequence[Microbatch]) -> None:
    if len(microbatches) < 2:
        raise ValueError(f"GAF needs n >= 2 microbatches, got n={len(microbatches)}")
    for i, mb in enumerate(microbatches):
        if not (isinstance(mb, (tuple, list)) and len(mb) == 2):
            raise ValueError(f"microbatch {i} must be an (inputs, targets) pair, got {type(mb).__name__}")
        if len(mb[0]) != len(mb[1]):
            raise ValueError(f"microbatch {i} has {len(mb[0])} inputs but {len(mb[1])} targets")


def gaf_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    microbatches: Sequence[Microbatch],
    tau: Tau,
    merge: str = "halving",
) -> dict:
    """One Gradient Agreement Filtering step over ``microbatches`` (a list of (x, y)).

    Returns a dict: ``loss`` (mean over all samples), ``accuracy`` (top-1 over all
    samples, or None when outputs are not class scores), ``distances`` (list of n-1
    floats), ``accepted`` (how many of the n-1 later micro-gradients were merged),
    ``stepped`` (whether the optimizer stepped) and ``weights`` (the aggregate's
    weights over the microbatches, a list of n floats).
    """
    check_merge(merge)
    _check_microbatches(microbatches)
    resolve_tau(tau)  # validate before spending any compute
    params = trainable_parameters(model)
    n, size = len(microbatches), sum(p.numel() for p in params)
    model.train()
    grads = torch.empty(n, size, dtype=params[0].dtype, device=params[0].device)
    loss_sum, correct, count, classify = 0.0, 0, 0, True
    for i, (x, y) in enumerate(microbatches):
        model.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        flat_grad(params, out=grads[i])
        loss_sum += float(loss.detach()) * len(y)
        count += len(y)
        if out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
            correct += int((out.detach().argmax(1) == y).sum())
        else:
            classify = False
    try:
        result = filter_gradients(grads, tau, merge)
    except NonFiniteGradientError as e:  # diverged: the caller may still record this step's loss
        model.zero_grad(set_to_none=True)
        e.loss, e.accuracy = loss_sum / count, correct / count if classify else None
        raise
    if result.step:
        assign_flat_grad(params, result.aggregate)
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return {
        "loss": loss_sum / count,
        "accuracy": correct / count if classify else None,
        "distances": result.distances.tolist(),
        "accepted": int(result.accepted[1:].sum()),
        "stepped": result.step,
        "weights": result.weights.tolist(),
    }
