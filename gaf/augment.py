"""Augmentation and normalisation of whole batches on the training device (no per-image
Python loop, no DataLoader): the paper's RandomCrop(32, padding=4) and horizontal flip,
then the data set's mean and std.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def augment(x: Tensor, generator: torch.Generator | None = None, padding: int = 4) -> Tensor:
    """RandomCrop(H, padding=4) with zero padding, then a horizontal flip with p = 0.5.

    x: uint8 (..., 3, H, W) on any device; one padded copy and one gather for the whole
    batch (the airbench idea), no per-image Python. Draws, in order: row offsets, column
    offsets (each uniform in 0..2*padding), flip coins, from ``generator`` (which must live
    on x's device) or from the default generator.
    """
    shape = x.shape
    x = x.reshape(-1, *shape[-3:])
    b, c, h, w = x.shape
    dev = x.device
    dy = torch.randint(0, 2 * padding + 1, (b,), device=dev, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=dev, generator=generator)
    flip = torch.rand(b, device=dev, generator=generator) < 0.5
    padded = F.pad(x, (padding, padding, padding, padding))  # zeros
    rows = dy[:, None] + torch.arange(h, device=dev)  # (b, h)
    cols = dx[:, None] + torch.arange(w, device=dev)  # (b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flipped crop reads its columns backwards
    out = padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    return out.reshape(shape)


@functools.lru_cache(maxsize=32)
def _channel_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[Tensor, Tensor]:
    """mean and std as float32 (3, 1, 1) tensors on ``device``, made once: a blocking
    host-to-device copy on every call would make the host wait for the GPU every step."""
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1))


def normalize(x: Tensor, mean, std) -> Tensor:
    """uint8 (..., 3, H, W) -> float32 (x / 255 - mean) / std, per channel."""
    mean, std = _channel_constants(tuple(map(float, mean)), tuple(map(float, std)), x.device)
    return (x.float() / 255 - mean) / std
