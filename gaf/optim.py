"""Optimizers for GAF: torch.optim's SGD, Adam and AdamW, and their masked twins.

A skipped GAF step must leave parameters and optimizer state bit for bit as they were. The
readable path (``gaf_step``) simply does not call ``step()``; the fast path (``gaf.fast``)
decides on the device and cannot branch on it without waiting for the GPU, so it steps a
*masked* optimizer: ``step(mask)`` with a 0-d bool tensor, a no-op where ``mask`` is False.
``build_optimizer`` makes either kind by name.
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")


def _check_mask(mask) -> None:
    if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 0):
        what = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else repr(mask)
        raise ValueError(f"mask must be None or a 0-d bool tensor, got {what}")


def _check_number(name: str, value, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise ValueError(f"{name} must be a number >= {low}, got {value!r}")
    return float(value)


class MaskedOptimizer(torch.optim.Optimizer):
    """An optimizer whose ``step(mask)`` is a no-op, bit for bit, when ``mask`` is False.

    The update is written with ``torch._foreach`` ops whose scalars are 0-d device
    tensors chosen by ``torch.where(mask, ...)``: a rejected step multiplies by exactly 1
    and adds exactly 0, so parameters, every state tensor and the step counts keep their
    bits, and no value ever travels to the host. Gradients must be finite on a masked-off
    step (``FastGAFStep`` zeroes them), since NaN * 0 is NaN.

    The learning rate stays a Python float in ``param_groups`` (the lr schedule, gaf.schedule,
    writes it); ``refresh_lr()`` copies it into a persistent float64 device tensor that the
    update reads, so a captured graph sees a changed lr without recapture. ``step``
    refreshes, then calls ``masked_update``; a graph captures only ``masked_update``.
    """

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        self._lr_tensors: dict[int, tuple[float, torch.Tensor]] = {}
        self.state_version = 0  # bumped whenever state tensors are (re)allocated

    def refresh_lr(self) -> None:
        """Copy each group's float lr into its device tensor (a fill kernel, no sync)."""
        for i, group in enumerate(self.param_groups):
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                raise ValueError("masked optimizers take a float lr (they keep their own device copy)")
            device = group["params"][0].device
            cached = self._lr_tensors.get(i)
            if cached is None or cached[1].device != device:
                self._lr_tensors[i] = (lr, torch.full((), float(lr), dtype=torch.float64, device=device))
            elif cached[0] != lr:
                cached[1].fill_(float(lr))  # in place: a captured graph keeps reading this tensor
                self._lr_tensors[i] = (lr, cached[1])

    def _lr(self, index: int) -> torch.Tensor:
        if index not in self._lr_tensors:
            self.refresh_lr()
        return self._lr_tensors[index][1]

    @torch.no_grad()
    def step(self, mask: torch.Tensor | None = None):
        """One update, applied iff ``mask`` (a 0-d bool tensor; None means always)."""
        self.refresh_lr()
        self.masked_update(mask)

    @torch.no_grad()
    def masked_update(self, mask: torch.Tensor | None = None) -> None:
        """The update without the lr refresh: what a CUDA graph captures."""
        if mask is not None:
            _check_mask(mask)
        for index, group in enumerate(self.param_groups):
            for key, allowed in (("dampening", 0), ("maximize", False), ("amsgrad", False)):
                if group.get(key, allowed) != allowed:
                    raise ValueError(f"{type(self).__name__} does not support {key}={group[key]!r}")
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            device = params[0].device
            m = torch.ones((), dtype=torch.bool, device=device) if mask is None else mask.to(device)
            self._update_group(index, group, params, m)

    def _state(self, p: torch.Tensor, **makers) -> dict:
        """p's state, creating missing entries (also a None torch may have stored)."""
        state = self.state[p]
        for key, make in makers.items():
            if state.get(key) is None:
                state[key] = make(p)
                self.state_version += 1
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim semantics, but state is copied: into the existing state tensors where
        they exist (so a captured graph stays valid), else into fresh ones; step counts
        move to their parameter's device."""
        old = {p: dict(s) for p, s in self.state.items()}
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                if "step" in state:
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)
                for key, value in state.items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    prev = old.get(p, {}).get(key)
                    if isinstance(prev, torch.Tensor) and prev.shape == value.shape and prev.dtype == value.dtype \
                            and prev.device == value.device:
                        state[key] = prev.copy_(value)
                    else:  # a copy: torch would alias the loaded (possibly live) tensors
                        state[key] = value.clone()
                        self.state_version += 1


