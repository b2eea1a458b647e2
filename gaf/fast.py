"""The fast path on one device: a whole GAF step with no host synchronisation.

``gaf_step`` (gaf/step.py) is the readable reference. ``FastGAFStep`` computes the same
thing (tested to equality on CPU in fp32) the way a GPU likes it:

- every micro-gradient is copied (one ``_foreach_copy_``) into a row of ONE preallocated
  (n, P) fp32 buffer;
- the Gram matrix G = F F^T is one fp32 matmul (TF32 off), ``agreement_weights`` decides
  on the device, the aggregate ``weights @ F`` is one matmul written straight into the
  flat buffer that every ``param.grad`` is a view of;
- the optimizer applies the skip as a mask (``MaskedSGD``/``MaskedAdam``/``MaskedAdamW``):
  no Python ``if`` on a device value, so nothing waits for the GPU and the whole step can
  be captured as one CUDA graph (``compile='graph'``, or ``compile=True`` to also
  ``torch.compile`` the model).

Why n sequential forward/backward passes rather than one ``torch.func.vmap(grad)`` pass:
they are correct by construction. Each microbatch sees its own BatchNorm statistics and
the running statistics are updated exactly as in the sequential algorithm, with no
re-derivation; any model works (no functional rewrite, no in-place-under-vmap limits).
Launch overhead, the reason small sequential passes are slow, is what the CUDA graph
removes. A batched pass remains an option if a profile shows the GPU underfilled.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from gaf.batchnorm import running_stats, sequential_average, tracked_batchnorms
from gaf.filter import agreement_weights_unchecked, check_merge, check_n, gram_matrix
from gaf.optim import MaskedOptimizer
from gaf.step import LossFn, StepStats, count_correct, micrograds, param_views, trainable_parameters
from gaf.threshold import Tau, Threshold, as_threshold

# ----------------------------------------------------------------------------- the step


@contextlib.contextmanager
def _ieee_matmul(device: torch.device):
    """fp32 matmuls without TF32 (a 10-bit mantissa would blur distances near tau)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _channels_last(xs: torch.Tensor) -> torch.Tensor:
    """(n, b, C, H, W) so that every xs[i] is channels_last."""
    return xs.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


class CudaGraphs:
    """The CUDA calls of a graphed step, behind two methods so that tests can put a
    stand-in in their place and check the bookkeeping around them on a CPU."""

    @staticmethod
    def warmup(fn: Callable[[], StepStats]) -> StepStats:
        """Run ``fn`` eagerly on a side stream, as torch asks before a capture."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
        return out

    @staticmethod
    def capture(fn: Callable[[], StepStats]) -> Callable[[], StepStats]:
        """Record ``fn`` (nothing runs yet); return the replay, which returns the static
        outputs it overwrites at every replay."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()

        def replay() -> StepStats:
            graph.replay()
            return out

        return replay


class StandInGraphs:
    """``CudaGraphs``'s contract on any device, for tests and dry runs: a capture records the
    step (nothing runs), a replay runs it in Python on the static inputs and writes into the
    static outputs, as a CUDA graph would. Counts its calls."""

    def __init__(self):
        self.warmups = self.captures = self.replays = 0

    def warmup(self, fn: Callable[[], StepStats]) -> StepStats:
        self.warmups += 1
        return fn()

    def capture(self, fn: Callable[[], StepStats]) -> Callable[[], StepStats]:
        self.captures += 1
        static: list[StepStats] = []  # made by the first replay, overwritten by the next

        def replay() -> StepStats:
            self.replays += 1
            out = fn()
            if static:
                static[0].copy_(out)
            else:
                static.append(out.clone())
            return static[0]

        return replay


