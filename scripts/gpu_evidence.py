"""experiment=gpu_small on a lent GPU: a time-boxed call that continues the grid where the last one stopped.

    python scripts/gpu_evidence.py                          # CUDA: at most --budget-s (480 s) of wall time
    python scripts/gpu_evidence.py --results $OUT           # the device call (README: carrying the data)
    python scripts/gpu_evidence.py --device cpu --quick     # the dry run the tests run: every stage, ResNet18

What it trains is the preset's (configs/experiment/gpu_small.yaml at scale=gpu), as reproduce.py
exports it to configs/experiment/gpu_small.points.json: a lent GPU has no Hydra, and a test keeps
the file equal to the preset. This script holds only what is about one call with a time budget:

 1. preflight  gpu_check's sync-free and fp32-equal checks with the grid's network, classes, m and
               merge (the suite runs the same checks on a CPU with ResNet18); the runs capture their
               step as a CUDA graph only where the graph equals eager.
 2. speed      the card's speed recorded by an earlier call (results/*/provenance.json); a card
               never seen runs its first wave unpredicted, and that wave measures it.
 3. plan       the points no committed run has the settings of, in the preset's order, in waves of
               k runs, each predicted by ``Speed.wave_s``; after every wave the rate is re-measured
               from it and the rest re-planned. A wave starts only if it is predicted to end in time.
 4. sweep      the waves, each run ``gaf.train.run`` in its own process; after each the outputs are
               rewritten, so a call cut short returns what it finished. Budget left over
               (>= FUSED_BENCH_S) measures bench_fused.

Outputs, in --results/gpu_small/: runs.csv, curves.csv, evals.csv and provenance.json as
scripts/collect.py writes them, this call's runs added to the committed ones (provenance.json's
"calls": every call's card, versions, wall time, speed, plan, preflight), and preflight.md: five
files, within what a device call brings back. `make figures` draws results/gpu_small/'s figure and table from them, like every preset's.
The 480-s budget and the file count are a lent GPU's defaults, not the design: --budget-s 36000 on
a GPU of one's own runs the whole grid.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # a checkout without installing; the scripts beside this

import bench_concurrent  # noqa: E402
import collect  # noqa: E402
import gpu_check  # noqa: E402
from gaf.config import CLASSES, RunConfig  # noqa: E402
from gaf.sources import DataError, cifar10_jpeg_file  # noqa: E402
from gaf.train import run  # noqa: E402

EXPERIMENT = "gpu_small"
POINTS = ROOT / "configs" / "experiment" / f"{EXPERIMENT}.points.json"
DATA_FILES = ("runs.csv", "curves.csv", "evals.csv", "provenance.json")  # what a call continues from
GRACE_S = 30  # runs still going this long after --budget-s are ended (a device call is cut at its timeout)
FUSED_BENCH_S = 90  # budget left after the waves that buys bench_fused's measurement
MAX_CURVE_ROWS = 500  # per run in curves.csv: the whole grid (90 runs) stays under 16 MiB


@dataclass(frozen=True)
class Call:
    """How a call spends its time, apart from what it trains."""

    budget_s: float  # --budget-s by default
    k: int  # runs at once where no speed is recorded (on an H200, nine were no faster than three)
    sync_steps: int  # steps of the preflight's sync-free check
    seeds: int  # the grid's seeds run by default


GPU = Call(budget_s=480, k=3, sync_steps=200, seeds=3)
QUICK = Call(budget_s=400, k=3, sync_steps=5, seeds=1)
# The dry run: the grid's points, ResNet18 still, on a few images for a few iterations.
QUICK_SIZES = {"data": {"train_per_class": 20, "test_per_class": 10}, "method": {"per_class": 1},
               "train": {"iterations": 8, "val_every": 4, "memorisation_samples": 100}}


class Point(NamedTuple):
    """One run of the grid: its folder's name (Hydra's, for the same point) and its settings."""

    folder: str
    config: dict

    @property
    def images(self) -> int:
        """Training images over the whole run."""
        m, per_iteration = self.config["method"], self.config["method"]["batch_size"]
        if m["name"] == "gaf":
            per_iteration = m["n_micro"] * m["per_class"] * CLASSES[self.config["data"]["name"]]
        return self.config["train"]["iterations"] * per_iteration

    @property
    def validations(self) -> int:
        return self.config["train"]["iterations"] // self.config["train"]["val_every"]


def grid(seeds: int, quick: bool = False, path: Path = POINTS) -> list[Point]:
    """The preset's points with a seed below ``seeds``, in its order (``quick``: at the dry run's sizes)."""
    points = [Point(p["folder"], p["config"]) for p in json.loads(path.read_text())["points"]]
    if quick:
        points = [Point(p.folder, {k: {**v, **QUICK_SIZES.get(k, {})} if isinstance(v, dict) else v
                                   for k, v in p.config.items()}) for p in points]
    return [p for p in points if p.config["seed"] < seeds]


def committed(points: list[Point], out: Path) -> set[str]:
    """The folders of the points a finished run in ``out`` has the settings of."""
    return {p.folder for p, done in zip(points, collect.finished_settings(out, [p.config for p in points])) if done}


def launch(a, configs: list[dict], run_dirs: list[Path]) -> dict:
    """Train these runs at once, each in its own process on one CPU thread (bench_concurrent.launch:
    their summaries and the wall time until the last ends), ending those still going at the deadline."""
    argvs = []
    for cfg, d in zip(configs, run_dirs):
        d.parent.mkdir(parents=True, exist_ok=True)
        path = d.with_name(d.name + ".json")
        path.write_text(json.dumps(cfg))
        argvs.append([sys.executable, str(Path(__file__).resolve()), "--run", str(path), str(d)])
    return bench_concurrent.launch(argvs, run_dirs, {**os.environ, "OMP_NUM_THREADS": "1"},
                                   timeout=a.deadline - time.perf_counter())


def as_run(a, config: dict, compile: str) -> dict:
    """A point's settings with how this call runs it: its device, graph capture, data file, no bar."""
    return {**config, "device": a.device, "data": {**config["data"], "jpeg_path": a.jpeg},
            "train": {**config["train"], "compile": compile, "progress": False}}


