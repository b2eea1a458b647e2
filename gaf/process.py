"""The process a run trains in: its rank and device (alone, or one rank of torchrun's group),
each rank's equal share of a step, SIGTERM as a clean stop, and the progress bar.

Shared by one run (``gaf.train``) and a fused group of runs (``gaf.fused_train``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

import torch

from gaf.config import RunConfig
from gaf.methods import METHODS
from gaf.torchrun import init_from_env, shutdown


def resolve_device(name: str) -> torch.device:
    """The device ``cfg.device`` names (auto: CUDA where there is one), or the error saying what is here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} asked for, but CUDA is not available here; use device=cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


@contextlib.contextmanager
def this_process(cfg: RunConfig) -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world size, device) of this process: the only one, or (``cfg.distributed``) its
    rank of torchrun's process group, which is shut down when the run ends."""
    if not cfg.distributed:
        yield 0, 1, resolve_device(cfg.device)
        return
    rank, world, _, device = init_from_env()
    try:
        yield rank, world, device
    finally:
        shutdown()


def check_shares(cfg: RunConfig, world: int) -> None:
    """Every rank takes an equal share of each step: GAF's microbatches, or the baseline's batch."""
    split, what = ((cfg.method.n_micro, "method.n_micro") if METHODS[cfg.method.name].microbatches
                   else (cfg.method.batch_size, "method.batch_size"))
    if split % world:
        raise ValueError(f"{what}={split} must be a multiple of the number of ranks ({world}): "
                         "every rank takes an equal share of each step")


@contextlib.contextmanager
def sigterm_stops(*trainers):
    """SIGTERM (a scheduler's preemption, ``kill``) ends the run (every run of a fused group) after the
    step under way as a validation would: checkpointed there, summary ``stopped``, lock released. One
    process in the main thread only (under torchrun the ranks would stop at different steps).

    ``trainers``: ``gaf.train.Trainer``s; each is told by its ``terminated`` flag."""
    if any(t.cfg.distributed for t in trainers) or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(*_):
        for t in trainers:
            t.terminated = True

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def progress_bar(cfg: RunConfig, start: int, is_main: bool):
    """A tqdm bar over the run's iterations from ``start``: shown by rank 0, where ``train.progress``
    says (None: only on a terminal, and not in CI)."""
    from tqdm.auto import tqdm

    show = cfg.train.progress
    if show is None:
        show = sys.stderr.isatty() and not os.environ.get("CI")
    return tqdm(total=cfg.train.iterations, initial=start, disable=not (show and is_main), desc=cfg.experiment,
                dynamic_ncols=True)
