"""BatchNorm running statistics when one step's microbatches run apart, then must read as in sequence.

The sequential algorithm runs the n microbatches one after another, and each BatchNorm
updates its running statistics once per microbatch. Two paths run them apart from one
start r0: the batched fast path (one ``vmap`` pass, n one-step copies) and the ranks of a
distributed step (K ranks, m local steps each). Both then rebuild the sequential result:

- exponential average (momentum a): K runs that each started at r0 and decayed it by
  ``d = (1-a)^m`` end at ``R_j = d r0 + D_j``; in sequence they give
  ``d^K r0 + sum_j d^(K-1-j) D_j`` (``sequential_average``);
- cumulative average (momentum None): t0 batches before the step, m per run:
  ``(t0 r0 + sum_j S_j) / (t0 + K m)`` with ``S_j = (t0+m) R_j - t0 r0`` run j's sum of
  batch statistics (``sequential_cumulative_average``).
"""

from __future__ import annotations

import torch
from torch import nn

BatchNorm = nn.modules.batchnorm._BatchNorm


def tracked_batchnorms(model: nn.Module) -> list[tuple[str, BatchNorm]]:
    """(name, layer) of every BatchNorm that keeps running statistics, in module order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, BatchNorm) and m.track_running_stats and m.running_mean is not None]


def running_stats(layers: list[BatchNorm]) -> list[torch.Tensor]:
    """Every layer's running_mean and running_var, in the order they are flattened and merged."""
    return [buf for m in layers for buf in (m.running_mean, m.running_var)]


def sequential_average(r0: torch.Tensor, runs: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """The exponential running statistic after K runs in sequence, from K runs apart.

    ``r0`` (C,) the statistic before the step; ``runs`` (K, C) where each run ended, having
    started at r0; ``decay`` (0-d or (C,)) how much of r0 one run keeps, ``(1-a)^m``.
    """
    k = runs.shape[0]
    powers = torch.arange(k - 1, -1, -1, device=runs.device, dtype=runs.dtype)  # K-1-j: later runs decay less
    return decay**k * r0 + ((decay ** powers[:, None]) * (runs - decay * r0)).sum(0)


def sequential_cumulative_average(r0: torch.Tensor, runs: torch.Tensor, before: torch.Tensor,
                                  steps: torch.Tensor) -> torch.Tensor:
    """The cumulative running statistic (momentum None) after K runs of ``steps`` batches each
    in sequence, ``before`` batches counted before the step (module docstring)."""
    k = runs.shape[0]
    sums = (before + steps) * runs - before * r0
    return (before * r0 + sums.sum(0)) / (before + k * steps)