# ----------------------------------------------------------------------------- 1. preflight


def preflight(a, out: Path, points: list[Point]) -> tuple[dict, str]:
    """gpu_check's sync-free and fp32-equal checks with the grid's network, classes, m and merge;
    writes out/preflight.md. Returns the results and the runs' train.compile, or exits."""
    gaf = next(p.config for p in points if p.config["method"]["name"] == "gaf")
    args = gpu_check.parse_args(["--device", a.device, *(["--quick"] if a.quick else []), "--jpeg", str(a.data),
                                 "--out-dir", str(out)])
    ctx = gpu_check.context(args)  # decodes the JPEG copy once, into the cache every run then reads
    ctx.model, ctx.classes, ctx.m = gaf["model"]["name"], CLASSES[gaf["data"]["name"]], gaf["method"]["per_class"]
    ctx.merge, ctx.sync_steps = gaf["method"]["merge"], a.call.sync_steps
    results = gpu_check.run_checks(ctx, ["sync-free", "fp32-equal"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "preflight.md").write_text(gpu_check.markdown(gpu_check.environment(ctx) | {"command": command_line()},
                                                         results, []))
    del ctx
    if a.device == "cuda":
        torch.cuda.empty_cache()
    if failed := [(n, r) for n, r in results.items() if r["status"] != "PASS"]:
        print(f"FAIL preflight {failed[0][0]}: {failed[0][1]['detail']}; the grid did not run "
              f"(report: {out / 'preflight.md'})", flush=True)
        sys.exit(1)
    return results, "graph" if a.device == "cuda" else "none"


# ----------------------------------------------------------------------------- 2. speed


@dataclass(frozen=True)
class Speed:
    """k runs at once train ``rate`` images/s between them in the steady state; a wave of them
    takes start_s + its images / rate + V * eval_s. A validation is counted at its cost with one
    run alone (while one run validates the others go on): fitted to the two recorded H200 calls,
    whose waves it predicts within 3% and 13% (tests/test_gpu_evidence.py)."""

    k: int
    rate: float  # images/s summed over the k runs
    eval_s: float  # one validation (and its checkpoint) of one run alone
    start_s: float  # process start, data, model, the first iterations; and the end

    def wave_s(self, images: int, validations: int) -> float:
        return self.start_s + images / self.rate + validations * self.eval_s

    def remeasured(self, images: int, validations: int, wall_s: float) -> "Speed":
        """The rate that a wave of ``images`` that took ``wall_s`` implies."""
        training_s = max(wall_s - self.start_s - validations * self.eval_s, 1e-3)
        return Speed(self.k, images / training_s, self.eval_s, self.start_s)


def recorded_speed(card: str, results: Path = ROOT / "results") -> Speed | None:
    """The fastest speed of the newest call recorded for this card (results/*/provenance.json), or None."""
    calls = []
    for path in sorted(results.glob("*/provenance.json")):
        p = json.loads(path.read_text())
        calls += [c for c in p.get("calls", [p.get("gpu-small")]) if c and c.get("card") == card
                  and (c.get("speeds") or c.get("speed_after"))]
    return max(call_speeds(max(calls, key=lambda c: c["date"])), key=lambda s: s.rate) if calls else None


def call_speeds(call: dict) -> list[Speed]:
    """A recorded call's speeds: the rate its last wave measured, or (calls before the rate was
    recorded) seconds per iteration of GAF runs of 200 images, with one run alone's validation."""
    if "speed_after" in call:
        return [Speed(**call["speed_after"])]
    alone = min(s["eval_s"] for s in call["speeds"])
    return [Speed(s["k"], s["k"] * 200 / s["iter_s"], alone, s["start_s"]) for s in call["speeds"]]


# ----------------------------------------------------------------------------- 3. plan


@dataclass(frozen=True)
class Plan:
    """The waves still to run and the speed that predicts them."""

    waves: list[list[Point]]
    speed: Speed

    @classmethod
    def make(cls, points: list[Point], speed: Speed) -> "Plan":
        """Waves of the speed's k runs, in grid order."""
        return cls([points[i : i + speed.k] for i in range(0, len(points), speed.k)], speed)

    def wave_s(self, wave: list[Point]) -> float:
        return self.speed.wave_s(sum(p.images for p in wave), max(p.validations for p in wave))

    def fitting(self, left_s: float) -> int:
        """How many of the waves, in order, are predicted to end within ``left_s``."""
        ends = [sum(self.wave_s(w) for w in self.waves[: i + 1]) for i in range(len(self.waves))]
        return sum(end <= left_s for end in ends)

    def after(self, wave: list[Point], wall_s: float) -> "Plan":
        """The rest, predicted with the rate this wave measured."""
        validations = max(p.validations for p in wave)
        return Plan(self.waves[1:], self.speed.remeasured(sum(p.images for p in wave), validations, wall_s))

    def describe(self, left_s: float) -> str:
        n = self.fitting(left_s)
        return (f"plan: {sum(map(len, self.waves))} runs to go in {len(self.waves)} waves of {self.speed.k}; "
                f"{n} predicted to fit ({sum(self.wave_s(w) for w in self.waves[:n]):.0f} s of the {left_s:.0f} s "
                f"left, {self.speed.rate:,.0f} images/s)")


# ----------------------------------------------------------------------------- 4. sweep and outputs


def sweep(a, plan: Plan, compile: str, work: Path, record: dict) -> None:
    """Wave after wave while the next is predicted to end within the budget; the outputs are
    rewritten after each. The first wave runs whatever its prediction (the call's minimum answer)."""
    waves = record["waves"] = []
    while plan.waves:
        wave, left = plan.waves[0], a.t0 + a.budget_s - time.perf_counter()
        predicted = plan.wave_s(wave)
        if len(waves) == a.waves:
            print(f"stop: --waves {a.waves} made; {len(plan.waves)} waves not made", flush=True)
            break
        if waves and predicted > left:
            print(f"stop: the next wave is predicted to take {predicted:.0f} s, {left:.0f} s are left; "
                  f"{len(plan.waves)} waves not made", flush=True)
            break
        started = time.perf_counter()
        try:
            got = launch(a, [as_run(a, p.config, compile) for p in wave], [work / "sweep" / p.folder for p in wave])
            wall = got["wall_s"]
            record["images_seen"] += got["images"]
        except SystemExit as e:  # a failed or cut run must not cost the outputs of the others
            wall = time.perf_counter() - started
            print(f"FAIL wave {'; '.join(p.folder for p in wave)}: {e}", flush=True)
        waves.append({"runs": [p.folder for p in wave], "predicted_s": round(predicted, 1), "wall_s": round(wall, 1)})
        print(f"wave {len(waves)} ({'; '.join(p.folder for p in wave)}): {wall:.0f} s, predicted {predicted:.0f} s",
              flush=True)
        plan = plan.after(wave, wall)
        record["speed_after"] = asdict(plan.speed)
        record["wall_s"] = round(time.perf_counter() - a.t0, 1)
        write_outputs(a, work, record)


def write_outputs(a, work: Path, record: dict) -> None:
    """collect.py's files with this call's runs added to the committed ones, and this call's record;
    a failure is printed, not raised (the next wave may still be written)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its line names the temporary folder
            collect.collect([work / "sweep"], a.results, MAX_CURVE_ROWS, command=record["command"], add=True)
        record_call(a.results / EXPERIMENT, record)
    except Exception:
        traceback.print_exc()
        print("FAIL the outputs were not all written", flush=True)


def record_call(out: Path, record: dict) -> None:
    """provenance.json's "calls" with this call's record (replacing an earlier version of it)."""
    path = out / "provenance.json"
    provenance = json.loads(path.read_text()) if path.is_file() else {}
    calls = [c for c in provenance.get("calls", []) if c.get("date") != record["date"]] + [record]
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**provenance, "calls": calls, "run_roots": ["TMP/sweep"]}, indent=2, default=str)
                    + "\n")


def bench_fused(a, left_s: float) -> list[str]:
    """What the budget left after the waves buys: scripts/bench_fused.py's GAF rows (K runs as
    processes, in turn, fused), its table's lines, or why there are none."""
    quick = ["--quick", "--k", "1", "3"] if a.quick else ["--k", "1", "3", "9", "--steps", "50"]
    argv = [sys.executable, str(ROOT / "scripts" / "bench_fused.py"), "--device", a.device, "--kinds", "gaf", *quick]
    try:
        got = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=left_s)
    except subprocess.TimeoutExpired:
        return [f"bench_fused did not end within the {left_s:.0f} s left"]
    if got.returncode != 0:
        return [f"bench_fused failed (exit {got.returncode}): {got.stderr.strip().splitlines()[-1:]}"]
    out = got.stdout.splitlines()
    lines = out[next(i for i, line in enumerate(out) if line.startswith("K runs of")):]  # its table
    print("\n".join(lines), flush=True)
    return lines


