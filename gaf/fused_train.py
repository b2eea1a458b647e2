"""K runs of one sweep trained as one fused program, each an ordinary run.

``run_group(cfgs, run_dirs)`` gives every member what ``gaf.train.run`` gives one run: its own
data (its seed's labels, noise, microbatches and augmentation), model, optimizer, schedule,
validation with the memorisation probe, and its run directory's files (config, metrics, evals,
summary, checkpoint); a finished member is a no-op and a killed one resumes from its checkpoint.
Only the step is shared: each member's ``Trainer`` steps through a ``MemberStep`` that hands its
batch to the group, then one ``gaf.fused.FusedSteps`` step runs for all.

Members that resume from different iterations (a group killed between two members' checkpoints)
still train as one group, each at its own iteration, and a member that has ended keeps its place
with a placeholder batch: the group's K, and so each member's fp32 arithmetic, stays what an
unbroken group's was, and a relaunch writes the files the unbroken group would have. SIGTERM and
``train.stop_after`` act on a group as on one run (``gaf.train``). On CUDA the group is split
into groups that fit the device's free memory (``step_memory``).

A group's members must share what makes their steps one program (``group_key``): data set,
model, method kind, n and microbatch (or batch) size, iterations and validation period. They may
differ in seed, noise, tau, merge, loss, lr, weight decay, schedule and where they resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from gaf.checkpoint import prior_run
from gaf.config import RunConfig, resolve, settings, threshold_of, validate
from gaf.fused import FusedSteps, unstack_stats
from gaf.methods import METHODS
from gaf.process import progress_bar, resolve_device, sigterm_stops
from gaf.rundir import RunDirLock
from gaf.step import StepStats
from gaf.train import Trainer, nothing_to_do

log = logging.getLogger(__name__)

# Where each member's settings must agree (a dotted RunConfig key each).
SHARED = ("data.name", "data.train_per_class", "data.test_per_class", "model.name", "model.width", "model.blocks",
          "method.name", "method.n_micro", "method.per_class", "method.batch_size", "optim.name", "optim.momentum",
          "optim.nesterov", "train.iterations", "train.val_every", "train.stop_after", "device")


def group_key(cfg: RunConfig) -> tuple:
    """What members of one group share (SHARED's values); runs whose keys differ go into separate groups."""
    values = {key: value for key, _, value in settings(cfg)}
    return tuple(values[key] for key in SHARED)


def groups(cfgs: list[RunConfig], max_fused: int) -> list[list[int]]:
    """Indices of these runs grouped by ``group_key``, in their order (a group where its first run
    is), each group at most ``max_fused`` long."""
    if not (isinstance(max_fused, int) and max_fused >= 1):
        raise ValueError(f"hydra.launcher.max_fused must be an integer >= 1, got {max_fused!r}")
    by_key: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        by_key.setdefault(group_key(cfg), []).append(i)
    return [members[j : j + max_fused] for members in by_key.values() for j in range(0, len(members), max_fused)]


def check_group(cfgs: list[RunConfig]) -> None:
    """One line naming the first setting that keeps these runs from one group, or the reason."""
    keys = [group_key(c) for c in cfgs]
    for i, key in enumerate(SHARED):
        values = {repr(k[i]) for k in keys}
        if len(values) > 1:
            raise ValueError(f"a fused group's runs must share {key}; got {', '.join(sorted(values))}")
    cfg = cfgs[0]
    if not METHODS[cfg.method.name].fast or cfg.optim.name != "sgd" or cfg.distributed:
        fast = " or ".join(m.name for m in METHODS.values() if m.fast)
        raise ValueError(f"a fused group runs method={fast} with optim=sgd on one device; got "
                         f"method={cfg.method.name}, optim={cfg.optim.name}, distributed={cfg.distributed}")
    if any(threshold_of(c)[0] != "fixed" for c in cfgs):
        raise ValueError("a fused group takes a fixed tau per member: method.adaptive_k must be unset")
    t = cfg.train
    if t.fast is False or t.amp or t.channels_last or t.batched or t.compile == "full":
        raise ValueError("a fused group runs the fast path in fp32: train.fast, amp, channels_last and batched "
                         "left unset or off (train.fast=false asks for the readable path), train.compile none or graph")


class MemberStep:
    """Member k's stepper in its Trainer: hands its batch to the group and returns StepStats that
    the group's step fills (device tensors, read at the Trainer's next flush)."""

    def __init__(self, group: "FusedGroup", k: int, loss_fn):
        self.group, self.k, self.loss_fn = group, k, loss_fn

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        return self.group.hand_in(self.k, xs, ys)

    def sync_back(self) -> None:
        self.group.write_back(self.k)


def fused_steps(trainers: list[Trainer], compile: bool | str = False, graphs=None) -> FusedSteps:
    """One FusedSteps over these members' models, optimizers' settings, taus, merges and losses
    (``graphs``: gaf.fast's stand-in for CUDA's graph calls, in tests)."""
    cfg = trainers[0].cfg
    gaf = METHODS[cfg.method.name].microbatches
    return FusedSteps(
        [t.model for t in trainers], lr=[t.optimizer.param_groups[0]["lr"] for t in trainers],
        weight_decay=[t.cfg.optim.weight_decay for t in trainers], momentum=cfg.optim.momentum,
        nesterov=cfg.optim.nesterov, tau=[t.cfg.method.tau for t in trainers] if gaf else None,
        merge=[t.cfg.method.merge for t in trainers] if gaf else "halving",
        loss=[t.stepper.loss_fn for t in trainers], compile=compile, graphs=graphs)


class FusedGroup:
    """The members' Trainers stepping in lockstep through one FusedSteps: each member hands in its
    batch (``hand_in``), then ``step`` runs them all; a member that handed in none this step (it
    has ended) steps on a placeholder batch, so the group's K never changes."""

    def __init__(self, trainers: list[Trainer]):
        self.trainers = trainers
        graph = "graph" if trainers[0].plan.compile else False
        self.steps = fused_steps(trainers, graph)
        for k, t in enumerate(trainers):
            if t.optimizer.state:  # resumed: its momentum into the stacked state
                self.steps.load_member(k, t.model.state_dict(), t.optimizer.state_dict())
            t.stepper = MemberStep(self, k, t.stepper.loss_fn)
        self._batches: list = [None] * len(trainers)
        self._out: list[StepStats | None] = [None] * len(trainers)

    def hand_in(self, k: int, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        """Member k's batch for the next ``step``; returns member k's StepStats, which that step fills."""
        self._batches[k] = (xs, ys)
        zero = functools.partial(torch.zeros, (), device=xs.device)
        out = self._out[k] = StepStats(zero(), zero(dtype=torch.long),
                                       torch.zeros(xs.shape[0] - 1 if self.steps.taus else 0, device=xs.device),
                                       zero(dtype=torch.long), zero(dtype=torch.bool), zero(), ys.numel())
        return out

    def step(self) -> None:
        """One fused step of every member; an ended member's output goes nowhere (its values do not
        touch the others': the members share kernels, not sums)."""
        xs0, ys0 = next(b for b in self._batches if b is not None)
        batches = [b if b is not None else (torch.zeros_like(xs0), torch.zeros_like(ys0)) for b in self._batches]
        for k, t in enumerate(self.trainers):  # each member's schedule wrote its lr into its optimizer
            self.steps.param_groups[k][0]["lr"] = t.optimizer.param_groups[0]["lr"]
        got = unstack_stats(self.steps(torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches])))
        for k, stats in enumerate(got):
            if self._batches[k] is not None:
                self._out[k].copy_(stats)
        self._batches = [None] * len(self.trainers)

    def write_back(self, k: int) -> None:
        """Member k's model and optimizer as the group left them (before its validation and checkpoint)."""
        model_state, optimizer_state = self.steps.member_state(k)
        t = self.trainers[k]
        t.model.load_state_dict(model_state)
        t.optimizer.load_state_dict(optimizer_state)


