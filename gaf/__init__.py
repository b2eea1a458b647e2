"""Gradient Agreement Filtering (Chaubard, Eddy, Kochenderfer, 2024).

    from gaf import gaf_step
    stats = gaf_step(model, optimizer, loss_fn, [(x1, y1), (x2, y2)], tau=0.97)

``gaf.filter`` is the algorithm on tensors (imports only torch); ``gaf.step`` applies
it to a model. Data, models and the trainer live in ``gaf.data``, ``gaf.models`` and
``gaf.train``; a run's settings in ``gaf.config``. Everything is imported on demand.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Where each public name lives. They are imported on first use (PEP 562), so that the light
# modules (gaf.config, gaf.rundir: reading run files) can be imported without torch.
_EXPORTS = {
    "AdaptiveTau": "gaf.threshold",
    "FilterResult": "gaf.filter",
    "FusedSteps": "gaf.fused",
    "agreement_weights": "gaf.filter",
    "cosine_distance": "gaf.filter",
    "filter_gradients": "gaf.filter",
    "gram_matrix": "gaf.filter",
    "gaf_step": "gaf.step",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

if TYPE_CHECKING:
    from gaf.filter import FilterResult, agreement_weights, cosine_distance, filter_gradients, gram_matrix
    from gaf.step import gaf_step
    from gaf.threshold import AdaptiveTau


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gaf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