# ----------------------------------------------------------------------------- main


def command_line() -> str:
    """This call's command line, with ``$OUT`` for the device tool's output folder: committed
    files name no machine's paths."""
    text = " ".join(["python", "scripts/gpu_evidence.py", *sys.argv[1:]])
    return text.replace(os.environ["OUT"], "$OUT") if os.environ.get("OUT") else text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="the dry run: ResNet18 on a few images, a few iterations")
    p.add_argument("--budget-s", type=float, default=None, help=f"wall seconds from start to the last wave's end "
                   f"(default {GPU.budget_s:.0f}; {QUICK.budget_s:.0f} with --quick)")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds of the grid (default {GPU.seeds}; {QUICK.seeds} "
                   "with --quick)")
    p.add_argument("--jpeg", default=None, help="the CIFAR-10 JPEG copy (default: data/, then the offline copy)")
    p.add_argument("--results", default=None, help=f"the results folder whose {EXPERIMENT}/ the call writes "
                   "(default results/; outputs/gpu-evidence with --quick)")
    p.add_argument("--waves", type=int, default=None, help="at most this many waves (default: what the budget allows)")
    p.add_argument("--committed", default=None, help="the results folder whose grid the call continues (default "
                   "results/; none with --quick)")
    p.add_argument("--no-bench", action="store_true", help="no bench_fused measurement with the budget left")
    p.add_argument("--run", nargs=2, metavar=("CONFIG", "RUN_DIR"), help=argparse.SUPPRESS)  # one run, in its process
    a = p.parse_args(argv)
    if a.run:
        return a
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; --device cpu --quick is the dry run")
    if a.device == "cpu" and not a.quick:
        p.error("the grid needs a GPU; on a CPU only the dry run: --device cpu --quick")
    a.call = QUICK if a.quick else GPU
    a.seeds, a.budget_s = a.seeds or a.call.seeds, a.budget_s or a.call.budget_s
    for name in ("seeds", "waves", "budget_s"):
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
    a.results = Path(a.results or ROOT / ("outputs/gpu-evidence" if a.quick else "results"))
    a.committed = Path(a.committed) if a.committed else (None if a.quick else ROOT / "results")
    try:
        a.data, a.data_source = cifar10_jpeg_file(None, a.jpeg)
    except DataError as e:
        p.error(str(e))
    return a


