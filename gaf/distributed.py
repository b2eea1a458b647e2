"""GAF across ranks under ``torch.distributed``: the reductions and the steppers.

Each rank holds n_local micro-gradients; in rank order they are the n = K * n_local
micro-gradients of one GAF step (rank 0's first), so a K-rank run takes the same
decisions and updates as one process filtering n microbatches in that order. Every
GAF decision is a function of the n x n Gram matrix (see ``gaf.filter``), so the
ranks never need each other's full gradients:

``mode="gram"`` (default): the bytes of one ring all-reduce per rank.
  1. all-to-all: rank r receives shard r (P/K elements) of every rank's
     micro-gradients -> shards (n, P/K); sends (K-1)/K * n_local * P elements;
  2. partial Gram ``shards @ shards.T`` and an all-reduce of the tiny n x n sum;
  3. ``agreement_weights`` on every rank (identical input -> identical decision);
  4. shard r of the aggregate ``weights @ shards`` and an all-gather of the shards:
     (K-1)/K * P elements, skipped when the step is skipped.
``mode="allgather"``: what the authors' multi-GPU script does: every rank receives
  every full micro-gradient ((K-1) * n_local * P elements sent per rank) and filters
  locally. Kept for comparison (``scripts/bench_dist.py``).

Every rank writes the same aggregate into ``.grad`` and steps the same optimizer, so
parameters stay identical without a broadcast; ``check_replicas`` verifies this
cheaply (the trainer calls it at every validation).

BatchNorm: per-rank batch statistics (no SyncBatchNorm), as the sequential algorithm
normalises each microbatch by its own statistics. Running statistics are made equal
on every rank and equal to what one process running the n microbatches in rank order
would hold: each rank all-gathers the ranks' post-forward running mean/var (a few KB)
and rebuilds the sequential result in fp64 (``gaf.batchnorm``, for an exponential and
a cumulative average alike); ``num_batches_tracked`` advances by K * n_local. Tested
against the single-process run.

Bytes are counted in a ``CommCounter`` as a ring algorithm sends them (all-reduce
2(K-1)/K x size, all-gather (K-1) x local size, all-to-all (K-1)/K x size), which is
what NCCL's ring and gloo's pairwise exchanges send, headers aside.

Joining the process group (``init_from_env``), ``is_main``, ``shutdown`` and each rank's
rows of a step (``local_slice``) live in ``gaf.torchrun`` and are re-exported here.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.distributed as dist
from torch import nn

from gaf.batchnorm import running_stats, sequential_average, sequential_cumulative_average, tracked_batchnorms
from gaf.filter import agreement_weights_unchecked, check_merge, check_n, gram_matrix
from gaf.step import LossFn, StepStats, count_correct, micrograds, param_views, set_grads, trainable_parameters
from gaf.threshold import Tau, as_threshold
from gaf.torchrun import TORCHRUN_VARS, init_from_env, is_main, local_slice, shutdown  # noqa: F401 (re-exported)

MODES = ("gram", "allgather")


class ReplicaDriftError(RuntimeError):
    """Ranks hold different parameters or buffers: the run can no longer be trusted."""


class CommCounter:
    """Bytes this rank sends, by purpose ("gradients", "gram", "batchnorm", "metrics")."""

    def __init__(self):
        self.bytes: Counter = Counter()
        self.steps = 0

    def add(self, what: str, nbytes: float) -> None:
        self.bytes[what] += int(round(nbytes))

    def total(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()
        self.steps = 0

    def __repr__(self) -> str:
        return f"CommCounter(steps={self.steps}, bytes={dict(self.bytes)})"


def _size(group) -> int:
    return dist.get_world_size(group)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _all_reduce(t: torch.Tensor, group, counter: CommCounter | None, what: str, op=dist.ReduceOp.SUM) -> None:
    k = _size(group)
    dist.all_reduce(t, op=op, group=group)
    if counter is not None:
        counter.add(what, 2 * (k - 1) / k * _nbytes(t))


def _all_gather(local: torch.Tensor, group, counter: CommCounter | None, what: str) -> torch.Tensor:
    """(K, *local.shape): every rank's ``local``, in rank order."""
    k = _size(group)
    flat = local.contiguous().reshape(-1)
    out = flat.new_empty(k * flat.numel())  # gathered along dim 0, then viewed per rank
    if dist.get_backend(group) == "gloo":
        # Same bytes, but gloo's pairwise all-to-all runs ~2x faster than its all-gather
        # (measured with scripts/bench_dist.py on CPU); NCCL keeps its ring all-gather.
        dist.all_to_all_single(out, flat.repeat(k), group=group)
    else:
        dist.all_gather_single(out, flat, group=group)
    if counter is not None:
        counter.add(what, (k - 1) * _nbytes(flat))
    return out.view(k, *local.shape)


