"""K training runs of one sweep stepped as ONE program: the fused step.

Why: a ResNet18 step on 100 CIFAR images is a few hundred small kernels, and K runs as K
processes time-slice the GPU instead of filling it. Here the K runs' weights are stacked
on a leading K axis and every kernel runs over all K at once: ``torch.func.vmap`` over the
members turns each convolution into one grouped convolution and each BatchNorm into one
over K*C channels (HFTA, Wang et al. 2021; torch.func model ensembling).

Per member k the step is ``gaf.fast.FastGAFStep``'s (n >= 2, a GAF group) or
``FastPlainStep``'s (``tau=None``, a baseline group), equal up to fp32 summation order:

- the n micro-gradients in sequence, each one ``vmap(grad)`` over the members, each
  microbatch normalised by its own BatchNorm batch statistics; the running statistics
  are per-member (K, C) buffers updated in place, n times, as n sequential passes do;
- per member the Gram matrix (one fp32 ``bmm``, (K, n, n)), the decision and weights of
  ``gaf.filter.agreement_weights_unchecked`` (vmapped: the same code, per-member tau and
  merge), the aggregate (one ``bmm``);
- a masked SGD (momentum, Nesterov) over the stacked (K, P) parameters, per-member lr and
  weight decay as (K,) device tensors: a refused step leaves that member's parameters and
  momentum bit for bit as they were (x1, +0), as ``gaf.optim.MaskedSGD`` does.

Nothing is read back to the host, so the whole step can be captured as one CUDA graph
(``compile="graph"``, the machinery of ``gaf.fast``).

Per member, may differ: initial weights, data, tau, merge, the loss, lr, weight decay.
Must match: the architecture, n, b, momentum and nesterov. ``member_state(k)`` and
``load_member(k, ...)`` speak the format of a single run's ``model.state_dict()`` and
``MaskedSGD.state_dict()``, so every member writes and resumes an ordinary checkpoint.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gaf.batchnorm import tracked_batchnorms
from gaf.fast import CudaGraphs, _ieee_matmul
from gaf.filter import agreement_weights_unchecked, check_merge, check_n
from gaf.optim import _check_number
from gaf.step import LossFn, StepStats, count_correct
from gaf.threshold import check_tau


def unstack_stats(stats: StepStats) -> list[StepStats]:
    """A fused step's ``StepStats`` (leading K axis) as K single-run ``StepStats`` (views, no sync)."""
    fields = stats.tensors()
    return [StepStats(**{name: t[k] for name, t in fields.items()}, samples=stats.samples)
            for k in range(stats.loss.shape[0])]


def _per_member(name: str, value, k: int) -> list:
    """A setting given once for all members, or once per member."""
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            raise ValueError(f"{name} must be one value or {k} (one per member), got {len(value)}")
        return list(value)
    return [value] * k


def _check_models(models: Sequence[nn.Module]) -> None:
    """Same architecture: same printed structure (layer types, widths, BatchNorm momentum),
    same parameter and buffer names, shapes, dtypes and device."""
    if not (isinstance(models, (list, tuple)) and models and all(isinstance(m, nn.Module) for m in models)):
        raise ValueError("models must be a non-empty list of nn.Module")

    def signature(m: nn.Module):
        return [(name, tuple(t.shape), t.dtype, t.device) for name, t in (*m.named_parameters(), *m.named_buffers())]

    for k, m in enumerate(models[1:], 1):
        if repr(m) != repr(models[0]) or signature(m) != signature(models[0]):
            raise ValueError(f"member {k}'s architecture differs from member 0's: a fused group needs one model "
                             "architecture (same layers, parameter and buffer shapes, device)")
    frozen = [name for name, p in models[0].named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"a fused group trains every parameter; frozen: {frozen}")
    for name, bn in tracked_batchnorms(models[0]):
        if bn.momentum is None:  # its update reads num_batches_tracked as a host number
            raise ValueError(f"a fused group needs BatchNorm momentum set; {name or 'the model'} has None")