class _FastStep:
    """Shared machinery: autocast, channels_last, and whole-step CUDA-graph capture.

    ``compile``: False (eager), "graph" (capture the eager step in a CUDA graph), or True
    (also ``torch.compile`` the model, then capture the step; inductor fuses BatchNorm
    and activations, the graph removes launch overhead: the effect of
    ``mode="reduce-overhead"`` on a step whose backward a plain ``torch.compile`` would
    split). The first ``warmup`` calls for an input shape run eagerly (real steps, they
    also compile and autotune); the next one captures and replays. Only CUDA captures;
    ``graphs`` replaces the CUDA calls (tests pass a stand-in, which any device accepts).
    """

    warmup = 3

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, *,
                 amp_dtype: torch.dtype | None = None, channels_last: bool = False, compile: bool | str = False,
                 graphs=None):
        if amp_dtype not in (None, torch.bfloat16):
            raise ValueError(f"amp_dtype must be None or torch.bfloat16 (fp16 would need loss scaling), got {amp_dtype!r}")
        if compile not in (False, True, "graph"):
            raise ValueError(f"compile must be False, True or 'graph', got {compile!r}")
        if not isinstance(optimizer, MaskedOptimizer):
            raise ValueError(f"the fast path needs a masked optimizer (build_optimizer(..., masked=True)), "
                             f"got {type(optimizer).__name__}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.device = self.params[0].device
        if compile and graphs is None and self.device.type != "cuda":
            raise ValueError(f"compile={compile!r} captures a CUDA graph and needs a CUDA model, got {self.device}")
        self.graphs = graphs if graphs is not None else CudaGraphs()
        self.amp_dtype, self.channels_last, self.compile = amp_dtype, bool(channels_last), compile
        if self.channels_last:
            model.to(memory_format=torch.channels_last)  # same Parameter objects: the optimizer still holds them
        self.forward = torch.compile(model, dynamic=False) if compile is True else model
        self.size = sum(p.numel() for p in self.params)
        self._agg = torch.zeros(self.size, dtype=self.params[0].dtype, device=self.device)
        self._grad_views = param_views(self._agg, self.params)
        self._replay = None  # the captured step, once there is one
        self._graph_key = None
        self._graph_deps = None
        self._calls = 0

    def _autocast(self):
        """bf16 autocast when asked for; no cast cache, which a captured graph would bake in."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=False)

    def _set_grads(self) -> None:
        for p, g in zip(self.params, self._grad_views):
            p.grad = g

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _check(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
        if not (isinstance(xs, torch.Tensor) and isinstance(ys, torch.Tensor)):
            raise ValueError("xs and ys must be tensors")
        if xs.dim() < 3 or ys.dim() != 2 or tuple(xs.shape[:2]) != tuple(ys.shape) or ys.numel() == 0:
            raise ValueError(f"xs must be (n, b, ...) and ys (n, b), n and b >= 1, got {tuple(xs.shape)} and "
                             f"{tuple(ys.shape)}")
        if xs.device != self.device or ys.device != self.device:
            raise ValueError(f"xs and ys must be on the model's device {self.device}, got {xs.device} and {ys.device}")

    def _run(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:  # the step; subclasses
        raise NotImplementedError

    def _refresh(self) -> None:
        """Copy host-side settings into the device tensors the step reads (outside any graph)."""
        self.optimizer.refresh_lr()

    def _call(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        self._refresh()
        if not self.compile:
            return self._run(_channels_last(xs) if self.channels_last else xs, ys)
        return self._graphed(xs, ys)

    def _graphed(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        key = (tuple(xs.shape), xs.dtype, tuple(ys.shape), ys.dtype)
        if key != self._graph_key or self._graph_deps != self._deps():
            self._replay, self._graph_key, self._calls = None, key, 0
        for group in self.optimizer.param_groups:
            group["capturable"] = True  # SGD: read lr from the device tensor, not a baked-in float
        if self._replay is None and self._calls < self.warmup:
            self._calls += 1
            out = self.graphs.warmup(lambda: self._run(_channels_last(xs) if self.channels_last else xs, ys))
            self._graph_deps = self._deps()
            return out
        if self._replay is None:
            self._static_x = torch.empty_like(xs, memory_format=torch.contiguous_format)
            if self.channels_last:
                self._static_x = _channels_last(self._static_x)
            self._static_y = torch.empty_like(ys, memory_format=torch.contiguous_format)
            self._static_x.copy_(xs), self._static_y.copy_(ys)
            self._replay = self.graphs.capture(lambda: self._run(self._static_x, self._static_y))
            self._graph_deps = self._deps()
        else:
            self._static_x.copy_(xs), self._static_y.copy_(ys)  # copy_ also converts the layout
        return self._replay().clone()  # the static outputs are overwritten next call

    def _deps(self) -> tuple:
        """What a captured graph holds by address besides parameters and inputs: a change
        (optimizer state reloaded, a threshold replaced) means recapture."""
        return (self.optimizer.state_version,)


class FastGAFStep(_FastStep):
    """A GAF stepper: ``step(xs (n, b, ...), ys (n, b)) -> StepStats`` (gaf.step).

    Equal to ``gaf_step`` (same micro-gradients, decision, aggregate and optimizer
    update). ``tau`` may be a float, a 0-d tensor or a ``gaf.threshold.Threshold`` (observed
    every step). The optimizer must be a masked one (``build_optimizer(..., masked=True)``).
    ``batched=True`` computes the n micro-gradients in one ``vmap(grad)`` pass
    (``_BatchedMicrograds``): equal to the sequential passes up to summation order.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, tau: Tau,
                 merge: str = "halving", *, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                 compile: bool | str = False, batched: bool = False, graphs=None):
        self.tau = tau  # the setter validates it
        self.merge = check_merge(merge)
        if batched and compile is True:
            raise ValueError("batched=True works with compile=False or 'graph' (torch.compile of vmap is not used)")
        super().__init__(model, optimizer, loss_fn, amp_dtype=amp_dtype, channels_last=channels_last,
                         compile=compile, graphs=graphs)
        # a threshold that is not capturable on this device (a float, a tensor elsewhere) is copied
        # into this tensor before every call: a captured graph reads it, so a new value needs no recapture
        self._tau_tensor = torch.zeros((), dtype=torch.float64, device=self.device)
        self._tau_float: float | None = None
        self.batched = _BatchedMicrograds(model, self.params) if batched else None
        self._grads: torch.Tensor | None = None  # (n, P) micro-gradients, allocated on first use
        self._rows: list[list[torch.Tensor]] = []

    @property
    def tau(self) -> Threshold:
        return self._threshold

    @tau.setter
    def tau(self, value: Tau) -> None:
        self._threshold = as_threshold(value)  # validated now, not at the next step

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        self._check(xs, ys)
        check_n(xs.shape[0])
        return self._call(xs, ys)

    def _refresh(self) -> None:
        super()._refresh()
        if self._threshold.capturable(self.device):
            return
        tau = self._threshold.current(self.device)
        if isinstance(tau, torch.Tensor):
            self._tau_tensor.copy_(tau)
            self._tau_float = None  # a float after it is filled in again
        elif tau != self._tau_float:
            self._tau_tensor.fill_(tau)
            self._tau_float = tau

    def _deps(self) -> tuple:
        return super()._deps() + self._threshold.graph_key()

    def _buffers(self, n: int) -> torch.Tensor:
        if self._grads is None or self._grads.shape[0] != n:
            self._grads = torch.zeros(n, self.size, dtype=self._agg.dtype, device=self.device)
            self._rows = [param_views(row, self.params) for row in self._grads]
        return self._grads

    def _current_tau(self) -> torch.Tensor:
        """The 0-d tensor this step decides with (read inside a captured graph)."""
        if self._threshold.capturable(self.device):
            return self._threshold.current(self.device)
        return self._tau_tensor

    def _run(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        grads = self._buffers(xs.shape[0])
        if self.batched is not None:
            losses, correct = self.batched(self, xs, ys, grads)
        else:  # sequential passes: BatchNorm as in the reference (module docstring)
            micro = micrograds(self.forward, self.loss_fn, self.params, self._rows, zip(xs, ys), self._autocast)
            losses, correct = micro.losses, micro.correct.sum()
        tau = self._current_tau()
        with _ieee_matmul(self.device):
            weights, accepted, distances = agreement_weights_unchecked(gram_matrix(grads), tau, self.merge)
            stepped = accepted[1:].any()
            torch.mm(weights.to(grads.dtype)[None], grads, out=self._agg.view(1, -1))
        self._agg.masked_fill_(~stepped, 0.0)  # a skipped step must see finite (zero) grads
        self._set_grads()
        self.optimizer.masked_update(stepped)
        self._clear_grads()
        self._threshold.observe(distances)
        return StepStats(losses.mean(), correct, distances.float(), accepted[1:].sum(), stepped,
                         tau.detach().to(torch.float32, copy=True), ys.numel())


class _BatchedMicrograds:
    """All n micro-gradients in one pass: ``torch.func.vmap(grad)`` over the microbatch axis.

    An option to the sequential passes, for when they leave the GPU underfilled (n
    passes of b images against one of n*b). Under vmap, BatchNorm normalises each
    microbatch with its own statistics (the vmap axis is folded into the channels), as
    the sequential passes do. Running statistics: each microbatch updates its own copy
    of r0, r_k = (1-a) r0 + a s_k, and ``gaf.batchnorm.sequential_average`` gives the
    sequential result (exactly, in exact arithmetic); num_batches_tracked += n. Other buffers are shared; mutating one under vmap fails
    loudly. Random ops draw differently per microbatch, as in sequential passes.
    """

    def __init__(self, model: nn.Module, params: list[torch.Tensor]):
        names = {id(p): name for name, p in model.named_parameters()}
        self.model, self.params = model, params
        self.param_names = [names[id(p)] for p in params]
        self.norms = []  # (buffer-name prefix, module) of every BatchNorm that tracks running stats
        for name, m in tracked_batchnorms(model):
            if m.momentum is None:
                raise ValueError(f"batched=True needs BatchNorm momentum set; {name or 'the model'} has None "
                                 "(a cumulative average)")
            self.norms.append((f"{name}." if name else "", m))
        self._n = None

    def _prepare(self, n: int, device: torch.device) -> None:
        """Per-n buffers: batched copies of the running stats, and each statistic's decay."""
        stats = running_stats([m for _, m in self.norms])
        self.decay = torch.cat([torch.full((t.numel(),), 1.0 - m.momentum, dtype=t.dtype, device=device)
                                for _, m in self.norms for t in (m.running_mean, m.running_var)]) if stats else None
        self.stats = stats
        # one contiguous (n, *shape) copy per statistic: the BatchNorm batching rule would
        # update a copy of a strided view, and the update would be lost
        self.batched_stats = [t.new_zeros(n, *t.shape) for t in stats]
        self.counts = torch.zeros(len(self.norms), n, dtype=torch.long, device=device)
        self.views, batched = {}, iter(self.batched_stats)
        for j, (prefix, m) in enumerate(self.norms):
            self.views[prefix + "running_mean"], self.views[prefix + "running_var"] = next(batched), next(batched)
            self.views[prefix + "num_batches_tracked"] = self.counts[j]
        self._n = n

    def __call__(self, step: "FastGAFStep", xs: torch.Tensor, ys: torch.Tensor, grads: torch.Tensor):
        from torch.func import functional_call, grad, vmap

        n = xs.shape[0]
        if self._n != n or (self.stats and self.stats[0] is not self.norms[0][1].running_mean):
            self._prepare(n, xs.device)
            self.rows = param_views(grads, self.params)
        if self.stats:
            r0 = torch.cat([t.reshape(-1) for t in self.stats])
            torch._foreach_copy_(self.batched_stats, [t.expand(n, *t.shape) for t in self.stats])

        def loss_of(params, stats, x, y):
            out = functional_call(self.model, (params, stats), (x,))
            loss = step.loss_fn(out, y)
            return loss, (loss.detach().float(), out.detach())

        params = {name: p.detach() for name, p in zip(self.param_names, self.params)}
        with torch.enable_grad(), step._autocast():
            micro, (losses, out) = vmap(grad(loss_of, has_aux=True), in_dims=(None, 0, 0, 0),
                                        randomness="different")(params, self.views, xs, ys)
        torch._foreach_copy_(self.rows, [micro[name] for name in self.param_names])
        if self.stats:  # the sequential running statistics, from the n one-step updates
            runs = torch.cat([b.reshape(n, -1) for b in self.batched_stats], dim=1)
            updated = sequential_average(r0, runs, self.decay)
            torch._foreach_copy_(self.stats, [u.view_as(t) for u, t in zip(updated.split([t.numel() for t in self.stats]),
                                                                            self.stats)])
            torch._foreach_add_([m.num_batches_tracked for _, m in self.norms], n)
        return losses, count_correct(out, ys)


class FastPlainStep(_FastStep):
    """Plain averaging in the same machinery: one forward/backward over all n*b images and
    an (always taken) optimizer step; ``StepStats.unfiltered``."""

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        self._check(xs, ys)
        return self._call(xs, ys)

    def _run(self, xs: torch.Tensor, ys: torch.Tensor) -> StepStats:
        x, y = xs.flatten(0, 1), ys.flatten()
        with torch.enable_grad(), self._autocast():
            out = self.forward(x)
            loss = self.loss_fn(out, y)
        grads = torch.autograd.grad(loss, self.params, materialize_grads=True)
        torch._foreach_copy_(self._grad_views, list(grads))
        self._set_grads()
        self.optimizer.masked_update(None)
        self._clear_grads()
        return StepStats.unfiltered(loss, count_correct(out, y), y.numel())