# ---------------------------------------------------------------------------------
# The reductions
# ---------------------------------------------------------------------------------


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_local_grads(local_grads: torch.Tensor) -> None:
    if not isinstance(local_grads, torch.Tensor) or local_grads.dim() != 2:
        shape = tuple(local_grads.shape) if isinstance(local_grads, torch.Tensor) else type(local_grads).__name__
        raise ValueError(f"local_grads must be an (n_local, P) tensor of flat micro-gradients, got {shape}")


def gram_shard_reduce(
    local_grads: torch.Tensor, group=None, counter: CommCounter | None = None
) -> tuple[torch.Tensor, torch.Tensor, slice]:
    """The global Gram matrix from gradient shards, without moving full gradients.

    ``local_grads`` (n_local, P) are this rank's micro-gradients (same n_local and P on
    every rank). P is zero-padded to K * P_shard; rank r receives columns
    ``shard_slice = slice(r * P_shard, (r + 1) * P_shard)`` (of the padded vector) of
    every rank's micro-gradients, in rank order.

    Returns ``(gram (n, n), shards (n, P_shard), shard_slice)`` with n = K * n_local;
    ``gram`` is identical on every rank.
    """
    _check_local_grads(local_grads)
    k, r = _size(group), dist.get_rank(group)
    n_local, size = local_grads.shape
    shard = math.ceil(size / k)
    padded = local_grads if shard * k == size else nn.functional.pad(local_grads, (0, shard * k - size))
    send = padded.reshape(n_local, k, shard).transpose(0, 1).contiguous()  # (K, n_local, shard): row j -> rank j
    recv = torch.empty_like(send)  # row j: rank j's micro-gradients, columns of shard r
    dist.all_to_all_single(recv, send, group=group)
    if counter is not None:
        counter.add("gradients", (k - 1) / k * _nbytes(send))
    shards = recv.reshape(k * n_local, shard)
    gram = gram_matrix(shards)
    _all_reduce(gram, group, counter, "gram")
    return gram, shards, slice(r * shard, (r + 1) * shard)


def weighted_aggregate(
    weights: torch.Tensor,
    shards: torch.Tensor,
    group=None,
    size: int | None = None,
    counter: CommCounter | None = None,
) -> torch.Tensor:
    """``weights @ F`` for the full micro-gradient matrix F, from every rank's shards.

    Each rank forms its shard of the aggregate and all-gathers the shards. ``size``
    (the unpadded P) trims the padding; without it the result has K * P_shard entries.
    """
    if weights.dim() != 1 or weights.shape[0] != shards.shape[0]:
        raise ValueError(f"weights must be ({shards.shape[0]},) for shards {tuple(shards.shape)}, got {tuple(weights.shape)}")
    local = weights.to(shards.dtype) @ shards  # (P_shard,)
    full = _all_gather(local, group, counter, "gradients").reshape(-1)
    if size is not None:
        if not (0 < size <= full.numel()):
            raise ValueError(f"size must be in (0, {full.numel()}], got {size}")
        full = full[:size]
    return full


def allgather_gradients(local_grads: torch.Tensor, group=None, counter: CommCounter | None = None) -> torch.Tensor:
    """The plain mode: every rank's full micro-gradients, (K * n_local, P) in rank order."""
    _check_local_grads(local_grads)
    return _all_gather(local_grads, group, counter, "gradients").reshape(-1, local_grads.shape[1])


