"""The methods a run can name (``method.name``), one record each: what a method trains on, which
settings act on it, and where it can run. Pure Python, so that ``gaf.config`` (which imports no
torch) derives its choices and rules from it; the trainer and ``gaf.steppers`` build a run's step
from its record's flags.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str  # the method.name that asks for it
    title: str  # how logs and tables name it
    microbatches: bool  # n class-balanced microbatches and a filter (method.n_micro, per_class, tau, merge
    #                     apply); else one batch of method.batch_size images
    peer: bool = False  # trains a second network beside the first (method.forget_rate, ramp_epochs apply)
    fast: bool = True  # runs on the fast path, fused and distributed (gaf.fast, gaf.fused, gaf.distributed)


METHODS = {m.name: m for m in (
    Method("gaf", "GAF", microbatches=True),
    Method("baseline", "baseline", microbatches=False),
    Method("coteaching", "co-teaching", microbatches=False, peer=True, fast=False),
)}
