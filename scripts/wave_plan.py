"""How long a wave of runs takes on one device, and which runs make the next wave.

A wave trains its points at once, one process per fused group (gaf.fused_train.groups). Its wall
time is start_s + its images / rate + its validations x eval_s, where a fused group validates its
members in turn and the groups validate at once, so the validations counted are the largest
group's. The speed comes from the device (the rate timed, the rest as the card's last call recorded
it) and is rescaled after every wave to what that wave took. scripts/gpu_evidence.py plans with it.
It imports neither Hydra nor YAML (a lent GPU has neither).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

import bench_fused
from gaf.config import CLASSES, RunConfig
from gaf.fused_train import groups, step_shape
from gaf.methods import METHODS

EVAL_S, START_S = 1.0, 30.0  # a run's validation, and a wave's start and end, on a card never recorded


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its folder's name (Hydra's, for the same point) and its settings, read
    once into the RunConfig and step shape that planning asks of it many times."""

    folder: str
    config: dict
    run: RunConfig = field(init=False, repr=False, compare=False)
    step: tuple[int, int] = field(init=False, repr=False, compare=False)  # (n, b) of its step

    def __post_init__(self):
        run = RunConfig.from_dict(self.config)
        object.__setattr__(self, "run", run)
        object.__setattr__(self, "step", step_shape(run, CLASSES[self.config["data"]["name"]]))

    @property
    def kind(self) -> str:
        """bench_fused's name for its step's shape: "gaf" (n microbatches) or "baseline" (one batch)."""
        return "gaf" if METHODS[self.config["method"]["name"]].microbatches else "baseline"

    @property
    def images(self) -> int:
        """Training images over the whole run."""
        n, b = self.step
        return self.config["train"]["iterations"] * n * b

    @property
    def validations(self) -> int:
        return self.config["train"]["iterations"] // self.config["train"]["val_every"]


def jobs(points: list[Point], max_fused: int) -> list[list[Point]]:
    """These points as the processes that train them: fused groups of at most ``max_fused``."""
    return [[points[i] for i in g] for g in groups([p.run for p in points], max_fused)]


@dataclass(frozen=True)
class Speed:
    """A wave's time. With one run per process this is the model fitted to the recorded H200 calls,
    whose waves it predicts within 3% and 13% (tests/test_gpu_evidence.py)."""

    rate: float  # images/s summed over the wave's processes
    eval_s: float  # one validation (and its checkpoint) of one run
    start_s: float  # process start, data, model, the first iterations; and the end

    def seconds(self, images: int, validations: int) -> float:
        return self.start_s + images / self.rate + validations * self.eval_s

    def wave_s(self, wave: list[Point], max_fused: int) -> float:
        return self.seconds(*load(wave, max_fused))

    def remeasured(self, images: int, validations: int, wall_s: float) -> "Speed":
        """This speed scaled to predict the ``wall_s`` that a wave of ``images`` and ``validations``
        took: every part at once (timed apart, recorded or guessed; the wave measured them together)."""
        slower = wall_s / self.seconds(images, validations)
        return Speed(self.rate / slower, self.eval_s * slower, self.start_s * slower)


def load(wave: list[Point], max_fused: int) -> tuple[int, int]:
    """A wave's training images, and its validations as they follow one another (the largest group's)."""
    return sum(p.images for p in wave), max(len(job) * job[0].validations for job in jobs(wave, max_fused))


def next_wave(todo: list[Point], speed: Speed, max_fused: int, left_s: float) -> list[Point]:
    """The longest run of ``todo``'s first points predicted to end within ``left_s`` (at least one).
    A longer prefix never takes less (groups only grow), so the search stops at the first that fails."""
    size = 1
    while size < len(todo) and speed.wave_s(todo[: size + 1], max_fused) <= left_s:
        size += 1
    return todo[:size]


def timed_rate(todo: list[Point], device: str, max_fused: int, steps: int) -> tuple[float, int]:
    """Images/s of a full first wave's groups' steps (a full group of GAF runs, two arms in three, and
    the baselines beside them), each group timed in turn on the device (bench_fused: random images of
    the runs' shapes, the graph captured where the runs capture it); and how many runs that wave has."""
    wave, images, seconds = todo[: max(3 * max_fused // 2, 3)], 0.0, 0.0
    for job in jobs(wave, max_fused):
        (n, b), config, kind = job[0].step, job[0].config, job[0].kind
        bench = SimpleNamespace(device=device, model=config["model"]["name"], warmup=3, steps=steps,
                                classes=CLASSES[config["data"]["name"]], shapes={kind: (n, b)})
        images += len(job) * n * b
        seconds += len(job) * n * b / (bench_fused.fused if len(job) > 1 else bench_fused.separate)(bench, kind, len(job))
    if device == "cuda":
        torch.cuda.empty_cache()  # the runs' processes get the memory this one's cache would keep
    return images / seconds, len(wave)


def starting_speed(rate: float, card: str, results: Path | None) -> tuple[Speed, str]:
    """A first wave's speed from its timed rate, with validation and start as the card's newest call
    in ``results`` recorded them ("recorded"), else guessed ("guessed")."""
    recorded = recorded_speed(card, results) if results is not None else None
    if recorded is None:
        return Speed(rate, EVAL_S, START_S), "guessed"
    return Speed(rate, recorded.eval_s, recorded.start_s), "recorded"


def recorded_speed(card: str, results: Path) -> Speed | None:
    """The speed of the newest call recorded for this card (results/*/provenance.json), or None."""
    calls = []
    for path in sorted(results.glob("*/provenance.json")):
        p = json.loads(path.read_text())
        calls += [c for c in p.get("calls", [p.get("gpu-small")]) if c and c.get("card") == card
                  and (c.get("speeds") or c.get("speed_after"))]
    return call_speed(max(calls, key=lambda c: c["date"])) if calls else None


def call_speed(call: dict) -> Speed:
    """A recorded call's speed: its last wave's, or (calls before that was recorded) its plan's k runs
    at once, from seconds per iteration of GAF runs of 200 images, with one run alone's validation."""
    if "speed_after" in call:
        return Speed(*(call["speed_after"][f] for f in ("rate", "eval_s", "start_s")))
    s = next(s for s in call["speeds"] if s["k"] == call["plan"]["k"])
    return Speed(s["k"] * 200 / s["iter_s"], min(s["eval_s"] for s in call["speeds"]), s["start_s"])