# Of the device memory free when a group is planned, the share its steps may take: one eager
# step's peak leaves out the CUDA graph's pool, cuDNN's workspaces and the allocator's fragments.
HEADROOM = 0.8

Memory = Callable[[Trainer], "tuple[int, int] | None"]


def step_memory(trainer: Trainer) -> tuple[int, int] | None:
    """(bytes one member of a fused group takes, bytes the group may take), or None where nothing is
    measured. Only on CUDA is this a measurement: one eager fused step of this member alone (its
    stacked weights, momentum, micro-gradients and activations: all that grows with K), from
    ``torch.cuda.max_memory_allocated``, against ``HEADROOM`` of ``torch.cuda.mem_get_info``'s free
    bytes (the members' data sets are already on the device). Off CUDA (the CPU's memory is the
    machine's) it returns None and groups are as long as ``hydra.launcher.max_fused`` makes them."""
    device = trainer.device
    if device.type != "cuda":
        return None
    xs = torch.zeros(1, *batch_shape(trainer), device=device)
    ys = torch.zeros(xs.shape[:3], dtype=torch.long, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        fused_steps([trainer])(xs, ys)  # copies the member's state in: the member itself is untouched
        torch.cuda.synchronize(device)
        need = torch.cuda.max_memory_allocated(device) - before
    except torch.cuda.OutOfMemoryError:
        need = torch.cuda.get_device_properties(device).total_memory  # not even one member fits
    torch.cuda.empty_cache()
    return need, int(torch.cuda.mem_get_info(device)[0] * HEADROOM)


def step_shape(cfg: RunConfig, classes: int) -> tuple[int, int]:
    """(n, b) of a run's step: GAF's n microbatches of per_class images of each of ``classes``, or
    the baseline's one batch."""
    m = cfg.method
    return (m.n_micro, m.per_class * classes) if METHODS[m.name].microbatches else (1, m.batch_size)


def batch_shape(trainer: Trainer) -> tuple[int, ...]:
    """(n, b, C, H, W) of a member's step."""
    return (*step_shape(trainer.cfg, trainer.ds.num_classes), *trainer.ds.train_x.shape[1:])


def group_size(members: int, measured: tuple[int, int] | None) -> int:
    """How many members one group may hold: all, or as many as ``measured`` (one member's bytes,
    the bytes free to the group) says fit; a member that fits no group is one line."""
    if measured is None:
        return members
    need, free = measured
    if need > free:
        raise ValueError(f"a fused group's member needs {need / 2**30:.2f} GiB for its step, but only "
                         f"{free / 2**30:.2f} GiB of the device is free to it: it fits no group; use a smaller "
                         "method.per_class (method.batch_size for the baseline) or model.name")
    return min(members, free // max(need, 1))


def run_group(cfgs: list[RunConfig], run_dirs: list[str | os.PathLike], memory: Memory = step_memory) -> list[dict]:
    """Train these runs as one fused group (several, where ``memory`` says one does not fit); returns
    each run's summary. ``memory(trainer)``: one member's bytes and the bytes free (``step_memory``)."""
    if len(cfgs) != len(run_dirs) or not cfgs:
        raise ValueError(f"run_group needs one run directory per config, got {len(cfgs)} and {len(run_dirs)}")
    for cfg in cfgs:
        validate(cfg)
    check_group(cfgs)
    device = resolve_device(cfgs[0].device)
    summaries: dict[int, dict] = {}
    with contextlib.ExitStack() as stack:
        trainers: dict[int, Trainer] = {}
        for i, (cfg, d) in enumerate(zip(cfgs, map(Path, run_dirs))):
            d.mkdir(parents=True, exist_ok=True)
            stack.enter_context(RunDirLock(d))
            summary, ckpt = prior_run(d, cfg.to_dict())
            if (done := nothing_to_do(cfg, d, summary, ckpt)) is not None:
                summaries[i] = done
            else:
                trainers[i] = member_trainer(cfg, d, ckpt, device)
        summaries.update(train_in_groups(trainers, memory))
    return [summaries[i] for i in range(len(cfgs))]


def train_in_groups(trainers: dict[int, Trainer], memory: Memory) -> dict[int, dict]:
    """Each member's summary, trained in groups as long as the memory allows, in order. SIGTERM stops
    the group under way (``gaf.train``) and starts no other: their members say "not started"."""
    if not trainers:
        return {}
    order = list(trainers)
    size = group_size(len(order), memory(trainers[order[0]]))
    if size < len(order):
        log.info("fused: %d runs in groups of at most %d (the device's free memory)", len(order), size)
    summaries = {}
    with sigterm_stops(*trainers.values()):
        for j in range(0, len(order), size):
            members = order[j : j + size]
            if trainers[members[0]].terminated:
                summaries.update({i: {"status": "not started", "stopped_by": "SIGTERM"} for i in members})
                continue
            summaries.update(zip(members, train_together([trainers[i] for i in members])))
    return summaries


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
    """The members' loops in lockstep, each from its own iteration: every live member steps, the
    group runs the fused step, then each flushes and validates as its own Trainer would. A member
    that ends (finished, diverged, stopped) leaves the loop but keeps its place in the group."""
    group = FusedGroup(trainers)
    for t in trainers:
        t.begin()
        t.clock.start()
        t.model.train()
    starts = [t.state["iter"] for t in trainers]
    ended = {k: ("finished", s) for k, (t, s) in enumerate(zip(trainers, starts)) if s >= t.cfg.train.iterations}
    cfg = trainers[0].cfg
    progress = progress_bar(cfg, min(starts), True)
    progress.set_description(f"{cfg.experiment}: {len(trainers)} fused")
    step = 0
    while len(ended) < len(trainers):
        step += 1
        live = [k for k in range(len(trainers)) if k not in ended]
        for k in live:
            trainers[k]._step(starts[k] + step)
        group.step()
        for k in live:
            it = starts[k] + step
            if (status := trainers[k].after_step(it)) or it == cfg.train.iterations:
                ended[k] = (status or "finished", it)
        progress.update(1)
        if any(trainers[k].state["iter"] == starts[k] + step for k in live):  # some member validated
            report(progress, trainers, min(starts) + step)
    progress.close()
    return [t.end(*ended[k]) for k, t in enumerate(trainers)]


def report(progress, trainers: list[Trainer], it: int) -> None:
    """Every member's latest validation accuracy, on the group's bar and in the log."""
    accs = " ".join(f"{t.state['final_val_acc']:.3f}" for t in trainers)
    progress.set_postfix_str(f"val acc {accs}")
    log.info("fused group of %d, iteration %d/%d: val acc %s", len(trainers), it, trainers[0].cfg.train.iterations,
             accs)