def distributed_filter(
    local_grads: torch.Tensor,
    tau: Tau,
    merge: str = "halving",
    mode: str = "gram",
    group=None,
    counter: CommCounter | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``filter_gradients`` over the stack of all ranks' micro-gradients; call on every rank.

    Returns ``(aggregate (P,), weights (n,), accepted (n,), distances (n-1,))``,
    identical on every rank. (The stepper runs its two halves, ``decide_across_ranks`` and
    ``aggregate_across_ranks``, apart: a skipped step needs no aggregate.)
    """
    _check_local_grads(local_grads)
    k, n_local = _size(group), local_grads.shape[0]
    check_n(k * n_local, f"{k} rank(s) x {n_local} local")
    threshold = as_threshold(tau)
    check_merge(merge)
    _check_mode(mode)
    tau = threshold.current(local_grads.device)
    weights, accepted, distances, shards = decide_across_ranks(local_grads, tau, merge, mode, group, counter)
    threshold.observe(distances)
    aggregate = aggregate_across_ranks(weights, shards, mode, local_grads.shape[1], group, counter)
    return aggregate, weights, accepted, distances


def decide_across_ranks(local_grads: torch.Tensor, tau: float | torch.Tensor, merge: str, mode: str, group=None,
                        counter: CommCounter | None = None):
    """The GAF decision over all ranks' micro-gradients, on validated arguments: ``(weights,
    accepted, distances, shards)``, identical on every rank; ``shards`` is what
    ``aggregate_across_ranks`` forms the aggregate from (this rank's gradient shards in gram
    mode, every full micro-gradient in allgather mode)."""
    if mode == "gram":
        gram, shards, _ = gram_shard_reduce(local_grads, group, counter)
    else:
        shards = allgather_gradients(local_grads, group, counter)
        gram = gram_matrix(shards)
    return (*agreement_weights_unchecked(gram, tau, merge), shards)


def aggregate_across_ranks(weights: torch.Tensor, shards: torch.Tensor, mode: str, size: int, group=None,
                           counter: CommCounter | None = None) -> torch.Tensor:
    """The aggregate ``weights @ F`` (P,) from ``decide_across_ranks``'s shards, on every rank."""
    if mode == "gram":
        return weighted_aggregate(weights, shards, group, size, counter)
    return weights.to(shards.dtype) @ shards


# ---------------------------------------------------------------------------------
# BatchNorm running statistics
# ---------------------------------------------------------------------------------


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _snapshot_batchnorm(layers) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]


def _merge_batchnorm(layers, before, group, counter: CommCounter | None) -> None:
    """Rewrite running stats as if all ranks' microbatches ran in sequence (module docstring)."""
    k = _size(group)
    if k == 1 or not layers:
        return
    gathered = _all_gather(_flat(running_stats(layers)), group, counter, "batchnorm").double()  # (K, total)
    offset = 0
    for m, (mean0, var0, count0) in zip(layers, before):
        c = m.running_mean.numel()
        steps = (m.num_batches_tracked - count0).double()  # local updates m (identical on all ranks)
        for buf, r0 in ((m.running_mean, mean0), (m.running_var, var0)):
            runs, r0 = gathered[:, offset : offset + c], r0.reshape(-1).double()
            if m.momentum is None:
                merged = sequential_cumulative_average(r0, runs, count0.double(), steps)
            else:
                merged = sequential_average(r0, runs, (1.0 - m.momentum) ** steps)
            buf.copy_(merged.reshape(buf.shape).to(buf.dtype))
            offset += c
        m.num_batches_tracked.copy_(count0 + k * (m.num_batches_tracked - count0))


# ---------------------------------------------------------------------------------
# The steppers
# ---------------------------------------------------------------------------------


def _require_process_group(what: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what} needs an initialised process group: call gaf.distributed.init_from_env() first")


def _check_inputs(xs: torch.Tensor, ys: torch.Tensor) -> None:
    if xs.dim() < 2 or ys.dim() != 2 or xs.shape[:2] != ys.shape:
        raise ValueError(f"xs must be (n_local, b, ...) and ys (n_local, b), got {tuple(xs.shape)} and {tuple(ys.shape)}")