class MaskedSGD(MaskedOptimizer):
    """torch.optim.SGD (momentum, nesterov, weight decay, dampening 0) with a masked step.

    Bit-identical to torch.optim.SGD's single-tensor path (torch's CPU default) when
    ``capturable=False``, where lr is read as a Python float. ``capturable=True`` reads lr
    from a device tensor (for CUDA graphs); results then differ from torch by rounding
    (one extra rounding in ``lr * d``). A parameter without ``.grad`` is skipped, as in torch.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, capturable: bool = False):
        _check_number("lr", lr), _check_number("momentum", momentum), _check_number("weight_decay", weight_decay)
        if nesterov and momentum <= 0:
            raise ValueError(f"nesterov needs momentum > 0, got momentum={momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=bool(nesterov),
                                      weight_decay=weight_decay, dampening=0.0, capturable=bool(capturable)))

    def _update_group(self, index: int, group: dict, params: list, mask: torch.Tensor) -> None:
        momentum, wd, nesterov = group["momentum"], group["weight_decay"], group["nesterov"]
        grads = [p.grad for p in params]
        maskf = mask.to(params[0].dtype)
        # d = grad + wd * param, then masked (x1 or x0, exact): the momentum buffer adds 0 when skipped
        if wd != 0:
            d = torch._foreach_add(grads, params, alpha=wd)
            torch._foreach_mul_(d, maskf)
        else:
            d = torch._foreach_mul(grads, maskf)
        if momentum != 0:
            bufs = [self._state(p, momentum_buffer=torch.zeros_like)["momentum_buffer"] for p in params]
            # torch starts the buffer as a clone of d; 0 * momentum + d is the same bits
            torch._foreach_mul_(bufs, torch.where(mask, momentum, 1.0).to(maskf.dtype))
            torch._foreach_add_(bufs, d)
            if nesterov:
                torch._foreach_add_(d, bufs, alpha=momentum)
                torch._foreach_mul_(d, maskf)
            else:
                d = torch._foreach_mul(bufs, maskf)
        if group["capturable"]:
            torch._foreach_mul_(d, (-self._lr(index)).to(maskf.dtype))
            torch._foreach_add_(params, d)
        else:
            torch._foreach_add_(params, d, alpha=-group["lr"])


class MaskedAdam(MaskedOptimizer):
    """torch.optim.Adam (L2 weight decay) with a masked step; ``MaskedAdamW`` decouples it.

    The bias corrections are computed on the device in float64 from the step count, so
    the result matches torch.optim.Adam's single-tensor path bit for bit on CPU. All
    parameters of a group share one step count (they are always stepped together), so
    every parameter must have a ``.grad`` when the optimizer steps.
    """

    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        _check_number("lr", lr), _check_number("eps", eps), _check_number("weight_decay", weight_decay)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps,
                                      weight_decay=weight_decay, capturable=True))

    def _update_group(self, index: int, group: dict, params: list, mask: torch.Tensor) -> None:
        missing = [i for i, p in enumerate(group["params"]) if p.grad is None]
        if missing:
            raise ValueError(f"{type(self).__name__}: parameters {missing} of group {index} have no .grad; "
                             "a masked Adam steps every parameter of a group together")
        beta1, beta2 = group["betas"]
        wd, eps, lr = group["weight_decay"], group["eps"], self._lr(index)
        dtype = params[0].dtype
        maskf = mask.to(dtype)
        zeros = lambda p: torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self._state(p, step=lambda q: torch.zeros((), dtype=torch.float32, device=q.device),
                              exp_avg=zeros, exp_avg_sq=zeros) for p in params]
        steps = [s["step"] for s in states]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_add_(steps, mask.to(torch.float32))
        step = steps[0].double().clamp(min=1.0)  # clamp: a masked first step must not divide by 0
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step).sqrt().to(dtype)
        neg_step_size = torch.where(mask, -lr / bias_correction1, 0.0).to(dtype)
        grads = [p.grad for p in params]
        if wd != 0 and self.decoupled:
            torch._foreach_mul_(params, torch.where(mask, 1 - lr * wd, 1.0).to(dtype))
        elif wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)
        weight1 = torch.where(mask, 1 - beta1, 0.0).to(dtype)
        torch._foreach_lerp_(exp_avgs, grads, [weight1] * len(params))
        torch._foreach_mul_(exp_avg_sqs, torch.where(mask, beta2, 1.0).to(dtype))
        masked = torch._foreach_mul(grads, maskf)
        torch._foreach_addcmul_(exp_avg_sqs, masked, masked, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        # param.addcdiv_(exp_avg, denom, value=-step_size) evaluates (value * exp_avg) / denom + param
        update = torch._foreach_mul(exp_avgs, neg_step_size)
        torch._foreach_div_(update, denom)
        torch._foreach_add_(params, update)


class MaskedAdamW(MaskedAdam):
    """torch.optim.AdamW (decoupled weight decay, default 1e-2) with a masked step."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def build_optimizer(name: str, params, lr: float, momentum: float = 0.9, nesterov: bool = True,
                    weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                    masked: bool = False) -> torch.optim.Optimizer:
    """``name`` in {"sgd", "adam", "adamw"}: torch.optim's class, or the masked one."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    betas = tuple(betas)
    if name == "sgd":
        cls = MaskedSGD if masked else torch.optim.SGD
        return cls(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if masked:
        cls = MaskedAdam if name == "adam" else MaskedAdamW
    else:
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=betas, weight_decay=weight_decay)
