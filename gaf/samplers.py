"""Which training images each step takes: the paper's class-balanced GAF microbatches and the
baseline's class-balanced batch with a random fill. Both draw CPU indices from seeded
generators and save and restore their position (``state_dict``), so a resumed run draws
exactly the batches an unbroken one would.
"""

from __future__ import annotations

import torch

from gaf.sources import DataError

Tensor = torch.Tensor


def check_positive_int(**values):
    for k, v in values.items():
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise DataError(f"{k} must be an integer >= 1, got {v!r}")


class ClassBalancedSampler:
    """The paper's GAF microbatches: ``n_micro`` disjoint microbatches per step, each with
    exactly ``per_class`` images of every class.

    Each class walks through a seeded permutation of its images, pass after pass, so
    every image is used once per pass. When a class runs out mid-step, the rest of its
    pass is used first and the new pass puts those images last, so the microbatches of
    one step stay disjoint. With ``replacement=True`` a class smaller than
    ``per_class * n_micro`` repeats images within a step (it walks several passes).
    Within a microbatch images are grouped by class. ``sample()`` returns CPU indices.
    """

    def __init__(self, labels, num_classes: int, per_class: int, n_micro: int, seed: int, replacement: bool = False):
        check_positive_int(num_classes=num_classes, per_class=per_class, n_micro=n_micro)
        labels = torch.as_tensor(labels).to("cpu", torch.int64)
        if labels.ndim != 1 or len(labels) == 0:
            raise DataError(f"labels must be a non-empty 1-d tensor, got shape {tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise DataError(f"labels must lie in [0, num_classes={num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
        self.num_classes, self.per_class, self.n_micro, self.replacement = num_classes, per_class, n_micro, replacement
        self.need = per_class * n_micro  # images of every class per step
        self.counts = torch.bincount(labels, minlength=num_classes)
        smallest = int(self.counts.argmin())
        low = int(self.counts[smallest])
        if low == 0:
            raise DataError(f"class {smallest} has no images: a class-balanced microbatch is impossible")
        if self.need > low and not replacement:
            raise DataError(f"per_class={per_class} x n_micro={n_micro} = {self.need} images of every class per step, "
                            f"but class {smallest} has only {low} images; lower per_class or n_micro, "
                            f"or pass replacement=True")
        # members[starts[c]: starts[c] + counts[c]] are the images of class c
        self.members = torch.sort(labels, stable=True).indices
        self.starts = (torch.cumsum(self.counts, 0) - self.counts).tolist()
        self.generator = torch.Generator().manual_seed(seed)
        # perms[c, :counts[c]] is class c's current pass; pos[c] how far it has got
        self.perms = torch.full((num_classes, int(self.counts.max())), -1, dtype=torch.int64)
        for c in range(num_classes):
            self._new_pass(c)
        self.pos = torch.zeros(num_classes, dtype=torch.int64)

    def _new_pass(self, c: int, last: Tensor | None = None) -> None:
        """A fresh random pass through class c; images in ``last`` (just used) go to its end."""
        cnt = int(self.counts[c])
        new = self.members[self.starts[c]:self.starts[c] + cnt][torch.randperm(cnt, generator=self.generator)]
        if last is not None and len(last):
            is_last = torch.isin(new, last)
            new = torch.cat([new[~is_last], new[is_last]])
        self.perms[c, :cnt] = new

    def _take_refresh(self, c: int) -> Tensor:
        """The next ``need`` images of class c when its pass ends within this step."""
        cnt, pos = int(self.counts[c]), int(self.pos[c])
        taken = [self.perms[c, pos:cnt].clone()]
        got = cnt - pos
        while True:
            # keep this step's images out of the head of the new pass (impossible, and not
            # attempted, when the class is smaller than a step's need: replacement=True)
            self._new_pass(c, taken[0] if self.need <= cnt else None)
            if got + cnt >= self.need:
                rest = self.need - got
                taken.append(self.perms[c, :rest])
                self.pos[c] = rest
                return torch.cat(taken)
            taken.append(self.perms[c, :cnt].clone())  # replacement: a whole pass, and again
            got += cnt

    def sample(self) -> Tensor:
        """int64 (n_micro, per_class * num_classes): indices into the training set."""
        k = self.need
        out = torch.empty(self.num_classes, k, dtype=torch.int64)
        short = (self.counts - self.pos) < k
        ok = ~short
        if ok.any():
            cols = self.pos[ok, None] + torch.arange(k)
            out[ok] = self.perms[ok].gather(1, cols)
            self.pos[ok] += k
        if short.any():
            for c in short.nonzero().squeeze(1).tolist():  # once per pass per class
                out[c] = self._take_refresh(c)
        # (C, n*m) -> (n, C*m): microbatch j takes items j*m .. j*m+m-1 of every class
        return out.view(self.num_classes, self.n_micro, self.per_class).transpose(0, 1).reshape(self.n_micro, -1)

    def state_dict(self) -> dict:
        return {"num_classes": self.num_classes, "per_class": self.per_class, "n_micro": self.n_micro,
                "replacement": self.replacement, "counts": self.counts.clone(), "perms": self.perms.clone(),
                "pos": self.pos.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_classes", "per_class", "n_micro", "replacement"):
            if state[key] != getattr(self, key):
                raise DataError(f"sampler state has {key}={state[key]!r}, this sampler {getattr(self, key)!r}")
        if not torch.equal(state["counts"], self.counts):
            raise DataError("sampler state was made for other labels (class counts differ)")
        self.perms, self.pos = state["perms"].clone(), state["pos"].clone()
        self.generator.set_state(state["generator"])


def _draw_distinct(n: int, k: int, exclude: Tensor | None, g: torch.Generator) -> Tensor:
    """k distinct indices drawn uniformly from [0, n) minus ``exclude``, in draw order.
    Rejection sampling costs O(k) where k is small against n; otherwise one permutation."""
    exclude = torch.empty(0, dtype=torch.int64) if exclude is None else exclude
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if 4 * (k + len(exclude)) > n:  # dense: a permutation is cheaper than many rejections
        perm = torch.randperm(n, generator=g)
        return perm[~torch.isin(perm, exclude)][:k]
    out = torch.empty(0, dtype=torch.int64)
    while len(out) < k:
        cand = torch.cat([out, torch.randint(0, n, (2 * k,), generator=g)])
        cand = cand[~torch.isin(cand, exclude)]
        uniq, inverse = torch.unique(cand, return_inverse=True)  # keep first occurrences, in draw order
        first = torch.full((len(uniq),), len(cand)).scatter_reduce(0, inverse, torch.arange(len(cand)), "amin")
        out = cand[first.sort().values]
    return out[:k]


class BatchSampler:
    """The baseline batch: floor(B/C) images of every class plus a random fill of the rest,
    without duplicates within a batch (the reference code's "class-balanced + random fill").
    The balanced part walks passes like ``ClassBalancedSampler``; if B < C the batch is
    plain random without replacement."""

    def __init__(self, labels, num_classes: int, batch_size: int, seed: int):
        check_positive_int(num_classes=num_classes, batch_size=batch_size)
        labels = torch.as_tensor(labels).to("cpu", torch.int64)
        if batch_size > len(labels):
            raise DataError(f"batch_size={batch_size} exceeds the {len(labels)} training images")
        self.n, self.num_classes, self.batch_size = len(labels), num_classes, batch_size
        per_class = batch_size // num_classes
        self.balanced = ClassBalancedSampler(labels, num_classes, per_class, 1, seed) if per_class else None
        self.generator = torch.Generator().manual_seed(seed + 1_000_003)  # not the balanced part's stream

    def sample(self) -> Tensor:
        """int64 (1, batch_size)."""
        if self.balanced is None:
            return _draw_distinct(self.n, self.batch_size, None, self.generator).view(1, -1)
        core = self.balanced.sample().view(-1)
        fill = _draw_distinct(self.n, self.batch_size - len(core), core, self.generator)
        return torch.cat([core, fill]).view(1, -1)

    def state_dict(self) -> dict:
        return {"batch_size": self.batch_size, "generator": self.generator.get_state(),
                "balanced": self.balanced.state_dict() if self.balanced else None}

    def load_state_dict(self, state: dict) -> None:
        if state["batch_size"] != self.batch_size:
            raise DataError(f"sampler state has batch_size={state['batch_size']}, this sampler {self.batch_size}")
        self.generator.set_state(state["generator"])
        if self.balanced is not None:
            self.balanced.load_state_dict(state["balanced"])