class DistributedGAFStep:
    """One GAF step over all ranks' microbatches, from this rank's ``xs`` (n_local, b, ...) and
    ``ys`` (n_local, b): ``StepStats`` (gaf.step) of the whole step, identical on every rank.

    The step decision is read on the host once per step (a Python ``if`` on a bool
    that is identical on every rank) so that a skipped step leaves the optimizer
    untouched and skips the aggregate's all-gather. ``counter`` holds the bytes sent.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, tau: Tau,
                 merge: str = "halving", mode: str = "gram", group=None):
        _require_process_group(type(self).__name__)
        self.threshold, self.merge = as_threshold(tau), check_merge(merge)
        _check_mode(mode)
        self.model, self.optimizer, self.loss_fn, self.mode, self.group = model, optimizer, loss_fn, mode, group
        self.params = trainable_parameters(model)
        self.size = sum(p.numel() for p in self.params)
        self.batchnorms = [m for _, m in tracked_batchnorms(model)]
        self.world_size = _size(group)
        self.counter = CommCounter()
        self._grads: torch.Tensor | None = None  # (n_local, P) this rank's micro-gradients
        self._rows: list[list[torch.Tensor]] = []
        check_replicas(model, group)  # different seeds or checkpoints fail here, not later

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        _check_inputs(xs, ys)
        n_local, b = ys.shape
        check_n(self.world_size * n_local, f"{self.world_size} rank(s) x {n_local} local")
        if self._grads is None or self._grads.shape[0] != n_local:
            self._grads = torch.empty(n_local, self.size, dtype=self.params[0].dtype, device=self.params[0].device)
            self._rows = [param_views(row, self.params) for row in self._grads]
        self.model.train()
        before = _snapshot_batchnorm(self.batchnorms)
        micro = micrograds(self.model, self.loss_fn, self.params, self._rows, zip(xs, ys))
        _merge_batchnorm(self.batchnorms, before, self.group, self.counter)
        threshold, accepted, distances, stepped = self._filter_and_step(self._grads)
        loss_sum = torch.zeros((), dtype=torch.float32, device=micro.losses.device)
        for loss in micro.losses:  # summed in this order, then over ranks
            loss_sum += loss * b
        totals = torch.stack([loss_sum, micro.correct.sum().float()])
        _all_reduce(totals, self.group, self.counter, "metrics")
        self.counter.steps += 1
        samples = self.world_size * n_local * b
        tau = torch.as_tensor(threshold, dtype=torch.float32, device=totals.device).reshape(())
        return StepStats(totals[0] / samples, totals[1].round().long(), distances.float(), accepted[1:].sum(),
                         stepped, tau, samples)

    def _filter_and_step(self, grads: torch.Tensor):
        """Decide over all ranks and step where some later micro-gradient agreed: ``(threshold,
        accepted, distances, stepped)``."""
        threshold = self.threshold.current(grads.device)
        weights, accepted, distances, shards = decide_across_ranks(grads, threshold, self.merge, self.mode,
                                                                   self.group, self.counter)
        self.threshold.observe(distances)
        stepped = accepted[1:].any()
        if bool(stepped):  # identical on every rank, so every rank takes the same branch
            set_grads(self.params, aggregate_across_ranks(weights, shards, self.mode, self.size, self.group,
                                                          self.counter))
            self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        return threshold, accepted, distances, stepped


class DistributedMeanStep:
    """The baseline under torchrun: plain gradient averaging (one all-reduce), like DDP.

    ``stepper(xs, ys)`` with this rank's ``xs`` (n_local, b, ...): one forward/backward
    over the rank's n_local * b samples, the flat gradient all-reduced and divided by
    K, an optimizer step; ``StepStats.unfiltered`` of the whole step, on every rank.
    Without BatchNorm this equals one process stepping on the whole K * n_local * b
    batch. BatchNorm normalises per rank (as DDP without SyncBatchNorm) and running
    statistics are averaged over ranks: the mean is the whole batch's, the variance the
    mean of per-rank variances (it omits the spread of the rank means), and
    ``num_batches_tracked`` advances by one per step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, group=None):
        _require_process_group(type(self).__name__)
        self.model, self.optimizer, self.loss_fn, self.group = model, optimizer, loss_fn, group
        self.params = trainable_parameters(model)
        self.size = sum(p.numel() for p in self.params)
        self.batchnorms = [m for _, m in tracked_batchnorms(model)]
        self.world_size = _size(group)
        self.counter = CommCounter()
        check_replicas(model, group)

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        _check_inputs(xs, ys)
        x, y = xs.flatten(0, 1), ys.flatten()
        self.model.train()
        out = self.model(x)
        loss = self.loss_fn(out, y)
        grad = torch.empty(self.size, dtype=self.params[0].dtype, device=self.params[0].device)
        torch._foreach_copy_(param_views(grad, self.params),
                             list(torch.autograd.grad(loss, self.params, materialize_grads=True)))
        _all_reduce(grad, self.group, self.counter, "gradients")
        set_grads(self.params, grad / self.world_size)
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        if self.batchnorms:
            bufs = running_stats(self.batchnorms)
            stats = _flat(bufs)
            _all_reduce(stats, self.group, self.counter, "batchnorm")
            stats /= self.world_size
            for buf, part in zip(bufs, stats.split([b.numel() for b in bufs])):
                buf.copy_(part.view_as(buf))
        totals = torch.stack([loss.detach().float() * y.numel(), count_correct(out, y).float()])
        _all_reduce(totals, self.group, self.counter, "metrics")
        self.counter.steps += 1
        samples = self.world_size * y.numel()
        return StepStats.unfiltered(totals[0] / samples, totals[1].round().long(), samples)