class FusedSteps:
    """K runs stepped together: ``step(xs (K, n, b, ...), ys (K, n, b)) -> StepStats`` whose
    tensors carry a leading K axis (loss (K,), correct (K,), distances (K, n-1), accepted,
    stepped, tau (K,)); ``samples`` is per member (n*b). ``unstack_stats`` splits it.

    ``models``: K models of one architecture (their weights and buffers are copied in; the
    models themselves are not updated). ``tau``: None for a baseline group (each member a
    ``FastPlainStep``: one pass over its n*b images, always stepped; ``merge`` ignored), else
    a GAF group with a tau in [0, 2] per member (2 with ``merge="mean"`` is averaging).
    ``lr``, ``weight_decay``, ``tau``, ``merge`` and ``loss`` take one value or K.
    ``loss(logits, y)`` is one member's loss; where members' callables differ, each runs on
    every member's logits (cheap) and the member's own is selected on the device.

    Live settings: ``param_groups[k]`` is member k's optimizer ``param_groups`` (a list
    holding one dict, as a schedule writes them): lr and weight_decay are read before every
    step; ``set_tau(k, tau)``. ``compile="graph"`` captures the step as a CUDA graph after
    ``warmup`` eager calls (``graphs``: a stand-in for tests, as in ``gaf.fast``).
    """

    warmup = 3

    def __init__(self, models: Sequence[nn.Module], *, lr, weight_decay=0.0, momentum: float = 0.0,
                 nesterov: bool = False, tau=None, merge="halving", loss: LossFn | Sequence[LossFn] = F.cross_entropy,
                 compile: bool | str = False, graphs=None):
        _check_models(models)
        K = self.K = len(models)
        lrs = [_check_number("lr", v) for v in _per_member("lr", lr, K)]
        wds = [_check_number("weight_decay", v) for v in _per_member("weight_decay", weight_decay, K)]
        _check_number("momentum", momentum)
        if nesterov and momentum <= 0:
            raise ValueError(f"nesterov needs momentum > 0, got momentum={momentum}")
        self.baseline = tau is None
        taus = [] if self.baseline else [check_tau(t) for t in _per_member("tau", tau, K)]
        merges = [] if self.baseline else [check_merge(m) for m in _per_member("merge", merge, K)]
        losses = _per_member("loss", loss, K)
        if not all(callable(f) for f in losses):
            raise ValueError("loss must be a callable loss(logits, targets) or one per member")
        if compile not in (False, "graph"):
            raise ValueError(f"compile must be False or 'graph', got {compile!r}")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.device = next(models[0].parameters()).device
        if compile and graphs is None and self.device.type != "cuda":
            raise ValueError(f"compile='graph' captures a CUDA graph and needs CUDA models, got {self.device}")
        self.compile, self.graphs = compile, graphs if graphs is not None else CudaGraphs()
        self._stack(models)
        self.param_groups = [[dict(lr=lr_, momentum=self.momentum, nesterov=self.nesterov, weight_decay=wd,
                                   dampening=0.0, capturable=True)] for lr_, wd in zip(lrs, wds)]
        dtype = self.flat.dtype
        self._lr = torch.tensor(lrs, dtype=dtype, device=self.device)
        self._wd = torch.tensor(wds, dtype=dtype, device=self.device)
        self._host = {"lr": lrs, "weight_decay": wds}  # what the device tensors hold
        self.taus = taus
        self._tau = torch.tensor(taus or [float("nan")] * K, dtype=torch.float64, device=self.device)
        # the merges in use, each with the members it applies to
        self._merges = [(m, torch.tensor([x == m for x in merges], device=self.device)) for m in dict.fromkeys(merges)]
        self.merges = merges
        # the distinct losses, and each member's index among them (selected on the device)
        self._losses = list(dict.fromkeys(losses))
        self._loss_index = torch.tensor([self._losses.index(f) for f in losses], device=self.device)
        self._started = [False] * K  # whether member k's optimizer has state (MaskedSGD makes it on the first step)
        self._grads, self._n = None, None
        self._replay, self._graph_key, self._calls = None, None, 0

    # ------------------------------------------------------------------ stacked state

    def _stack(self, models: Sequence[nn.Module]) -> None:
        """Copy the K models' parameters into one (K, P) buffer (each parameter a (K, *shape)
        view of it) and their buffers into contiguous (K, *shape) tensors: BatchNorm's
        in-place update under vmap writes into a contiguous batched buffer, and would be
        lost on a copy made of a strided view (see gaf.fast._BatchedMicrograds)."""
        self.template = copy.deepcopy(models[0]).to("meta").train()  # structure only: functional_call fills it
        self.names = [name for name, _ in models[0].named_parameters()]
        shapes = [p.shape for p in models[0].parameters()]
        with torch.no_grad():
            self.flat = torch.stack([torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in models])
            self.buffers = {name: torch.stack([dict(m.named_buffers())[name].detach() for m in models]).contiguous()
                            for name, _ in models[0].named_buffers()}
        self.params = dict(zip(self.names, self._views(self.flat, shapes)))
        self._shapes = shapes
        self.agg = torch.zeros_like(self.flat)  # (K, P) each member's aggregate gradient
        self._agg_views = self._views(self.agg, shapes)
        self.momentum_flat = torch.zeros_like(self.flat) if self.momentum else None
        self.state_keys = list(self.template.state_dict().keys())
        other = [key for key in self.state_keys if key not in self.params and key not in self.buffers]
        if other:  # a tied parameter's second name, or a module's extra state
            raise ValueError(f"a fused group stacks parameters and buffers only; the model's state also holds {other}")

    @staticmethod
    def _views(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
        """(..., P) -> one (..., *shape) view per parameter, in order."""
        sizes = [s.numel() for s in shapes]
        return [chunk.view(*flat.shape[:-1], *s) for chunk, s in zip(flat.split(sizes, dim=-1), shapes)]

    def _state_tensor(self, key: str) -> torch.Tensor:
        return self.params[key] if key in self.params else self.buffers[key]

    # ------------------------------------------------------------------ the step

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        self._check(xs, ys)
        self._refresh()
        self._started = [True] * self.K
        return self._graphed(xs, ys) if self.compile else self._run(xs, ys)

    step = __call__

    def _check(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
        if not (isinstance(xs, torch.Tensor) and isinstance(ys, torch.Tensor)):
            raise ValueError("xs and ys must be tensors")
        if xs.dim() < 4 or ys.dim() != 3 or tuple(xs.shape[:3]) != tuple(ys.shape) or xs.shape[0] != self.K \
                or ys.numel() == 0:
            raise ValueError(f"xs must be (K={self.K}, n, b, ...) and ys (K, n, b), n and b >= 1, got "
                             f"{tuple(xs.shape)} and {tuple(ys.shape)}")
        if not self.baseline:
            check_n(xs.shape[1])
        if xs.device != self.device or ys.device != self.device:
            raise ValueError(f"xs and ys must be on the models' device {self.device}, got {xs.device} and {ys.device}")

    def _refresh(self) -> None:
        """Copy changed host settings (lr, weight_decay) into their device tensors: a fill
        kernel each, no sync; a captured graph keeps reading the same tensors."""
        for key, dev in (("lr", self._lr), ("weight_decay", self._wd)):
            for k, (group,) in enumerate(self.param_groups):
                value = group[key]
                if value != self._host[key][k]:
                    dev[k].fill_(_check_number(key, value))
                    self._host[key][k] = value

    def set_tau(self, k: int, tau: float) -> None:
        """Member k's threshold from the next step on (in place: no recapture)."""
        if self.baseline:
            raise ValueError("a baseline group has no tau")
        self._check_member(k)
        self.taus[k] = check_tau(tau)
        self._tau[k].fill_(self.taus[k])

    def _run(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        samples = xs.shape[1] * xs.shape[2]
        if self.baseline:  # FastPlainStep: one pass over each member's n*b images
            grads, loss, correct = self._micrograd(xs.flatten(1, 2), ys.flatten(1, 2))
            torch._foreach_copy_(self._agg_views, grads)
            self._sgd(torch.ones(self.K, dtype=torch.bool, device=self.device))
            return StepStats(loss, correct, self.flat.new_zeros(self.K, 0), torch.zeros_like(correct),
                             torch.ones(self.K, dtype=torch.bool, device=self.device),
                             torch.full((self.K,), float("nan"), device=self.device), samples)
        rows = self._rows(xs.shape[1])
        losses, correct = [], []
        for i, row in enumerate(rows):  # in sequence: BatchNorm's running statistics as n passes leave them
            grads, loss, hits = self._micrograd(xs[:, i], ys[:, i])
            torch._foreach_copy_(row, grads)
            losses.append(loss), correct.append(hits)
        with _ieee_matmul(self.device):
            gram = torch.bmm(self._grads, self._grads.transpose(1, 2))  # (K, n, n), fp32
            weights, accepted, distances = self._agreement(gram)
            stepped = accepted[:, 1:].any(1)
            torch.bmm(weights.to(self.agg.dtype)[:, None], self._grads, out=self.agg[:, None])
        self.agg.masked_fill_(~stepped[:, None], 0.0)  # a refused step must see finite (zero) grads
        self._sgd(stepped)
        return StepStats(torch.stack(losses, 1).mean(1), torch.stack(correct, 1).sum(1), distances.float(),
                         accepted[:, 1:].sum(1), stepped, self._tau.to(torch.float32, copy=True), samples)

    def _rows(self, n: int) -> list[list[torch.Tensor]]:
        """The (K, n, P) micro-gradient buffer (allocated once per n) as per-row parameter views."""
        if self._n != n:
            self._grads = self.flat.new_zeros(self.K, n, self.flat.shape[1])
            self._row_views = [self._views(self._grads[:, i], self._shapes) for i in range(n)]
            self._n = n
        return self._row_views

    def _loss(self, out: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """One member's loss (under vmap): its own of the distinct losses, chosen on the device."""
        loss = self._losses[0](out, y)
        for j, fn in enumerate(self._losses[1:], 1):
            loss = torch.where(index == j, fn(out, y), loss)
        return loss

    def _micrograd(self, x: torch.Tensor, y: torch.Tensor):
        """Every member's gradient on its (b, ...) batch x[k]: one vmap over the members.
        Returns (gradients (K, *shape) in parameter order, losses (K,), top-1 hits (K,))."""

        def loss_of(params, buffers, x, y, index):
            out = functional_call(self.template, (params, buffers), (x,))
            loss = self._loss(out, y, index)
            return loss, (loss.detach().float(), count_correct(out, y))

        with torch.enable_grad():
            grads, (loss, hits) = vmap(grad(loss_of, has_aux=True), randomness="different")(
                self.params, self.buffers, x, y, self._loss_index)
        return [grads[name] for name in self.names], loss, hits

    def _agreement(self, gram: torch.Tensor):
        """``agreement_weights_unchecked`` per member (vmapped: the same code), each member
        with its own tau and merge; a merge in use by some members only is selected."""
        result = None
        for merge, members in self._merges:
            out = vmap(functools.partial(agreement_weights_unchecked, merge=merge))(gram, self._tau)
            if result is None:
                result = out
            else:
                result = tuple(torch.where(members.view(-1, *[1] * (a.dim() - 1)), a, r) for a, r in zip(out, result))
        return result

    @torch.no_grad()
    def _sgd(self, mask: torch.Tensor) -> None:
        """MaskedSGD's update on the stacked (K, P) state, from ``self.agg``; member k moves
        iff mask[k]. A refused member multiplies by exactly 1 and adds exactly 0."""
        params, maskf = self.flat, mask.to(self.flat.dtype)[:, None]
        d = self.agg.addcmul_(params, self._wd[:, None]).mul_(maskf)  # (grad + wd * param), x1 or x0: exact
        if self.momentum:
            bufs = self.momentum_flat
            bufs.mul_(torch.where(mask, self.momentum, 1.0).to(params.dtype)[:, None]).add_(d)
            if self.nesterov:
                d.add_(bufs, alpha=self.momentum).mul_(maskf)
            else:
                d.copy_(bufs).mul_(maskf)
        params.add_(d.mul_(-self._lr[:, None]))  # the capturable MaskedSGD's rounding: (-lr * d) + param

    # ------------------------------------------------------------------ CUDA graph

    def _graphed(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        """Warm up eagerly, then capture the step once per input shape and replay it on
        static inputs. Every tensor the step reads or writes is persistent and changed in
        place (settings, ``load_member``), so only a new shape recaptures."""
        key = (tuple(xs.shape), xs.dtype, tuple(ys.shape), ys.dtype)
        if key != self._graph_key:
            self._replay, self._graph_key, self._calls = None, key, 0
        if self._replay is None and self._calls < self.warmup:
            self._calls += 1
            return self.graphs.warmup(lambda: self._run(xs, ys))
        if self._replay is None:
            self._static_x, self._static_y = xs.clone(), ys.clone()
            self._replay = self.graphs.capture(lambda: self._run(self._static_x, self._static_y))
        else:
            self._static_x.copy_(xs), self._static_y.copy_(ys)
        return self._replay().clone()  # the static outputs are overwritten next call

    # ------------------------------------------------------------------ per-member state

    def member_state(self, k: int) -> tuple[OrderedDict, dict]:
        """Member k's ``(model.state_dict(), optimizer.state_dict())`` as a single run's
        model and ``MaskedSGD`` would give them (copies, on the device; the optimizer's
        ``capturable`` is True: the lr is read from a device tensor)."""
        self._check_member(k)
        model = OrderedDict((key, self._state_tensor(key)[k].clone()) for key in self.state_keys)
        state = {}
        if self.momentum and self._started[k]:
            moms = self._views(self.momentum_flat[k], self._shapes)
            state = {i: {"momentum_buffer": m.clone()} for i, m in enumerate(moms)}
        group = {**self.param_groups[k][0], "params": list(range(len(self.names)))}
        return model, {"state": state, "param_groups": [group]}

    @torch.no_grad()
    def load_member(self, k: int, model_state: dict, optimizer_state: dict) -> None:
        """Write a single run's model and optimizer state dicts into member k, in place (a
        captured graph stays valid). Everything is checked before anything is written."""
        self._check_member(k)
        missing, unexpected = set(self.state_keys) - set(model_state), set(model_state) - set(self.state_keys)
        if missing or unexpected:
            raise ValueError(f"model state for member {k}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        for key in self.state_keys:
            if tuple(model_state[key].shape) != tuple(self._state_tensor(key).shape[1:]):
                raise ValueError(f"model state {key}: shape {tuple(model_state[key].shape)}, expected "
                                 f"{tuple(self._state_tensor(key).shape[1:])}")
        group, moms = self._check_optimizer_state(k, optimizer_state)
        for key in self.state_keys:
            self._state_tensor(key)[k].copy_(model_state[key])
        self.param_groups[k][0].update(lr=group["lr"], weight_decay=group["weight_decay"])
        if self.momentum:
            self.momentum_flat[k].zero_()
            if moms:
                torch._foreach_copy_(self._views(self.momentum_flat[k], self._shapes), moms)
        self._started[k] = bool(moms)
        self._refresh()

    def _check_member(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.K:
            raise ValueError(f"member must be an index in [0, {self.K}), got {k!r}")

    def _check_optimizer_state(self, k: int, state: dict) -> tuple[dict, list]:
        """The one param group and the momentum buffers (empty before a first step) of a
        single run's SGD state dict, checked against this group's shared settings."""
        groups = state.get("param_groups") if isinstance(state, dict) else None
        indices = list(range(len(self.names)))
        if not (isinstance(groups, list) and len(groups) == 1 and groups[0].get("params") == indices):
            raise ValueError(f"optimizer state for member {k}: expected one param group over the model's "
                             f"{len(self.names)} parameters")
        group = groups[0]
        for key, ours in (("momentum", self.momentum), ("nesterov", self.nesterov), ("dampening", 0.0)):
            if group.get(key) != ours:
                raise ValueError(f"optimizer state for member {k}: {key}={group.get(key)!r}, the group's is {ours!r}")
        _check_number("lr", group.get("lr")), _check_number("weight_decay", group.get("weight_decay"))
        per_param = state.get("state", {})
        if not per_param:
            return group, []
        try:
            moms = [per_param[i]["momentum_buffer"] for i in range(len(self.names))]
        except (KeyError, TypeError):
            raise ValueError(f"optimizer state for member {k}: a momentum_buffer for every parameter, "
                             "or none") from None
        for m, shape in zip(moms, self._shapes):
            if tuple(m.shape) != tuple(shape):
                raise ValueError(f"optimizer state for member {k}: momentum shape {tuple(m.shape)}, expected "
                                 f"{tuple(shape)}")
        return group, moms
