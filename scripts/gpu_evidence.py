"""The evidence that decides, in one time-boxed call on a lent GPU: GAF against its control.

    python scripts/gpu_evidence.py                          # CUDA: at most --budget-s (480 s) of wall time
    python scripts/gpu_evidence.py --out $OUT/gpu-grid      # the device call (README: carrying the data)
    python scripts/gpu_evidence.py --device cpu --quick     # the dry run the tests run: every stage, ResNet18

torchvision's ResNet18 (10 classes) on all of the CIFAR-10 JPEG copy, three arms per grid cell:
the batch-128 baseline; plain averaging of n = 2 class-balanced microbatches of 100 images (m = 10;
tau = 2: every step taken, every distance logged); GAF (tau = 0.97) on the very same microbatches.
The grid: two optimizer regimes (R1 the paper's: lr 0.01, weight decay 1e-2, plateau schedule;
R2 the usual CIFAR recipe under which a baseline memorises noisy labels: lr 0.02 decayed by a
cosine, weight decay 5e-4), noise 0-80%, seeds 0-2, 16,000 iterations. Cells run in the order
that answers first what matters most: 40% in both regimes, then 80% and 0%, then 20% and 60%,
then the next seed. Runs already committed in ``results/gpu-grid/`` are not run again: each call
continues the grid, and the figure and the table are drawn from everything committed so far.
Four steps, each printed as it goes:

 1. preflight  gpu_check's sync-free and fp32-equal checks with the sweep's model and microbatches
               (the same checks the suite runs on a CPU with ResNet18). The sweep captures its
               step as a CUDA graph only where the graph equals eager.
 2. speed      the card's speeds recorded by an earlier call (results/*/provenance.json), or,
               for a card never seen, k = 1, 3, 9 short GAF runs at once (bench_concurrent).
 3. plan       the cells not yet done, in waves of k runs, each predicted by ``Speed.wave_s``;
               after every wave the rate is re-measured from that wave and the rest re-planned.
               A wave starts only if it is predicted to end within the budget.
 4. sweep      the waves; all outputs are rewritten after each, so a call cut short returns
               what it finished. Budget left over (>= FUSED_BENCH_S) measures bench_fused.

Outputs, in --out (at most 8 files, a few MB): runs.csv, curves.csv, evals.csv and provenance.json
as scripts/collect.py writes them, merged with the committed ones (provenance.json's "calls" lists
every call: card, versions, wall time, speeds, plan, preflight); gpu-grid.png / .pdf; table.md;
preflight.md. Runs train in a temporary folder, each ``gaf.train.run`` in its own process
(``--run CONFIG RUN_DIR``): no Hydra anywhere, as a lent GPU has none.
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
import evidence_report  # noqa: E402
import gpu_check  # noqa: E402
from gaf.config import RunConfig  # noqa: E402
from gaf.sources import DataError, cifar10_jpeg_file  # noqa: E402
from gaf.train import run  # noqa: E402

EXPERIMENT = "gpu-grid"
# R1 is RunConfig's optimizer (the paper's); R2 changes only these keys (chosen from what makes a
# batch-128 baseline memorise, never from GAF's results; each call's table checks that it did).
REGIMES = {"R1": {}, "R2": {"lr": 0.02, "weight_decay": 5e-4, "schedule": "cosine"}}
RUN_FIRST = ("R2", "R1")  # at each noise level: R1 at 40% has an answer already (results/gpu-small)
NOISE_ORDER = (0.4, 0.8, 0.0, 0.2, 0.6)  # 40% first: a short call still answers the main question
# An arm: its method (configs/arm/'s baseline, averaging and gaf, spelled out: no Hydra on a lent GPU)
ON_MICROBATCHES = {"name": "gaf", "n_micro": 2, "merge": "mean"}  # averaging and GAF: the same microbatches
ARMS = {"baseline": {"name": "baseline", "batch_size": 128},
        "averaging": {**ON_MICROBATCHES, "tau": 2.0},
        "gaf": {**ON_MICROBATCHES, "tau": 0.97}}
GRACE_S = 30  # runs still going this long after --budget-s are ended (a device call is cut at its timeout)
FUSED_BENCH_S = 90  # budget left after the waves that buys bench_fused's measurement
MAX_CURVE_ROWS = 500  # per run in curves.csv: the whole grid (90 runs) stays under 16 MiB
MAX_FILES, MAX_FILE_BYTES, MAX_BYTES = 8, 16 * 2**20, 60 * 2**20  # what the device call brings back


@dataclass(frozen=True)
class Scale:
    """The grid's sizes: the GPU's, or the dry run's."""

    model: str
    per_class: int  # m: images of every class per microbatch (10 classes: 10 m images)
    train_per_class: int | None  # None: all of them
    test_per_class: int | None
    memorisation_samples: int
    iterations: int
    validations: int  # per run
    seeds: int
    jobs: tuple[int, ...]  # numbers of concurrent runs to measure where no speed is recorded
    measure_its: int  # iterations of a speed measurement
    warm_its: int  # a measurement's first iterations (autotuning, capture), counted as start-up
    budget_s: float  # --budget-s by default


