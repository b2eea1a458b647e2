"""GAF across ranks: torch.distributed glue for ``torchrun``.

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
would hold. With momentum a, n_local = m updates on a rank starting from r0 give
``R_j = (1-a)^m r0 + D_j``; the sequential result over all ranks is
``(1-a)^(K m) r0 + sum_j (1-a)^((K-1-j) m) D_j``. Each rank all-gathers the ranks'
post-forward running mean/var (a few KB), rebuilds that sum in fp64 and writes it;
``num_batches_tracked`` advances by K * m. For ``momentum=None`` (cumulative average)
``(t0+m) R_j - t0 r0`` is rank j's sum of batch statistics and the result is
``(t0 r0 + sum_j S_j) / (t0 + K m)`` with t0 the count before the step. Both are
tested against the single-process run.

Bytes are counted in a ``CommCounter`` as a ring algorithm sends them (all-reduce
2(K-1)/K x size, all-gather (K-1) x local size, all-to-all (K-1)/K x size), which is
what NCCL's ring and gloo's pairwise exchanges send, headers aside.

Sampling (for the trainer): every rank draws the same global (n, b) index tensor from
the shared seed and takes its rows with ``local_slice``.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from gaf.filter import AdaptiveTau, Tau, agreement_weights, check_merge, gram_matrix, resolve_tau
from gaf.step import assign_flat_grad, flat_grad, trainable_parameters, unfiltered_stats

MODES = ("gram", "allgather")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


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
    tau: float | torch.Tensor,
    merge: str = "halving",
    mode: str = "gram",
    group=None,
    counter: CommCounter | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``filter_gradients`` over the stack of all ranks' micro-gradients; call on every rank.

    Returns ``(aggregate (P,), weights (n,), accepted (n,), distances (n-1,))``,
    identical on every rank. (The stepper inlines this to skip the aggregate's
    all-gather when the step is skipped.)
    """
    check_merge(merge)
    _check_mode(mode)
    if mode == "gram":
        gram, shards, _ = gram_shard_reduce(local_grads, group, counter)
        weights, accepted, distances = agreement_weights(gram, tau, merge)
        return weighted_aggregate(weights, shards, group, local_grads.shape[1], counter), weights, accepted, distances
    grads = allgather_gradients(local_grads, group, counter)
    weights, accepted, distances = agreement_weights(gram_matrix(grads), tau, merge)
    return weights.to(grads.dtype) @ grads, weights, accepted, distances


# ---------------------------------------------------------------------------------
# BatchNorm running statistics
# ---------------------------------------------------------------------------------


def _tracked_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def _running_stats(layers) -> list[torch.Tensor]:
    """Every layer's running_mean and running_var, in the order they are flattened and communicated."""
    return [buf for m in layers for buf in (m.running_mean, m.running_var)]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _snapshot_batchnorm(layers) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]


