"""The learning-rate schedule of a run (``optim.schedule``): one object, two hooks.

The trainer calls ``before_step(it)`` before iteration ``it``'s step (iterations count from
1) and ``after_validation(val_loss)`` after each validation; whatever the schedule decides
it writes into the optimizer's ``param_groups``, where every path reads it: torch.optim's
step, the masked optimizers of the fast path (``MaskedOptimizer.refresh_lr`` copies it into
the device tensor a captured graph reads), co-teaching's peer (which copies the first
optimizer's lr) and the ranks of a distributed run (each steps the same optimizer).

- ``plateau`` (the paper's, the default): ReduceLROnPlateau on validation loss.
- ``cosine`` (the usual CIFAR recipe): lr(t) = lr * 0.5 * (1 + cos(pi (t - 1) / T)) for
  t = 1..T, the first step at the full lr. A pure function of the iteration: a resumed run
  continues exactly, and it has no state to checkpoint.

``state_dict``/``load_state_dict`` are what a checkpoint's ``scheduler`` entry holds: the
plateau scheduler's own state dict (as checkpoints always held it); the cosine's is empty.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("plateau", "cosine")


class PlateauSchedule:
    """ReduceLROnPlateau (mode min) on the validation loss, stepped once per validation."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: float, patience: int):
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=factor,
                                                                    patience=patience)

    def before_step(self, it: int) -> None:
        """The lr changes at validations only."""

    def after_validation(self, val_loss: float) -> None:
        self.scheduler.step(val_loss)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def cosine_lr(lr: float, it: int, iterations: int) -> float:
    """The cosine schedule's lr at iteration ``it`` in 1..``iterations``: ``lr`` at the first."""
    return lr * 0.5 * (1 + math.cos(math.pi * (it - 1) / iterations))


class CosineSchedule:
    """lr(t) = lr * 0.5 * (1 + cos(pi (t - 1) / T)), set on every param group before step t."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, iterations: int):
        if not (isinstance(iterations, int) and iterations >= 1):
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        self.optimizer, self.lr, self.iterations = optimizer, float(lr), iterations

    def before_step(self, it: int) -> None:
        if not 1 <= it <= self.iterations:
            raise ValueError(f"iteration {it} is outside the schedule's 1..{self.iterations}")
        lr = cosine_lr(self.lr, it, self.iterations)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def after_validation(self, val_loss: float) -> None:
        """The lr depends on the iteration only."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: ``before_step`` sets the lr from the iteration."""


Schedule = PlateauSchedule | CosineSchedule


def build_schedule(name: str, optimizer: torch.optim.Optimizer, *, lr: float, iterations: int,
                   plateau_factor: float = 0.1, plateau_patience: int = 100) -> Schedule:
    """``name`` in SCHEDULES: the schedule that drives ``optimizer``'s lr (``lr``: the base lr)."""
    if name == "plateau":
        return PlateauSchedule(optimizer, plateau_factor, plateau_patience)
    if name == "cosine":
        return CosineSchedule(optimizer, lr, iterations)
    raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