GPU = Scale("resnet18", 10, None, None, 5000, iterations=16_000, validations=20, seeds=3, jobs=(1, 3, 9),
            measure_its=300, warm_its=100, budget_s=480)
QUICK = Scale("resnet18", 1, 20, 10, 100, iterations=8, validations=2, seeds=1, jobs=(3,), measure_its=6,
              warm_its=2, budget_s=400)  # one k: waves of 3 on any CPU, however busy


class Run(NamedTuple):
    regime: str
    noise: float
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.regime}-noise{round(100 * self.noise)}-{self.arm}-seed{self.seed}"


def grid(seeds: int) -> list[Run]:
    """Every run of the grid in the order they are made: seed by seed, noise by NOISE_ORDER,
    both regimes of a noise level together (RUN_FIRST), a cell's arms together."""
    return [Run(regime, noise, arm, seed) for seed in range(seeds) for noise in NOISE_ORDER
            for regime in RUN_FIRST for arm in ARMS]


def committed_runs(results: Path, iterations: int) -> set[str]:
    """Names of the runs finished at this length in the committed results."""
    path = results / "runs.csv"
    if not path.is_file():
        return set()
    runs = pd.read_csv(path)
    done = runs[(runs["status"] == "finished") & (runs["train.iterations"] == iterations)]
    return {run_id.rsplit("/", 1)[-1] for run_id in done["run_id"]}


def run_config(a, r: Run, iterations: int, compile: str, validations: int, experiment: str = EXPERIMENT) -> dict:
    """One run's RunConfig as a dict: RunConfig's optimizer (the paper's) with the regime's changes."""
    s, method = a.scale, dict(ARMS[r.arm])
    if method["name"] == "gaf":
        method["per_class"] = s.per_class
    return {"data": {"name": "cifar10_jpeg", "jpeg_path": a.jpeg, "noise": r.noise,
                     "train_per_class": s.train_per_class, "test_per_class": s.test_per_class},
            "model": {"name": s.model}, "method": method, "optim": REGIMES[r.regime],
            "train": {"iterations": iterations, "val_every": iterations // validations, "fast": True,
                      "compile": compile, "memorisation_samples": s.memorisation_samples, "progress": False},
            "device": a.device, "seed": r.seed, "experiment": experiment, "scale": "custom"}


def images_per_iteration(arm: str, scale: Scale) -> int:
    method = ARMS[arm]
    return method["batch_size"] if method["name"] == "baseline" else 10 * scale.per_class * method["n_micro"]


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


def train_one(config_path: str, run_dir: str) -> None:
    """One run in this process (what ``launch`` starts): gaf.train.run on the config file."""
    run(RunConfig.from_dict(json.loads(Path(config_path).read_text())), run_dir)


# ----------------------------------------------------------------------------- 1. preflight