def _merge_batchnorm(layers, before, group, counter: CommCounter | None) -> None:
    """Rewrite running stats as if all ranks' microbatches ran in sequence (module docstring)."""
    k = _size(group)
    if k == 1 or not layers:
        return
    gathered = _all_gather(_flat(_running_stats(layers)), group, counter, "batchnorm").double()  # (K, total)
    ranks_first = torch.arange(k - 1, -1, -1, device=gathered.device, dtype=torch.float64)  # K-1-j
    offset = 0
    for m, (mean0, var0, count0) in zip(layers, before):
        c = m.running_mean.numel()
        steps = (m.num_batches_tracked - count0).double()  # local updates m (identical on all ranks)
        for buf, r0 in ((m.running_mean, mean0), (m.running_var, var0)):
            r_j, r0 = gathered[:, offset : offset + c], r0.reshape(-1).double()
            if m.momentum is None:  # cumulative average: t * r_t = t0 * r0 + sum of stats
                t0 = count0.double()
                sums = (t0 + steps) * r_j - t0 * r0
                merged = (t0 * r0 + sums.sum(0)) / (t0 + k * steps)
            else:
                decay = (1.0 - m.momentum) ** steps  # (1-a)^m
                contrib = r_j - decay * r0  # D_j
                merged = decay**k * r0 + ((decay ** ranks_first)[:, None] * contrib).sum(0)
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
    """One GAF step over all ranks' microbatches; the stepper contract, rank-local inputs.

    ``stepper(xs, ys)`` with this rank's ``xs`` (n_local, b, ...) and ``ys``
    (n_local, b) returns GLOBAL metrics, identical on every rank: ``loss`` (mean over
    all K * n_local * b samples), ``correct`` (count over all samples), ``distances``
    (n-1,), ``accepted`` (0-d int64), ``stepped`` (0-d bool), ``tau`` (0-d fp32).

    The step decision is read on the host once per step (a Python ``if`` on a bool
    that is identical on every rank) so that a skipped step leaves the optimizer
    untouched and skips the aggregate's all-gather. ``counter`` holds the bytes sent.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        tau: Tau,
        merge: str = "halving",
        mode: str = "gram",
        group=None,
    ):
        _require_process_group(type(self).__name__)
        check_merge(merge)
        _check_mode(mode)
        resolve_tau(tau)  # validate now, not mid-run
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.tau, self.merge, self.mode, self.group = tau, merge, mode, group
        self.params = trainable_parameters(model)
        self.size = sum(p.numel() for p in self.params)
        self.batchnorms = _tracked_batchnorms(model)
        self.world_size = _size(group)
        self.counter = CommCounter()
        self._grads: torch.Tensor | None = None
        check_replicas(model, group)  # different seeds or checkpoints fail here, not later

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_inputs(xs, ys)
        n_local, b = ys.shape
        if self.world_size * n_local < 2:
            raise ValueError(f"GAF needs n >= 2 micro-gradients, got {self.world_size} rank(s) x {n_local} local")
        device = self.params[0].device
        if self._grads is None or self._grads.shape[0] != n_local:
            self._grads = torch.empty(n_local, self.size, dtype=self.params[0].dtype, device=device)
        grads = self._grads
        model, counter = self.model, self.counter
        model.train()
        before = _snapshot_batchnorm(self.batchnorms)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        correct = torch.zeros((), dtype=torch.float32, device=device)
        for i in range(n_local):
            model.zero_grad(set_to_none=True)
            out = model(xs[i])
            loss = self.loss_fn(out, ys[i])
            loss.backward()
            flat_grad(self.params, out=grads[i])
            loss_sum += loss.detach().float() * b
            if out.dim() == 2:
                correct += (out.detach().argmax(1) == ys[i]).sum()
        _merge_batchnorm(self.batchnorms, before, self.group, counter)

        tau = resolve_tau(self.tau, device)
        if self.mode == "gram":
            gram, shards, _ = gram_shard_reduce(grads, self.group, counter)
        else:
            shards = allgather_gradients(grads, self.group, counter)  # every full micro-gradient
            gram = gram_matrix(shards)
        weights, accepted, distances = agreement_weights(gram, tau, self.merge)
        if isinstance(self.tau, AdaptiveTau):
            self.tau.observe(distances)
        stepped = accepted[1:].any()
        if bool(stepped):  # identical on every rank, so every rank takes the same branch
            if self.mode == "gram":
                agg = weighted_aggregate(weights, shards, self.group, self.size, counter)
            else:
                agg = weights.to(shards.dtype) @ shards
            assign_flat_grad(self.params, agg)
            self.optimizer.step()
        model.zero_grad(set_to_none=True)

        totals = torch.stack([loss_sum, correct])
        _all_reduce(totals, self.group, counter, "metrics")
        counter.steps += 1
        return {
            "loss": totals[0] / (self.world_size * n_local * b),
            "correct": totals[1].round().long(),
            "distances": distances.float(),
            "accepted": accepted[1:].sum(),
            "stepped": stepped,
            "tau": torch.as_tensor(tau, dtype=torch.float32, device=device).reshape(()),
        }


class DistributedMeanStep:
    """The baseline under torchrun: plain gradient averaging (one all-reduce), like DDP.

    ``stepper(xs, ys)`` with this rank's ``xs`` (n_local, b, ...): one forward/backward
    over the rank's n_local * b samples, the flat gradient all-reduced and divided by
    K, an optimizer step. Metrics are global (contract of ``DistributedGAFStep``;
    ``distances`` empty, ``tau`` NaN). Without BatchNorm this equals one process
    stepping on the whole K * n_local * b batch. BatchNorm normalises per rank (as DDP
    without SyncBatchNorm) and running statistics are averaged over ranks: the mean is
    the whole batch's, the variance the mean of per-rank variances (it omits the spread
    of the rank means), and ``num_batches_tracked`` advances by one per step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], group=None):
        _require_process_group(type(self).__name__)
        self.model, self.optimizer, self.loss_fn, self.group = model, optimizer, loss_fn, group
        self.params = trainable_parameters(model)
        self.batchnorms = _tracked_batchnorms(model)
        self.world_size = _size(group)
        self.counter = CommCounter()
        check_replicas(model, group)

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_inputs(xs, ys)
        x, y = xs.flatten(0, 1), ys.flatten()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(x)
        loss = self.loss_fn(out, y)
        loss.backward()
        grad = flat_grad(self.params)
        _all_reduce(grad, self.group, self.counter, "gradients")
        assign_flat_grad(self.params, grad / self.world_size)
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        if self.batchnorms:
            bufs = _running_stats(self.batchnorms)
            stats = _flat(bufs)
            _all_reduce(stats, self.group, self.counter, "batchnorm")
            stats /= self.world_size
            for buf, part in zip(bufs, stats.split([b.numel() for b in bufs])):
                buf.copy_(part.view_as(buf))
        correct = (out.detach().argmax(1) == y).sum().float() if out.dim() == 2 else loss.new_zeros(())
        totals = torch.stack([loss.detach().float() * y.numel(), correct.float()])
        _all_reduce(totals, self.group, self.counter, "metrics")
        self.counter.steps += 1
        return unfiltered_stats(totals[0] / (self.world_size * y.numel()), totals[1].round().long())


