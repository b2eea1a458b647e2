"""Validation: the clean test set's loss and accuracy, and the memorisation probe (are the
flipped training samples fitted to their noisy labels or to their true ones?)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gaf.augment import normalize
from gaf.data import ImageDataset


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ds: ImageDataset,
             batch_size: int) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy and predictions over uint8 images ``x`` (no augmentation)."""
    model.eval()
    loss_sum, preds = 0.0, []
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i : i + batch_size], ds.mean, ds.std)
        out = model(xb).float()
        loss_sum += float(F.cross_entropy(out, y[i : i + batch_size], reduction="sum"))
        preds.append(out.argmax(1))
    model.train()
    return loss_sum / max(len(x), 1), torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def is_finite(model: nn.Module) -> bool:
    """Every floating parameter and buffer finite (one host sync)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def accuracy(hits: torch.Tensor) -> float:
    """The fraction of True in ``hits``; NaN where there is nothing to count."""
    return float(hits.float().mean()) if hits.numel() else float("nan")


@dataclass
class MemorisationProbe:
    """A fixed random subset of the training set, probed at every validation."""

    x: torch.Tensor
    noisy_y: torch.Tensor
    true_y: torch.Tensor
    flipped: torch.Tensor

    @classmethod
    def draw(cls, ds: ImageDataset, samples: int, seed: int, device: torch.device) -> "MemorisationProbe":
        idx = torch.randperm(len(ds.train_y), generator=torch.Generator().manual_seed(seed))[:samples].to(device)
        return cls(ds.train_x[idx], ds.train_y[idx], ds.clean_y[idx], ds.flipped[idx])

    def accuracies(self, preds: torch.Tensor) -> dict[str, float]:
        """eval.csv's probe columns: clean samples fitted, flipped ones fitted to the noisy and to the true label."""
        fits_noisy = preds == self.noisy_y
        return {"mem_clean_acc": accuracy(fits_noisy[~self.flipped]),
                "mem_flipped_noisy_acc": accuracy(fits_noisy[self.flipped]),
                "mem_flipped_true_acc": accuracy((preds == self.true_y)[self.flipped])}
