"""Co-teaching (Han et al., 2018): two networks that pick each other's clean samples.

Both networks see the same batch. Each ranks the batch by its own per-sample loss, and
the OTHER network updates on the fraction 1 - R(t) with the smallest loss: a network's
own memorised mistakes are not the ones its peer has learnt, so the exchange filters
noisy labels that a single network would fit. R(t) = forget_rate * min(t / T_k, 1)
ramps over the first T_k epochs (t: epochs seen so far, fractional), so that both
networks first learn the easy, mostly clean patterns from every sample.

The trainer's model is the first network (validated, probed, checkpointed as any run's);
the peer and its optimizer are this stepper's own state (``state_dict``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gaf.step import StepStats


def small_loss_indices(losses: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` smallest losses (ties broken by position: deterministic)."""
    return torch.argsort(losses.detach(), stable=True)[:keep]


def kept_count(batch: int, forget: float) -> int:
    """How many of ``batch`` samples a network updates on when it forgets ``forget`` of them."""
    return max(1, int((1.0 - forget) * batch))


class CoTeachingStep:
    """One co-teaching step on the batch ``(xs (n, b, ...), ys (n, b))``, flattened.

    ``per_sample_loss(logits, targets)`` returns one loss per sample (``reduction="none"``).
    The peer's optimizer follows the first one's learning rate (the trainer's lr schedule,
    gaf.schedule, sets the first's before each step). ``forget_rate`` is R's plateau;
    ``ramp_epochs`` T_k; ``train_size`` the training set's size, which turns images seen into
    epochs.
    """

    def __init__(self, model: nn.Module, peer: nn.Module, optimizer: torch.optim.Optimizer,
                 peer_optimizer: torch.optim.Optimizer, per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 forget_rate: float, ramp_epochs: float, train_size: int):
        if not 0 <= forget_rate < 1:
            raise ValueError(f"forget_rate must be in [0, 1), got {forget_rate}")
        if ramp_epochs < 0 or train_size < 1:
            raise ValueError(f"ramp_epochs must be >= 0 and train_size >= 1, got {ramp_epochs} and {train_size}")
        self.nets = (model, peer)
        self.optimizers = (optimizer, peer_optimizer)
        self.per_sample_loss = per_sample_loss
        self.forget_rate, self.ramp_epochs, self.train_size = forget_rate, ramp_epochs, train_size
        self.images_seen = 0

    def forget_fraction(self) -> float:
        """R(t) at the current epoch t."""
        epochs = self.images_seen / self.train_size
        ramp = 1.0 if self.ramp_epochs == 0 else min(epochs / self.ramp_epochs, 1.0)
        return self.forget_rate * ramp

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        x, y = xs.flatten(0, 1), ys.flatten()
        keep = kept_count(len(y), self.forget_fraction())
        outs, losses = [], []
        for net in self.nets:
            net.train()
            outs.append(net(x))
            losses.append(self.per_sample_loss(outs[-1], y))
        # each network learns from the samples its PEER finds easiest
        picks = (small_loss_indices(losses[1], keep), small_loss_indices(losses[0], keep))
        lr = self.optimizers[0].param_groups[0]["lr"]
        for group in self.optimizers[1].param_groups:
            group["lr"] = lr
        for optimizer, loss, pick in zip(self.optimizers, losses, picks):
            optimizer.zero_grad(set_to_none=True)
            loss[pick].mean().backward()
            optimizer.step()
        self.images_seen += len(y)
        return StepStats.unfiltered(losses[0].detach().mean(), (outs[0].detach().argmax(1) == y).sum(), len(y))

    def state_dict(self) -> dict:
        peer, peer_optimizer = self.nets[1], self.optimizers[1]
        return {"peer": peer.state_dict(), "peer_optimizer": peer_optimizer.state_dict(),
                "images_seen": self.images_seen}

    def load_state_dict(self, state: dict) -> None:
        self.nets[1].load_state_dict(state["peer"])
        self.optimizers[1].load_state_dict(state["peer_optimizer"])
        self.images_seen = state["images_seen"]
