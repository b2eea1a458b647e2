"""K runs of one sweep trained as one fused program, each an ordinary run.

``run_group(cfgs, run_dirs)`` gives every member what ``gaf.train.run`` gives one run: its own
data (its seed's labels, noise, microbatches and augmentation), model, optimizer, schedule,
validation with the memorisation probe, and its run directory's files (config, metrics, evals,
summary, checkpoint); a finished member is a no-op and a killed one resumes from its checkpoint.
Only the step is shared: each member's ``Trainer`` steps through a ``MemberStep`` that hands its
batch to the group, and the last member's hand-in runs one ``gaf.fused.FusedSteps`` step for all.

A group's members must share what makes their steps one program (``group_key``): data set,
model, method kind, n and microbatch (or batch) size, iterations, validation period, and where
they resume. They may differ in seed, noise, tau, merge, loss, lr, weight decay and schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path

import torch

from gaf.checkpoint import prior_run
from gaf.config import RunConfig, resolve, settings, validate
from gaf.fused import FusedSteps, unstack_stats
from gaf.rundir import RunDirLock
from gaf.step import StepStats
from gaf.train import Trainer, _progress, resolve_device

log = logging.getLogger(__name__)

# Where each member's settings must agree (a dotted RunConfig key each).
SHARED = ("data.name", "data.train_per_class", "data.test_per_class", "model.name", "model.width", "model.blocks",
          "method.name", "method.n_micro", "method.per_class", "method.batch_size", "optim.name", "optim.momentum",
          "optim.nesterov", "train.iterations", "train.val_every", "train.stop_after", "device")


def group_key(cfg: RunConfig) -> tuple:
    """What members of one group share (SHARED's values); runs whose keys differ go into separate groups."""
    values = {key: value for key, _, value in settings(cfg)}
    return tuple(values[key] for key in SHARED)


def check_group(cfgs: list[RunConfig]) -> None:
    """One line naming the first setting that keeps these runs from one group, or the reason."""
    keys = [group_key(c) for c in cfgs]
    for i, key in enumerate(SHARED):
        values = {repr(k[i]) for k in keys}
        if len(values) > 1:
            raise ValueError(f"a fused group's runs must share {key}; got {', '.join(sorted(values))}")
    cfg = cfgs[0]
    if cfg.method.name not in ("gaf", "baseline") or cfg.optim.name != "sgd" or cfg.distributed:
        raise ValueError(f"a fused group runs method=gaf or baseline with optim=sgd on one device; got "
                         f"method={cfg.method.name}, optim={cfg.optim.name}, distributed={cfg.distributed}")
    if any(c.method.adaptive_k is not None for c in cfgs):
        raise ValueError("a fused group takes a fixed tau per member: method.adaptive_k must be unset")
    t = cfg.train
    if t.fast is False or t.amp or t.channels_last or t.batched or t.compile == "full":
        raise ValueError("a fused group runs the fast path in fp32: train.fast, amp, channels_last and batched "
                         "left unset or off (train.fast=false asks for the readable path), train.compile none or graph")


class MemberStep:
    """Member k's stepper in its Trainer: hands its batch to the group and returns StepStats that
    the group step fills (device tensors, read at the Trainer's next flush)."""

    def __init__(self, group: "FusedGroup", k: int, loss_fn):
        self.group, self.k, self.loss_fn = group, k, loss_fn

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        return self.group.hand_in(self.k, xs, ys)

    def sync_back(self) -> None:
        self.group.write_back(self.k)


class FusedGroup:
    """The members' Trainers stepping in lockstep through one FusedSteps."""

    def __init__(self, trainers: list[Trainer]):
        self.trainers = trainers
        cfg = trainers[0].cfg
        gaf = cfg.method.name == "gaf"
        losses = [t.stepper.loss_fn for t in trainers]
        self.steps = FusedSteps(
            [t.model for t in trainers], lr=[t.optimizer.param_groups[0]["lr"] for t in trainers],
            weight_decay=[t.cfg.optim.weight_decay for t in trainers], momentum=cfg.optim.momentum,
            nesterov=cfg.optim.nesterov, tau=[t.cfg.method.tau for t in trainers] if gaf else None,
            merge=[t.cfg.method.merge for t in trainers] if gaf else "halving", loss=losses,
            compile="graph" if resolve(cfg, trainers[0].device.type).compile else False)
        for k, t in enumerate(trainers):
            if t.optimizer.state:  # resumed: its momentum into the stacked state
                self.steps.load_member(k, t.model.state_dict(), t.optimizer.state_dict())
            t.stepper = MemberStep(self, k, losses[k])
        self._batches: list = [None] * len(trainers)
        self._out: list[StepStats | None] = [None] * len(trainers)

    def hand_in(self, k: int, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        """Member k's batch; the last member's runs the group's step. Returns member k's
        StepStats, to be filled by that step (members before the last hold them until then)."""
        self._batches[k] = (xs, ys)
        n = xs.shape[0]
        out = self._out[k] = StepStats(torch.zeros((), device=xs.device), torch.zeros((), dtype=torch.long,
                                       device=xs.device), torch.zeros(max(n - 1, 0) if self.steps.taus else 0,
                                       device=xs.device), torch.zeros((), dtype=torch.long, device=xs.device),
                                       torch.zeros((), dtype=torch.bool, device=xs.device),
                                       torch.zeros((), device=xs.device), ys.numel())
        if k == len(self.trainers) - 1:
            self._step()
        return out

    def _step(self) -> None:
        for k, t in enumerate(self.trainers):  # each member's schedule wrote its lr into its optimizer
            self.steps.param_groups[k][0]["lr"] = t.optimizer.param_groups[0]["lr"]
        xs = torch.stack([x for x, _ in self._batches])
        ys = torch.stack([y for _, y in self._batches])
        for out, got in zip(self._out, unstack_stats(self.steps(xs, ys))):
            out.copy_(got)
        self._batches = [None] * len(self.trainers)

    def write_back(self, k: int) -> None:
        """Member k's model and optimizer as the group left them (before its validation and checkpoint)."""
        model_state, optimizer_state = self.steps.member_state(k)
        t = self.trainers[k]
        t.model.load_state_dict(model_state)
        t.optimizer.load_state_dict(optimizer_state)


def run_group(cfgs: list[RunConfig], run_dirs: list[str | os.PathLike]) -> list[dict]:
    """Train these runs as fused groups (one per resume point); returns each run's summary."""
    if len(cfgs) != len(run_dirs) or not cfgs:
        raise ValueError(f"run_group needs one run directory per config, got {len(cfgs)} and {len(run_dirs)}")
    for cfg in cfgs:
        validate(cfg)
    check_group(cfgs)
    device = resolve_device(cfgs[0].device)
    summaries: dict[int, dict] = {}
    with contextlib.ExitStack() as stack:
        trainers = {}
        for i, (cfg, d) in enumerate(zip(cfgs, map(Path, run_dirs))):
            d.mkdir(parents=True, exist_ok=True)
            stack.enter_context(RunDirLock(d))
            summary, ckpt = prior_run(d, cfg.to_dict())
            if summary is not None and summary.get("status") in ("finished", "diverged"):
                summaries[i] = summary  # a finished member is a no-op
                continue
            trainers[i] = member_trainer(cfg, d, ckpt, device)
        by_start: dict[int, list[int]] = {}
        for i, t in trainers.items():
            by_start.setdefault(t.state["iter"], []).append(i)
        for start, members in sorted(by_start.items()):
            summaries.update(zip(members, train_together([trainers[i] for i in members])))
    return [summaries[i] for i in range(len(cfgs))]


def member_trainer(cfg: RunConfig, run_dir: Path, ckpt, device: torch.device) -> Trainer:
    """A member's Trainer, as ``gaf.train.run`` makes it (with the fast path's masked optimizer,
    on any device): restored, or started clean."""
    trainer = Trainer(cfg, run_dir, 0, 1, device, dataclasses.replace(resolve(cfg, device.type), fast=True))
    if ckpt is not None:
        trainer.restore(ckpt)
    else:
        for p in (trainer.metrics.path, trainer.evals.path):
            p.unlink(missing_ok=True)
    return trainer


def train_together(trainers: list[Trainer]) -> list[dict]:
    """The members' loop in lockstep: every member steps (the last runs the fused step), then
    each flushes and validates as its own Trainer would. A member that ends (diverged, stopped)
    leaves; the others go on, still stepped by the group."""
    FusedGroup(trainers)
    for t in trainers:
        t.begin()
        t.clock.start()
        t.model.train()
    cfg, start = trainers[0].cfg, trainers[0].state["iter"]
    ended: dict[int, tuple[str, int]] = {}
    progress = _progress(cfg, start, True)
    progress.set_description(f"{cfg.experiment}: {len(trainers)} fused")
    it = start
    for it in range(start + 1, cfg.train.iterations + 1):
        progress.update(1)
        for t in trainers:  # an ended member still hands in a batch: the group's shapes stay
            t._step(it)
        for k, t in enumerate(trainers):
            if k in ended:
                t.pending.clear()
            elif status := t.after_step(it):
                ended[k] = (status, it)
        if len(ended) == len(trainers):
            break
    progress.close()
    return [t.end(*ended.get(k, ("finished", it))) for k, t in enumerate(trainers)]