def continue_committed(a) -> Path:
    """The call's folder, holding the committed grid's data to continue from."""
    out = a.results / EXPERIMENT
    out.mkdir(parents=True, exist_ok=True)
    if a.committed is not None and (a.committed / EXPERIMENT).resolve() != out.resolve():
        for name in DATA_FILES:
            if (a.committed / EXPERIMENT / name).is_file():
                shutil.copy(a.committed / EXPERIMENT / name, out / name)
    return out


def main(argv=None) -> dict | None:
    a = parse_args(argv)
    if a.run:
        return run(RunConfig.from_dict(json.loads(Path(a.run[0]).read_text())), a.run[1])
    a.t0 = t0 = time.perf_counter()
    a.deadline = t0 + a.budget_s + GRACE_S
    card = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    out = continue_committed(a)
    print(f"gpu_evidence on {card}, torch {torch.__version__}; {a.data_source}; budget {a.budget_s:.0f} s; "
          f"out {out}", flush=True)
    record = {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": command_line(),
              "budget_s": a.budget_s, "images_seen": 0}
    points = grid(a.seeds, a.quick)
    todo = [p for p in points if p.folder not in committed(points, out)]
    print(f"grid: {len(todo)} of {len(points)} runs to go ({len(points) - len(todo)} committed)", flush=True)
    if not todo:
        return record
    results, compile = preflight(a, out, points)
    record.update(compile=compile, preflight={n: {k: r[k] for k in ("status", "seconds", "detail", "figures")}
                                              for n, r in results.items()})
    speed = recorded_speed(card) if a.device == "cuda" else None
    record["speed_from"] = "recorded" if speed else "this call's first wave"
    plan, left = Plan.make(todo, speed or Speed(a.call.k, math.inf, 0.0, 0.0)), a.budget_s - (time.perf_counter() - t0)
    print(plan.describe(left) if speed else f"plan: {len(todo)} runs to go in waves of {a.call.k}; no speed recorded "
          f"for {card}: the first wave measures it", flush=True)
    record["plan"] = {"waves": len(plan.waves), "k": plan.speed.k, "fitting": plan.fitting(left), "left_s": round(left, 1)}
    with tempfile.TemporaryDirectory(prefix="gpu-evidence-") as tmp:
        sweep(a, plan, compile, Path(tmp), record)
    if not a.no_bench and a.budget_s - (time.perf_counter() - t0) >= FUSED_BENCH_S:
        record["fused_bench"] = bench_fused(a, a.budget_s - (time.perf_counter() - t0))
        record_call(out, record)
    files = sorted(f for f in out.iterdir() if f.is_file())
    print(f"done in {time.perf_counter() - t0:.0f} s (budget {a.budget_s:.0f} s): {len(files)} files, "
          f"{sum(f.stat().st_size for f in files) / 2**20:.1f} MiB in {out}", flush=True)
    return record


if __name__ == "__main__":
    main()
