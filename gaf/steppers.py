"""A run's optimizer, lr schedule and stepper, from its config.

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

from gaf.config import OptimConfig, RunConfig, RunPlan
from gaf.coteaching import CoTeachingStep
from gaf.distributed import DistributedGAFStep, DistributedMeanStep
from gaf.fast import FastGAFStep, FastPlainStep
from gaf.losses import build_loss
from gaf.methods import METHODS
from gaf.models import build_model
from gaf.optim import build_optimizer as build_named_optimizer
from gaf.schedule import Schedule
from gaf.schedule import build_schedule as build_named_schedule
from gaf.step import LossFn, PlainStep, ReferenceGAFStep, StepStats
from gaf.threshold import Tau

Stepper = Callable[[torch.Tensor, torch.Tensor], StepStats]


def build_optimizer(cfg: OptimConfig, params, masked: bool = False) -> torch.optim.Optimizer:
    """torch.optim's SGD/Adam/AdamW, or (fast path) their masked twins that apply a skipped
    step as a mask on the device."""
    return build_named_optimizer(cfg.name, params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                 weight_decay=cfg.weight_decay, betas=cfg.betas, masked=masked)


def build_schedule(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> Schedule:
    """The lr schedule ``cfg.optim.schedule`` names (gaf.schedule), driving ``optimizer``."""
    o = cfg.optim
    return build_named_schedule(o.schedule, optimizer, lr=o.lr, iterations=cfg.train.iterations,
                                plateau_factor=o.plateau_factor, plateau_patience=o.plateau_patience)


def make_stepper(cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, tau: Tau,
                 plan: RunPlan) -> Stepper:
    """The stepper ``cfg`` asks for: distributed (``cfg.distributed``), the fast path (``plan.fast``,
    with the options ``plan`` decided) or the readable one."""
    baseline, merge = not METHODS[cfg.method.name].microbatches, cfg.method.merge
    if cfg.distributed:
        if baseline:  # every rank a slice of the batch, one all-reduce
            return DistributedMeanStep(model, optimizer, loss_fn)
        return DistributedGAFStep(model, optimizer, loss_fn, tau, merge, mode=cfg.dist_mode)
    if plan.fast:
        options = dict(amp_dtype=torch.bfloat16 if plan.amp else None, channels_last=plan.channels_last,
                       compile=plan.compile)
        if baseline:
            return FastPlainStep(model, optimizer, loss_fn, **options)
        return FastGAFStep(model, optimizer, loss_fn, tau, merge, batched=plan.batched, **options)
    if baseline:
        return PlainStep(model, optimizer, loss_fn)
    return ReferenceGAFStep(model, optimizer, loss_fn, tau, merge)


def make_loss(cfg: RunConfig, num_classes: int, reduction: str = "mean") -> LossFn:
    """The training loss ``cfg.loss`` names (gaf.losses), for data of ``num_classes`` classes."""
    c = cfg.loss
    return build_loss(c.name, num_classes, smoothing=c.smoothing, q=c.q, alpha=c.alpha, beta=c.beta,
                      reduction=reduction)


def make_coteaching(cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer, ds) -> CoTeachingStep:
    """Co-teaching's stepper: a peer of ``model``'s architecture (its own initialisation, drawn
    from the seeded generator after the first), its own optimizer, the loss per sample. The
    forget rate defaults to the fraction of flipped training labels."""
    m = cfg.method
    peer = build_model(cfg.model.name, ds.num_classes, width=cfg.model.width, blocks=cfg.model.blocks)
    peer = peer.to(next(model.parameters()).device)
    forget = m.forget_rate if m.forget_rate is not None else float(ds.flipped.float().mean())
    return CoTeachingStep(model, peer, optimizer, build_optimizer(cfg.optim, peer.parameters()),
                          make_loss(cfg, ds.num_classes, reduction="none"), forget, m.ramp_epochs, len(ds.train_y))