# ---------------------------------------------------------------------------------
# Replica check
# ---------------------------------------------------------------------------------


def check_replicas(model: nn.Module, group=None, rtol: float = 1e-6) -> None:
    """Raise ``ReplicaDriftError`` if ranks hold different parameters or buffers.

    One all-gather of (sum, sum of squares) in fp64 per parameter and buffer (a few KB).
    Ranks apply identical updates, so the checksums agree to the last bit; ``rtol``
    (relative to the checksum's magnitude) only forgives rounding noise. The reference
    is the largest group of agreeing ranks (rank 0's on a tie); the error names the
    ranks outside it, the tensor and the difference. Call on every rank (a collective);
    every rank raises the same error.
    """
    named = list(model.named_parameters()) + list(model.named_buffers())
    if not named:
        return
    device = named[0][1].device
    sums = torch.stack([
        torch.stack([t.detach().double().sum(), t.detach().double().square().sum()]).to(device) for _, t in named
    ])  # (T, 2)
    gathered = _all_gather(sums, group, None, "check").cpu()  # (K, T, 2)
    k = gathered.shape[0]
    # Scales: |sum| <= sqrt(numel * sum of squares), so a sum that cancels to ~0 is
    # still compared relative to the tensor's size.
    numel = torch.tensor([float(t.numel()) for _, t in named], dtype=torch.float64)
    squares = gathered[..., 1].abs().amax(0)
    scale = torch.stack([(numel * squares).sqrt(), squares], dim=1).clamp(min=1e-30)  # (T, 2)

    def difference(i: int, j: int) -> torch.Tensor:  # (T, 2) relative difference of ranks i and j
        a, b = gathered[i], gathered[j]
        rel = (a - b).abs() / scale
        return torch.where(a.isnan() & b.isnan(), 0.0, torch.where(a.isnan() | b.isnan(), math.inf, rel))

    agree = [[float(difference(i, j).max()) <= rtol for j in range(k)] for i in range(k)]
    reference = max(range(k), key=lambda i: (sum(agree[i]), -i))
    drifted = [j for j in range(k) if not agree[reference][j]]
    if not drifted:
        return
    worst = max(drifted, key=lambda j: float(difference(reference, j).max()))
    rel = difference(reference, worst)
    t, which = divmod(int(rel.argmax()), 2)
    absolute = float((gathered[worst, t, which] - gathered[reference, t, which]).abs())
    agreeing = [j for j in range(k) if agree[reference][j]]
    raise ReplicaDriftError(
        f"replicas drifted: rank(s) {drifted} differ from rank(s) {agreeing}; largest difference "
        f"{absolute:.6g} (relative {float(rel.max()):.3g} > rtol {rtol:g}) in the "
        f"{'sum' if which == 0 else 'sum of squares'} of {named[t][0]!r} on rank {worst}. "
        "Every rank must apply the same update: check that all ranks use the same seed, "
        "model, optimizer and checkpoint, and that nothing rank-local changes parameters or buffers."
    )