def preflight(a, out: Path) -> tuple[dict, str]:
    """gpu_check's sync-free and fp32-equal checks with the sweep's model, classes, microbatch size
    and merge; writes out/preflight.md. Returns the results and the sweep's train.compile, or exits."""
    quick = ["--quick"] if a.quick else []
    args = gpu_check.parse_args(["--device", a.device, *quick, "--jpeg", str(a.data), "--out-dir", str(out)])
    ctx = gpu_check.context(args)  # decodes the JPEG copy once, into the cache every run then reads
    ctx.model, ctx.classes, ctx.m, ctx.merge = a.scale.model, 10, a.scale.per_class, ON_MICROBATCHES["merge"]
    ctx.sync_steps = 200 if a.device == "cuda" else 5
    results = gpu_check.run_checks(ctx, ["sync-free", "fp32-equal"])
    env = gpu_check.environment(ctx) | {"command": command_line()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "preflight.md").write_text(gpu_check.markdown(env, results, []))
    del ctx
    if a.device == "cuda":
        torch.cuda.empty_cache()
    failed = [(n, r) for n, r in results.items() if r["status"] != "PASS"]
    if failed:
        print(f"FAIL preflight {failed[0][0]}: {failed[0][1]['detail']}; the sweep did not run "
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


def recorded_speeds(card: str, results: Path = ROOT / "results") -> list[Speed]:
    """The speeds of the newest call an earlier call recorded for this card (its provenance.json),
    [] if none."""
    calls = []
    for path in sorted(results.glob("*/provenance.json")):
        p = json.loads(path.read_text())
        calls += [c for c in p.get("calls", [p.get("gpu-small")]) if c and c.get("card") == card and c.get("speeds")]
    return call_speeds(max(calls, key=lambda c: c["date"])) if calls else []


def call_speeds(call: dict) -> list[Speed]:
    """A recorded call's speeds: the rate its last wave measured, or (calls before the rate was
    recorded) seconds per iteration of GAF runs of 200 images, with one run alone's validation."""
    if "speed_after" in call:
        return [Speed(**call["speed_after"])]
    alone = min(s["eval_s"] for s in call["speeds"])
    return [Speed(s["k"], s["k"] * 200 / s["iter_s"], alone, s["start_s"]) for s in call["speeds"]]


def measure_speeds(a, work: Path, compile: str) -> list[Speed]:
    """k GAF runs at once (the slowest arm: two passes of 100 images where the baseline makes one
    of 128) for each k of the scale until a larger k stops paying (under 1.1 times the images/s
    of the k before). A run's start-up is what its wall time holds beyond its steady state."""
    speeds, its, per_iter = [], a.scale.measure_its, images_per_iteration("gaf", a.scale)
    for k in a.scale.jobs:
        runs = [Run("R1", 0.4, "gaf", seed) for seed in range(k)]
        configs = [run_config(a, r, its, compile, validations=1, experiment=f"{EXPERIMENT}-speed") for r in runs]
        dirs = [work / "speed" / f"k{k}" / r.name for r in runs]
        got = launch(a, configs, dirs)
        iter_s = max(steady_iter_s(s, d / "metrics.csv", a.scale.warm_its) for s, d in zip(got["summaries"], dirs))
        eval_s = max(s["wall_time_s"] - s["train_time_s"] for s in got["summaries"])
        start_s = max(0.0, got["wall_s"] - its * iter_s - eval_s)
        speeds.append(Speed(k, k * per_iter / iter_s, speeds[0].eval_s if speeds else eval_s, start_s))
        print(f"speed: {k} at once: {speeds[-1].rate:,.0f} images/s summed, {eval_s:.2f} s per validation, "
              f"{start_s:.1f} s start-up ({got['wall_s']:.1f} s)", flush=True)
        if len(speeds) > 1 and speeds[-1].rate < 1.1 * speeds[-2].rate:
            break
    return speeds


def steady_iter_s(summary: dict, metrics_csv: Path, warm: int) -> float:
    """A run's seconds per iteration after its first ``warm`` iterations (its loop's end is
    train_time_s, up to the last flush)."""
    m = pd.read_csv(metrics_csv)
    after_warm = m.loc[m["iter"] == warm + 1, "time_s"]
    if after_warm.empty or summary["iterations"] <= warm + 1:  # a run that ended early: its whole loop
        return summary["train_time_s"] / max(1, summary["iterations"])
    return (summary["train_time_s"] - float(after_warm.iloc[0])) / (summary["iterations"] - warm - 1)


# ----------------------------------------------------------------------------- 3. plan


@dataclass(frozen=True)
class Plan:
    """The waves still to run, the speed that predicts them, and what each is predicted to take."""

    waves: list[list[Run]]
    speed: Speed
    iterations: int
    validations: int
    scale: Scale

    @classmethod
    def make(cls, runs: list[Run], speeds: list[Speed], scale: Scale) -> "Plan":
        """Waves of k runs in grid order, k the measured concurrency with the highest rate."""
        speed = max(speeds, key=lambda s: s.rate)
        waves = [runs[i : i + speed.k] for i in range(0, len(runs), speed.k)]
        return cls(waves, speed, scale.iterations, scale.validations, scale)

    def images(self, wave: list[Run]) -> int:
        return self.iterations * sum(images_per_iteration(r.arm, self.scale) for r in wave)

    def wave_s(self, wave: list[Run]) -> float:
        return self.speed.wave_s(self.images(wave), self.validations)

    def fitting(self, left_s: float) -> int:
        """How many of the waves, in order, are predicted to end within ``left_s``."""
        total, count = 0.0, 0
        for wave in self.waves:
            total += self.wave_s(wave)
            if total > left_s:
                break
            count += 1
        return count

    def after(self, wave: list[Run], wall_s: float) -> "Plan":
        """The rest, predicted with the rate this wave measured."""
        speed = self.speed.remeasured(self.images(wave), self.validations, wall_s)
        return Plan(self.waves[1:], speed, self.iterations, self.validations, self.scale)

    def describe(self, left_s: float) -> str:
        n = self.fitting(left_s)
        predicted = sum(self.wave_s(w) for w in self.waves[:n])
        return (f"plan: {sum(map(len, self.waves))} runs to go in {len(self.waves)} waves of {self.speed.k}; "
                f"{n} predicted to fit ({predicted:.0f} s of the {left_s:.0f} s left, "
                f"{self.speed.rate:,.0f} images/s), {self.iterations:,} iterations each")


# ----------------------------------------------------------------------------- 4. sweep and outputs


def sweep(a, plan: Plan, compile: str, work: Path, record: dict) -> None:
    """Wave after wave while the next is predicted to end within the budget; the outputs are
    rewritten after each. The first wave runs whatever its prediction (the call's minimum answer)."""
    waves = record["waves"] = []
    while plan.waves:
        wave, left = plan.waves[0], a.t0 + a.budget_s - time.perf_counter()
        predicted = plan.wave_s(wave)
        if waves and predicted > left:
            print(f"stop: the next wave is predicted to take {predicted:.0f} s, {left:.0f} s are left; "
                  f"{len(plan.waves)} waves not made", flush=True)
            break
        if len(waves) == a.waves:
            print(f"stop: --waves {a.waves} made; {len(plan.waves)} waves not made", flush=True)
            break
        configs = [run_config(a, r, plan.iterations, compile, plan.validations) for r in wave]
        started = time.perf_counter()
        try:
            got = launch(a, configs, [work / "sweep" / r.name for r in wave])
            wall = got["wall_s"]
            record["images_seen"] += got["images"]
        except SystemExit as e:  # a failed or cut run must not cost the outputs of the others
            wall = time.perf_counter() - started
            print(f"FAIL wave {', '.join(r.name for r in wave)}: {e}", flush=True)
        waves.append({"runs": [r.name for r in wave], "predicted_s": round(predicted, 1), "wall_s": round(wall, 1)})
        print(f"wave {len(waves)} ({', '.join(r.name for r in wave)}): {wall:.0f} s, predicted {predicted:.0f} s",
              flush=True)
        plan = plan.after(wave, wall)
        record["speed_after"] = asdict(plan.speed)
        record["wall_s"] = round(time.perf_counter() - a.t0, 1)
        write_outputs(a.out, work, record)


def write_outputs(out: Path, work: Path, record: dict) -> None:
    """collect.py's files for this call's runs merged with the committed ones, the figure and the
    table; a failure is printed, not raised (the next wave may still be written)."""
    try:
        staging = work / "collected"
        with contextlib.redirect_stdout(io.StringIO()):  # its per-call line names the staging folder
            collect.collect([work / "sweep"], staging, MAX_CURVE_ROWS, command=record["command"], ad_hoc=True)
        if (staging / EXPERIMENT).is_dir():
            merge_into(out, staging / EXPERIMENT, record)
            evidence_report.draw(out, EXPERIMENT, REGIMES)
    except Exception:
        traceback.print_exc()
        print("FAIL the outputs were not all written", flush=True)


def merge_into(out: Path, new: Path | None, record: dict) -> None:
    """The committed results (``a.committed``, copied to out first) with this call's runs added:
    a run of the same name replaces the committed one; provenance.json lists every call (``new``
    None: only this call's record is updated)."""
    out.mkdir(parents=True, exist_ok=True)
    old = json.loads((out / "provenance.json").read_text()) if (out / "provenance.json").is_file() else {}
    calls = [c for c in old.get("calls", []) if c.get("date") != record["date"]] + [record]
    if new is None:  # this call's record only (what it did after its last wave)
        (out / "provenance.json").write_text(json.dumps({**old, "calls": calls}, indent=2, default=str) + "\n")
        return
    for name in ("runs.csv", "curves.csv", "evals.csv"):
        frames = [pd.read_csv(new / name)]
        if (out / name).is_file():
            committed = pd.read_csv(out / name)
            replaced = set(frames[0]["run_id"])
            frames.insert(0, committed[~committed["run_id"].isin(replaced)])
        pd.concat(frames, ignore_index=True).to_csv(out / name, index=False)
    provenance = json.loads((new / "provenance.json").read_text())
    runs = pd.read_csv(out / "runs.csv")
    provenance.update(n_runs=len(runs), n_finished=int((runs["status"] == "finished").sum()), calls=calls,
                      run_roots=["TMP/sweep"])  # each call's temporary folder
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")


def bench_fused(a, left_s: float) -> list[str]:
    """What the budget left after the waves buys: scripts/bench_fused.py's GAF rows (K runs as
    processes, in turn, fused; the fused trainer's case), its table's lines, or why there are none."""
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


def check_sizes(out: Path) -> None:
    files = sorted(f for f in out.rglob("*") if f.is_file())
    size = sum(f.stat().st_size for f in files)
    ok = len(files) <= MAX_FILES and size <= MAX_BYTES and all(f.stat().st_size <= MAX_FILE_BYTES for f in files)
    print(f"{'wrote' if ok else 'WARNING: too much to bring back:'} {len(files)} files, {size / 2**20:.1f} MiB, "
          f"in {out} (at most {MAX_FILES} files, 16 MiB each, {MAX_BYTES // 2**20} MiB in all)", flush=True)


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
    p.add_argument("--budget-s", type=float, default=None, help="wall seconds from start to the last wave's end "
                   f"(default {GPU.budget_s:.0f}; {QUICK.budget_s:.0f} with --quick)")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds of the grid (default {GPU.seeds}; "
                   f"{QUICK.seeds} with --quick)")
    p.add_argument("--jpeg", default=None, help="the CIFAR-10 JPEG copy (default: data/, then the offline copy)")
    p.add_argument("--out", default=None, help="where the outputs go (default results/gpu-grid on CUDA, "
                   "outputs/gpu-evidence for --quick)")
    p.add_argument("--waves", type=int, default=None, help="at most this many waves in this call (default: as many "
                   "as the budget allows)")
    p.add_argument("--committed", default=None, help="the results the grid continues (default results/gpu-grid; "
                   "none with --quick)")
    p.add_argument("--run", nargs=2, metavar=("CONFIG", "RUN_DIR"), help=argparse.SUPPRESS)  # one sweep run
    a = p.parse_args(argv)
    if a.run:
        return a
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; --device cpu --quick is the dry run")
    if a.device == "cpu" and not a.quick:
        p.error("the grid needs a GPU; on a CPU only the dry run: --device cpu --quick")
    a.scale = QUICK if a.quick else GPU
    a.seeds = a.scale.seeds if a.seeds is None else a.seeds
    if a.seeds < 1:
        p.error(f"--seeds must be >= 1, got {a.seeds}")
    if a.waves is not None and a.waves < 1:
        p.error(f"--waves must be >= 1, got {a.waves}")
    a.budget_s = a.scale.budget_s if a.budget_s is None else a.budget_s
    a.out = Path(a.out or ROOT / ("outputs/gpu-evidence" if a.quick else f"results/{EXPERIMENT}"))
    a.committed = Path(a.committed) if a.committed else (None if a.quick else ROOT / "results" / EXPERIMENT)
    try:
        a.data, a.data_source = cifar10_jpeg_file(None, a.jpeg)
    except DataError as e:
        p.error(str(e))
    return a


def main(argv=None) -> dict | None:
    a = parse_args(argv)
    if a.run:
        return train_one(*a.run)
    a.t0 = t0 = time.perf_counter()
    a.deadline = t0 + a.budget_s + GRACE_S
    card = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"gpu_evidence on {card}, torch {torch.__version__}; {a.data_source}; budget {a.budget_s:.0f} s; "
          f"out {a.out}", flush=True)
    record = {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": command_line(),
              "budget_s": a.budget_s, "images_seen": 0}
    if a.committed is not None and a.committed.resolve() != a.out.resolve() and a.committed.is_dir():
        shutil.copytree(a.committed, a.out, dirs_exist_ok=True)  # the outputs continue the committed grid
    done = committed_runs(a.out, a.scale.iterations)
    todo = [r for r in grid(a.seeds) if r.name not in done]
    print(f"grid: {len(todo)} of {len(grid(a.seeds))} runs to go ({len(done)} committed)", flush=True)
    if not todo:
        return record
    with tempfile.TemporaryDirectory(prefix="gpu-evidence-") as tmp:
        work = Path(tmp)
        results, compile = preflight(a, a.out)
        record["preflight"] = {n: {k: r[k] for k in ("status", "seconds", "detail", "figures")}
                               for n, r in results.items()}
        record["compile"] = compile
        speeds = recorded_speeds(card) if a.device == "cuda" else []
        record["speeds_from"] = "recorded" if speeds else "measured"
        speeds = speeds or measure_speeds(a, work, compile)
        record["speeds"] = [asdict(s) for s in speeds]
        plan = Plan.make(todo, speeds, a.scale)
        left = a.budget_s - (time.perf_counter() - t0)
        print(plan.describe(left), flush=True)
        record["plan"] = {"waves": len(plan.waves), "k": plan.speed.k, "iterations": plan.iterations,
                          "fitting": plan.fitting(left), "left_s": round(left, 1)}
        sweep(a, plan, compile, work, record)
    if a.budget_s - (time.perf_counter() - t0) >= FUSED_BENCH_S:
        record["fused_bench"] = bench_fused(a, a.budget_s - (time.perf_counter() - t0))
        merge_into(a.out, None, record)
    print(f"done in {time.perf_counter() - t0:.0f} s (budget {a.budget_s:.0f} s)", flush=True)
    check_sizes(a.out)
    return record


if __name__ == "__main__":
    main()
