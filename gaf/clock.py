"""A run's two clocks: wall time and training time, carried across relaunches in its checkpoint."""

from __future__ import annotations

import time


class RunClock:
    """A run's two times, carried across relaunches in the checkpoint's ``state``
    (``elapsed``, ``train_time``).

    Wall time: since the run first started, everything included (set-up aside). Training
    time: the steps alone, counted at each flush, where the host has waited for the steps'
    results (on CUDA a step returns before the GPU ran it); validation is not counted.
    """

    def __init__(self):
        self.wall_before = 0.0  # wall time of earlier launches (and of this one, once stopped)
        self.training = 0.0
        self._started = self._counted_to = time.perf_counter()

    def start(self) -> None:
        """The loop begins."""
        self._started = self._counted_to = time.perf_counter()

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self._started

    def count_training(self) -> None:
        """The steps since the last count are done: their time is training time."""
        now = time.perf_counter()
        self.training += now - self._counted_to
        self._counted_to = now

    def skip(self) -> None:
        """The time since the last count was not training (validation, checkpointing)."""
        self._counted_to = time.perf_counter()

    def stop(self) -> None:
        self.wall_before = self.wall()

    def state_dict(self) -> dict:
        return {"elapsed": self.wall_before, "train_time": self.training}

    def load_state_dict(self, state: dict) -> None:
        self.wall_before, self.training = state["elapsed"], state["train_time"]
