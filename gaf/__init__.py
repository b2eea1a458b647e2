"""Gradient Agreement Filtering (Chaubard, Eddy, Kochenderfer, 2024).

    from gaf import gaf_step
    stats = gaf_step(model, optimizer, loss_fn, [(x1, y1), (x2, y2)], tau=0.97)

``gaf.filter`` is the algorithm on tensors (imports only torch); ``gaf.step`` applies
it to a model. Data, models and the trainer live in ``gaf.data``, ``gaf.models`` and
``gaf.train`` and are imported on demand.
"""

from gaf.filter import (
    AdaptiveTau,
    FilterResult,
    agreement_weights,
    cosine_distance,
    filter_gradients,
    gram_matrix,
)
from gaf.step import gaf_step

__all__ = [
    "AdaptiveTau",
    "FilterResult",
    "agreement_weights",
    "cosine_distance",
    "filter_gradients",
    "gaf_step",
    "gram_matrix",
]
__version__ = "0.1.0"
