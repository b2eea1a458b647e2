"""A run's optimizer and stepper, from its config.

A stepper is called as ``stepper(xs (n, b, ...), ys (n, b))`` with one step's n
microbatches and returns ``gaf.step.StepStats``. The baseline steps plainly; GAF runs the
readable reference (``gaf.step``), the fast path (``gaf.fast``) or the ranks of a
distributed run (``gaf.distributed``). Averaging with measured distances (figures 1, 4,
5) is GAF at tau = 2 with the mean merge, which accepts everything (tested).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gaf.config import COMPILE_MODES, OptimConfig, RunConfig
from gaf.distributed import DistributedGAFStep, DistributedMeanStep
from gaf.fast import FastGAFStep, FastPlainStep
from gaf.filter import Tau
from gaf.optim import build_optimizer as build_named_optimizer
from gaf.step import LossFn, PlainStep, ReferenceGAFStep, StepStats

Stepper = Callable[[torch.Tensor, torch.Tensor], StepStats]


def build_optimizer(cfg: OptimConfig, params, masked: bool = False) -> torch.optim.Optimizer:
    """torch.optim's SGD/Adam/AdamW, or (fast path) their masked twins that apply a skipped
    step as a mask on the device."""
    return build_named_optimizer(cfg.name, params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                 weight_decay=cfg.weight_decay, betas=cfg.betas, masked=masked)


def make_stepper(cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, tau: Tau,
                 fast: bool) -> Stepper:
    """The stepper ``cfg`` asks for: distributed (``cfg.distributed``), the fast path
    (``fast``, with ``cfg.train``'s options) or the readable one."""
    baseline, merge = cfg.method.name == "baseline", cfg.method.merge
    if cfg.distributed:
        if baseline:  # every rank a slice of the batch, one all-reduce
            return DistributedMeanStep(model, optimizer, loss_fn)
        return DistributedGAFStep(model, optimizer, loss_fn, tau, merge, mode=cfg.dist_mode)
    if fast:
        t = cfg.train
        options = dict(amp_dtype=torch.bfloat16 if t.amp else None,
                       channels_last=t.amp if t.channels_last is None else t.channels_last,
                       compile=COMPILE_MODES[t.compile])
        if baseline:
            return FastPlainStep(model, optimizer, loss_fn, **options)
        return FastGAFStep(model, optimizer, loss_fn, tau, merge, batched=t.batched, **options)
    if baseline:
        return PlainStep(model, optimizer, loss_fn)
    return ReferenceGAFStep(model, optimizer, loss_fn, tau, merge)