# ---------------------------------------------------------------------------------
# Replica check, process group, sampling
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


def _export_submitit_env() -> bool:
    """Inside a job of the submitit launcher (SLURM), let submitit set torchrun's variables."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return False
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return False
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def init_from_env(backend: str | None = None) -> tuple[int, int, int, torch.device]:
    """Join the process group that ``torchrun`` (or a submitit SLURM job) describes.

    Returns ``(rank, world_size, local_rank, device)``. ``backend`` None picks nccl when
    CUDA is available, else gloo. With nccl the device is ``cuda:LOCAL_RANK`` (or
    ``cuda:0`` where each process sees one GPU) and is made current; with gloo it is
    the CPU. Under the submitit launcher (``hydra/launcher=slurm``) the variables come
    from ``submitit.helpers.TorchDistributedEnvironment``.
    """
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing and _export_submitit_env():
        missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ValueError(
            f"distributed=true needs torchrun's environment, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set. Launch with e.g. "
            "`torchrun --nproc_per_node=2 experiments/train.py distributed=true ...` "
            "(or the submitit launcher on SLURM), or set distributed=false."
        )
    try:
        rank, world_size, local_rank = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        got = {v: os.environ[v] for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        raise ValueError(f"torchrun's RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {got}") from None
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA, which is not available; use backend 'gloo' on CPU")
        count = torch.cuda.device_count()
        if local_rank >= count and count != 1:
            raise ValueError(f"LOCAL_RANK={local_rank} but this process sees {count} GPUs: "
                             "use --nproc_per_node <= the GPU count")
        device = torch.device("cuda", local_rank if local_rank < count else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                device_id=device if backend == "nccl" else None)
    return rank, world_size, local_rank, device


def is_main() -> bool:
    """True on rank 0 (or without a process group): the rank that writes metrics and checkpoints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shutdown() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_slice(global_indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of the global (n, b) microbatch index tensor every rank drew alike.

    Rows [rank * n_local, (rank + 1) * n_local) with n_local = n / world_size, so rank
    order is microbatch order and K ranks see what one process with n microbatches sees.
    """
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    n = len(global_indices)
    if n % world_size:
        raise ValueError(f"the number of microbatches n={n} must be divisible by the world size {world_size}")
    n_local = n // world_size
    return global_indices[rank * n_local : (rank + 1) * n_local]
