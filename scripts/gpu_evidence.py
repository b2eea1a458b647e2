"""The paper's regime on a lent GPU, in one call: the evidence, with the control that decides it.

    python scripts/gpu_evidence.py                          # CUDA: at most --budget-s (480 s) of wall time
    python scripts/gpu_evidence.py --out $OUT/gpu-small     # the device call (README: carrying the data)
    python scripts/gpu_evidence.py --device cpu --quick     # the dry run the tests run: a tiny model, a minute
    python scripts/gpu_evidence.py --robust                 # with experiment=robust's arms (shorter runs)

torchvision's ResNet18 (10 classes) on all of the CIFAR-10 JPEG copy (5,000 / 1,000 images per
class) with the paper's optimizer, at 0%, 40% and 80% symmetric label noise, three arms per noise
level and seed: the batch-128 baseline; plain averaging of n = 2 class-balanced microbatches of
100 images (m = 10; tau = 2, mean merge: every step taken, every distance logged); and GAF
(tau = 0.97) on the very same microbatches (the same seed draws the same microbatch sequence).
--robust adds what a practitioner would use instead, on the baseline's batches: label smoothing
0.1, GCE, SCE and co-teaching (readable path), and GAF + GCE: eight arms in the same budget.
Four steps, each printed as it goes:

 1. preflight  gpu_check's sync-free check (a few hundred steady-state steps of the fast step,
               eager and graphed, under set_sync_debug_mode("error")) and fp32-equal check
               (graphed == eager == gaf_step), in the sweep's setting. The sweep captures its
               step as a CUDA graph only where the graph equals eager; a step that synchronises,
               or an eager fast step that disagrees with gaf_step, stops here with a FAIL line.
 2. speed      bench_concurrent.launch starts k = 1, 3, 9 short GAF runs at once (stopping once
               a larger k stops paying) and measures what a run costs, per iteration, per
               validation and to start, while k share the device. Where the trainer's graphed
               runs fail, it measures (and the sweep runs) the eager fast step instead.
 3. plan       make_plan / run_length: the longest run length (at most 16,000 iterations) for
               which the runs, k at a time, end within what is left of --budget-s (counted from
               the script's start); both seeds only if they reach the cap, else seed 0, else the
               40% arms alone. Printed, with the time it predicts.
 4. sweep      the waves of k runs, the 40% arms first; all outputs are rewritten as each
               noise level's arms complete, so a call cut short returns what it finished.

Outputs, in --out (at most 8 files, no checkpoints; a few MB): runs.csv, curves.csv, evals.csv,
provenance.json as scripts/collect.py writes them (provenance.json also holds, under
"gpu-small", the card, versions, wall time, images/s, the speeds, the plan and the preflight);
gpu-small.png / .pdf; table.md; preflight.md (gpu_check's report). Runs train in a temporary
folder, each ``gaf.train.run`` in its own process (``--run CONFIG RUN_DIR``): no Hydra anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # a checkout without installing; the scripts beside this

import bench_concurrent  # noqa: E402
import collect  # noqa: E402
import gpu_check  # noqa: E402
import plot  # noqa: E402
import results_data  # noqa: E402
import tables  # noqa: E402
from gaf.config import RunConfig  # noqa: E402
from gaf.sources import DataError, cifar10_jpeg_file  # noqa: E402
from gaf.train import run  # noqa: E402

EXPERIMENT = "gpu-small"
NOISES = (0.4, 0.0, 0.8)  # the 40% arms first: a short budget still answers the main question
# An arm: its method and training loss (cross-entropy unless given), and the train keys it needs;
# named as configs/arm/ names them (spelled out here: the lent GPU has no Hydra to compose them).
BASELINE = {"name": "baseline", "batch_size": 128}
ON_MICROBATCHES = {"name": "gaf", "n_micro": 2, "merge": "mean"}  # averaging and GAF: the same microbatches
ARMS = {"baseline": {"method": BASELINE},
        "averaging": {"method": {**ON_MICROBATCHES, "tau": 2.0}},
        "gaf": {"method": {**ON_MICROBATCHES, "tau": 0.97}}}
ROBUST_ARMS = {  # --robust: what a practitioner would use instead (experiment=robust's arms)
    "label_smoothing": {"method": BASELINE, "loss": {"name": "label_smoothing"}},
    "gce": {"method": BASELINE, "loss": {"name": "gce"}},
    "sce": {"method": BASELINE, "loss": {"name": "sce"}},
    "coteaching": {"method": {**BASELINE, "name": "coteaching"}, "train": {"fast": False}},  # the readable path
    "gaf_gce": {"method": {**ON_MICROBATCHES, "tau": 0.97}, "loss": {"name": "gce"}},
}
# results_data.arm's name of each arm's runs (how the runs' rows are told apart), and its label here
NAMED = {"baseline": "baseline (CE)", "averaging": "averaging (tau 2)", "gaf": "GAF", "label_smoothing": "label smoothing",
         "gce": "GCE", "sce": "SCE", "coteaching": "co-teaching", "gaf_gce": "GAF + GCE"}
LABEL = {"baseline": "baseline (batch 128)", "averaging": "averaging (tau 2)", "gaf": "GAF (tau 0.97)",
         "label_smoothing": "label smoothing 0.1", "gce": "GCE (q 0.7)", "sce": "SCE", "coteaching": "co-teaching",
         "gaf_gce": "GAF + GCE"}
COLOR = {"baseline": plot.COLOR["baseline"], "averaging": "#2ca02c", "gaf": plot.COLOR["gaf"],
         "label_smoothing": "#ff7f0e", "gce": "#9467bd", "sce": "#8c564b", "coteaching": "#e377c2",
         "gaf_gce": "#17becf"}
SAFETY = 0.9  # the plan fills this share of the time left: the speed model is a straight line
GRACE_S = 60  # runs still going this long after --budget-s are ended (a device call is cut at 600 s)
MAX_CURVE_ROWS = 1000  # per run in curves.csv: 18 runs stay a few MB
MAX_FILES, MAX_FILE_BYTES, MAX_BYTES = 8, 16 * 2**20, 60 * 2**20  # what the device call brings back


@dataclass(frozen=True)
class Scale:
    """The sweep's sizes: the GPU's, or the dry run's."""

    model: str
    per_class: int  # m: images of every class per microbatch (10 classes: 10 m images)
    train_per_class: int | None  # None: all of them
    test_per_class: int | None
    memorisation_samples: int
    cap: int  # the longest run, in iterations
    floor: int  # the shortest run worth making
    validations: int  # per run; lengths are multiples of it
    jobs: tuple[int, ...]  # numbers of concurrent runs to measure
    measure_its: int  # iterations of the first speed measurement (one run alone)
    warm_its: int  # a measurement's first iterations (autotuning, capture), counted as start-up
    measure_s: float  # the later ones: about this many seconds of one run alone
    sync_steps: int  # preflight steps under set_sync_debug_mode("error")
    budget_s: float  # --budget-s by default


GPU = Scale("resnet18", 10, None, None, 5000, cap=16_000, floor=1000, validations=20, jobs=(1, 3, 9),
            measure_its=300, warm_its=100, measure_s=3.0, sync_steps=200, budget_s=480)
QUICK = Scale("tiny", 2, 20, 10, 100, cap=24, floor=8, validations=4, jobs=(1, 3), measure_its=24, warm_its=4,
              measure_s=0.2, sync_steps=5, budget_s=150)


class Run(NamedTuple):
    noise: float
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return f"noise{round(100 * self.noise)}-{self.arm}-seed{self.seed}"


def sweep_runs(seeds: int, arms=ARMS) -> list[Run]:
    """Every run in the order they are made: seed by seed, the 40% arms first."""
    return [Run(noise, arm, seed) for seed in range(seeds) for noise in NOISES for arm in arms]


def run_config(a, r: Run, iterations: int, compile: str, validations: int, experiment: str = EXPERIMENT) -> dict:
    """One run's RunConfig as a dict; the optimizer is RunConfig's default, the paper's (SGD, lr 0.01,
    Nesterov momentum 0.9, weight decay 1e-2, ReduceLROnPlateau 0.1 / 100 validations)."""
    s, arm = a.scale, a.arms[r.arm]
    method = dict(arm["method"], **({"per_class": s.per_class} if arm["method"]["name"] == "gaf" else {}))
    fast = arm.get("train", {}).get("fast", True)
    return {"data": {"name": "cifar10_jpeg", "jpeg_path": a.jpeg, "noise": r.noise,
                     "train_per_class": s.train_per_class, "test_per_class": s.test_per_class},
            "model": {"name": s.model}, "method": method, "loss": arm.get("loss", {"name": "ce"}),
            "train": {"iterations": iterations, "val_every": iterations // validations, "fast": fast,
                      "compile": compile if fast else "none",
                      "memorisation_samples": s.memorisation_samples, "progress": False},
            "device": a.device, "seed": r.seed, "experiment": experiment, "scale": "custom"}


def launch(a, configs: list[dict], run_dirs: list[Path]) -> dict:
    """Train these runs at once, each in its own process on one CPU thread (bench_concurrent.launch:
    their summaries and the wall time until the last ends), ending those still going at the
    deadline. On a GPU a run's CPU work is its sampler; on a CPU one thread each gives the same
    numbers on any machine, as reproduce.py."""
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
    """gpu_check's sync-free and fp32-equal checks with the sweep's model, classes and microbatch
    size; writes out/preflight.md. Returns the results and the sweep's train.compile, or exits."""
    quick = ["--quick"] if a.quick else []
    args = gpu_check.parse_args(["--device", a.device, *quick, "--jpeg", str(a.data), "--out-dir", str(out)])
    ctx = gpu_check.context(args)  # decodes the JPEG copy once, into the cache every run then reads
    ctx.model, ctx.classes, ctx.m, ctx.sync_steps = a.scale.model, 10, a.scale.per_class, a.scale.sync_steps
    results = gpu_check.run_checks(ctx, ["sync-free", "fp32-equal"])
    env = gpu_check.environment(ctx) | {"command": command_line()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "preflight.md").write_text(gpu_check.markdown(env, results, []))
    del ctx
    if a.device == "cuda":
        torch.cuda.empty_cache()
    compile = sweep_compile(results, a.device)
    if compile is None:
        failed = next((n, r) for n, r in results.items() if r["status"] != "PASS")
        print(f"FAIL preflight {failed[0]}: {failed[1]['detail']}; the sweep did not run "
              f"(report: {out / 'preflight.md'})", flush=True)
        sys.exit(1)
    return results, compile


def sweep_compile(results: dict, device: str) -> str | None:
    """train.compile for the sweep: "graph" where the graphed step equals eager (fp32-equal passed;
    a CPU has no graphs: "none"), "none" where only the eager fast step agrees with gaf_step,
    None (stop) where that fails too or where a steady-state step synchronised."""
    if results["sync-free"]["status"] != "PASS":
        return None
    if results["fp32-equal"]["status"] == "PASS":
        return "graph" if device == "cuda" else "none"
    f = results["fp32-equal"]["figures"]
    eager_ok = max(f.get("fast_vs_gaf_step_state", math.inf), f.get("fast_vs_gaf_step_momentum", math.inf)) <= 1e-4
    if eager_ok:
        print("preflight: the graphed step differs from eager; the sweep runs the eager fast step", flush=True)
    return "none" if eager_ok else None


# ----------------------------------------------------------------------------- 2. speed


@dataclass(frozen=True)
class Speed:
    """A wave of k runs at once, each of L iterations and V validations, takes
    start_s + L * iter_s + V * eval_s (measured on k GAF runs at once, their slowest figures)."""

    k: int
    iter_s: float  # seconds per iteration of each run while k run at once, in the steady state
    eval_s: float  # seconds of one validation (and its checkpoint), likewise
    start_s: float  # the rest: process start, data, model, the first iterations; and the end

    @classmethod
    def measured(cls, k: int, got: dict, run_dirs: list[Path], warm: int) -> "Speed":
        """From bench_concurrent.launch's result for k runs that validate once, at their end."""
        s = got["summaries"]
        iter_s = max(steady_iter_s(x, d / "metrics.csv", warm) for x, d in zip(s, run_dirs))
        eval_s = max(x["wall_time_s"] - x["train_time_s"] for x in s)
        return cls(k, iter_s, eval_s, start_s=max(0.0, got["wall_s"] - s[0]["iterations"] * iter_s - eval_s))

    def wave_s(self, iterations: int, validations: int) -> float:
        return self.start_s + iterations * self.iter_s + validations * self.eval_s


def steady_iter_s(summary: dict, metrics_csv: Path, warm: int) -> float:
    """A run's seconds per iteration after its first ``warm`` iterations: from the metrics row of
    iteration warm + 1 (on CUDA just after a flush, where the trainer waits for the GPU: warm is a
    multiple of 100) to the loop's end (train_time_s, up to the last flush)."""
    m = pd.read_csv(metrics_csv)
    after_warm = m.loc[m["iter"] == warm + 1, "time_s"]
    if after_warm.empty or summary["iterations"] <= warm + 1:  # a run that ended early: its whole loop
        return summary["train_time_s"] / max(1, summary["iterations"])
    return (summary["train_time_s"] - float(after_warm.iloc[0])) / (summary["iterations"] - warm - 1)


def measure_speeds(a, work: Path, compile: str) -> list[Speed]:
    """k GAF runs at once (the slowest arm on a GPU: two passes of 100 images where the baseline
    makes one of 128) at 40% noise, for each k of the scale until a larger k stops paying (under
    1.1 times the iterations per second of the k before)."""
    speeds, rows, its = [], [], a.scale.measure_its
    for k in a.scale.jobs:
        runs = [Run(0.4, "gaf", seed) for seed in range(k)]
        configs = [run_config(a, r, its, compile, validations=1, experiment=f"{EXPERIMENT}-speed") for r in runs]
        dirs = [work / f"speed-{compile}" / f"k{k}" / r.name for r in runs]
        got = launch(a, configs, dirs)
        speed = Speed.measured(k, got, dirs, a.scale.warm_its)
        print(f"speed: {k} at once, {its} iterations each: {1e3 * speed.iter_s:.2f} ms per iteration of each run, "
              f"{speed.eval_s:.2f} s per validation, {speed.start_s:.1f} s start-up ({got['wall_s']:.1f} s)",
              flush=True)
        speeds.append(speed)
        rows.append({"k": k, **got})
        if len(speeds) > 1 and k / speed.iter_s < 1.1 * speeds[-2].k / speeds[-2].iter_s:
            break
        its = max(its, a.scale.warm_its + round(a.scale.measure_s / speeds[0].iter_s))
    print(bench_concurrent.table(rows, f"GAF, {a.scale.model}, m = {a.scale.per_class}, n = 2, 40% noise, "
                                       f"train.compile={compile}"), flush=True)
    return speeds


def measure_or_fall_back(a, work: Path, compile: str) -> tuple[list[Speed], str]:
    """measure_speeds, and the train.compile it ran: where graphed runs fail (the preflight checks
    the step, not the trainer around it), once more with the eager fast step."""
    try:
        return measure_speeds(a, work, compile), compile
    except SystemExit as e:
        if compile == "none" or time.perf_counter() >= a.deadline:
            raise
        print(f"FAIL the trainer with train.compile={compile}: {e}\nspeed: measuring the eager fast step instead",
              flush=True)
        return measure_speeds(a, work, "none"), "none"


# ----------------------------------------------------------------------------- 3. plan


def run_length(budget_s: float, speed: Speed, runs: int, validations: int, cap: int) -> int:
    """The most iterations per run (a multiple of ``validations``, at most ``cap``) for which
    ``runs`` runs, ``speed.k`` at a time, end within ``budget_s``; 0 when none fits."""
    waves = math.ceil(runs / speed.k)
    per_wave = budget_s / waves - speed.start_s - validations * speed.eval_s
    its = int(max(0.0, per_wave) / speed.iter_s) // validations * validations
    return min(cap, its)


@dataclass(frozen=True)
class Plan:
    runs: list[Run]
    k: int  # runs at once
    iterations: int  # per run
    predicted_s: float
    why: str
    at_cap: bool = False

    def describe(self, left_s: float) -> str:
        return (f"plan: {len(self.runs)} runs ({self.why}), {self.k} at once, {self.iterations:,} iterations each"
                f"{' (the cap)' if self.at_cap else ''}; "
                f"predicted {self.predicted_s:.0f} s of the {left_s:.0f} s left")


def predicted_s(speed: Speed, runs: int, iterations: int, validations: int) -> float:
    return math.ceil(runs / speed.k) * speed.wave_s(iterations, validations)


def longest(budget_s: float, speeds: list[Speed], runs: int, scale: Scale) -> tuple[int, Speed]:
    """The longest run length any measured k allows (on a tie, the k predicted to end first)."""
    def length(s: Speed) -> int:
        return run_length(budget_s, s, runs, scale.validations, scale.cap)

    speed = max(speeds, key=lambda s: (length(s), -predicted_s(s, runs, length(s), scale.validations)))
    return length(speed), speed


def make_plan(budget_s: float, speeds: list[Speed], scale: Scale, seeds: int, arms=ARMS) -> Plan:
    """Every seed if some k runs them all at the cap; else seed 0's runs at the longest length that
    fits, if at least the floor; else the 40% arms alone (at the floor if even that does not fit,
    said as over the budget)."""
    every = sweep_runs(seeds, arms)
    options = ([(every, scale.cap)] if seeds > 1 else []) + [(every[: len(NOISES) * len(arms)], scale.floor),
                                                            (every[: len(arms)], scale.floor)]
    tried = []
    for runs, need in options:
        its, speed = longest(budget_s, speeds, len(runs), scale)
        if its >= need:
            break
        tried.append(f"{len(runs)} runs would get {its:,} iterations, under {need:,}")
    else:
        its = scale.floor
        tried.append("the floor anyway, OVER the budget")
    return Plan(runs, min(speed.k, len(runs)), its, predicted_s(speed, len(runs), its, scale.validations),
                "; ".join(tried) or "all that was asked for fits", at_cap=its == scale.cap)


# ----------------------------------------------------------------------------- 4. sweep and outputs


def sweep(a, plan: Plan, compile: str, work: Path, out: Path, record: dict) -> None:
    """The plan's waves in order until the deadline; every output is rewritten after each wave
    that completes a noise level's arms, and after the last."""
    waves = [plan.runs[i : i + plan.k] for i in range(0, len(plan.runs), plan.k)]
    start = time.perf_counter()
    for w, wave in enumerate(waves, 1):
        configs = [run_config(a, r, plan.iterations, compile, a.scale.validations) for r in wave]
        try:
            got = launch(a, configs, [work / "sweep" / r.name for r in wave])
            record["images_seen"] += got["images"]
            print(f"wave {w}/{len(waves)} ({', '.join(r.name for r in wave)}): {got['wall_s']:.0f} s", flush=True)
        except SystemExit as e:  # a failed run must not cost the others
            print(f"FAIL wave {w}/{len(waves)}: {e}", flush=True)
        now = time.perf_counter()
        record.update(sweep_wall_s=round(now - start, 1), wall_s=round(now - a.t0, 1),
                      images_per_s=round(record["images_seen"] / (now - start)))
        late = now >= a.deadline
        if late or w == len(waves) or w * plan.k % len(a.arms) == 0:
            write_outputs(out, work, record, a.scale)
        if late:
            print(f"FAIL the deadline (--budget-s + {GRACE_S} s) has passed: {len(waves) - w} waves not made",
                  flush=True)
            return


def write_outputs(out: Path, work: Path, record: dict, scale: Scale) -> None:
    """collect.py's four files for the runs so far (provenance.json extended by ``record``), the
    figure and the table; a failure is printed, not raised (the next wave may still be written)."""
    try:
        collect_and_draw(out, work, record, scale)
    except Exception:
        traceback.print_exc()
        print("FAIL the outputs were not all written", flush=True)


def collect_and_draw(out: Path, work: Path, record: dict, scale: Scale) -> None:
    staging = work / "collected"
    with contextlib.redirect_stdout(io.StringIO()):  # its per-call line names the staging folder
        # ad_hoc: the sweep's scale is "custom" (its length is the budget's, no scale's row)
        collected = collect.collect([work / "sweep"], staging, MAX_CURVE_ROWS, command=record["command"],
                                    ad_hoc=True)
    if not collected:
        return
    out.mkdir(parents=True, exist_ok=True)
    for f in (staging / EXPERIMENT).iterdir():
        shutil.copyfile(f, out / f.name)
    provenance = json.loads((out / "provenance.json").read_text())
    (out / "provenance.json").write_text(json.dumps({**provenance, EXPERIMENT: record}, indent=2, default=str) + "\n")
    r = results_data.load(out.parent, out.name)  # finished runs, as every figure
    if r is not None:
        figure(r, out, scale.per_class)
    (out / "table.md").write_text(table_markdown(out, record))


def arm_of(row) -> str:
    """The arm a run's row is (results_data.arm names it)."""
    return {named: arm for arm, named in NAMED.items()}[results_data.arm(row)]


def with_robust_arms(runs: pd.DataFrame) -> bool:
    """Whether --robust's arms are among the runs."""
    return bool(set(runs.apply(arm_of, axis=1)) - set(ARMS))


def ordered(runs: pd.DataFrame) -> pd.DataFrame:
    """By noise, then arm (baseline, averaging, GAF, then --robust's), then seed."""
    arm = runs.apply(lambda row: list(NAMED).index(arm_of(row)), axis=1)
    return runs.assign(_arm=arm).sort_values(["data.noise", "_arm", "seed"]).drop(columns="_arm")


def figure(r, out: Path, m: int) -> list[Path]:
    """Validation accuracy (solid) and flipped labels fitted (dashed) over iterations, the three
    arms, one column per noise level; the averaging arm's micro-gradient distance beneath."""
    noises = sorted(r.runs["data.noise"].unique())
    fig, ax = plot.new_figure(2, len(noises), (3.6 * len(noises) + 0.8, 5.8), sharex="col",
                              gridspec_kw={"height_ratios": [2, 1]})
    first_seed = r.runs["seed"].min()
    for _, row in ordered(r.runs).iterrows():
        j, arm, first = noises.index(row["data.noise"]), arm_of(row), row["seed"] == first_seed
        e, alpha = results_data.evals(r, row["run_id"]), 1.0 if first else 0.45
        ax[0, j].plot(e["iter"], 100 * e["val_acc"], color=COLOR[arm], alpha=alpha, label=LABEL[arm] if first else None)
        if row["data.noise"] > 0:
            ax[0, j].plot(e["iter"], 100 * e["mem_flipped_noisy_acc"], color=COLOR[arm], alpha=alpha, ls="--")
        if arm == "averaging":
            plot.plot_distance(ax[1, j], results_data.curve(r, row["run_id"]), COLOR[arm], None, raw=first)
    for j, noise in enumerate(noises):
        ax[0, j].set_title(f"{noise:.0%} noise")
        ax[0, j].set_ylabel("accuracy (%)" if j == 0 else "%")
        ax[1, j].set_xlabel("iteration")
    robust = with_robust_arms(r.runs)
    plot.legend(ax[0, 0], loc="best", fontsize=6 if robust else None)  # the arms' colours, once
    # the data's source; the noise is in the panel titles
    source = results_data.note_texts(r.runs).str.split(": ").str[0]
    models = results_data.models_of(r.runs)
    others = ", the robust methods" if robust else ""
    plot.titled(fig, f"{models}: the batch-128 baseline{others}, plain averaging and GAF on the same n = 2 "
                     f"microbatches of {10 * m} images. Solid: validation accuracy; dashed: flipped training labels "
                     f"fitted; beneath: averaging's micro-gradient distance",
                SimpleNamespace(**{**vars(r), "runs": r.runs.assign(data_note=source)}))
    footer = fig.texts[-1]  # titled's provenance line names make figures; this script redraws this one
    footer.set_text(re.sub(r"make\s+figures", "python scripts/gpu_evidence.py (on a GPU)", footer.get_text()))
    return plot.save(fig, out / EXPERIMENT)


def table_markdown(out: Path, record: dict) -> str:
    """One row per run that validated, one ended at the deadline too: best, final, fitted, steps
    taken and images seen (from its validations and per-iteration curve), and its distance."""
    runs, evals, curves = (pd.read_csv(out / f"{name}.csv") for name in ("runs", "evals", "curves"))
    rows = []
    for _, row in ordered(runs).iterrows():
        e, c = (f[f["run_id"] == row["run_id"]].sort_values("iter") for f in (evals, curves))
        if not e.empty:
            rows.append(table_row(row, e, c))
    plan = record.get("plan", {})
    return "\n".join([
        f"# {EXPERIMENT}: {results_data.models_of(runs)}, baseline vs averaging vs GAF on the same microbatches"
        f"{' (and the robust methods)' if with_robust_arms(runs) else ''}", "",
        f"{record['card']}, torch {record['torch']}, {record['date']}; `{record['command']}`; "
        f"{plan.get('iterations', 0):,} iterations per run, {plan.get('k')} at once ({plan.get('why')}); "
        f"train.compile={record.get('compile')}; {record['images_per_s']:,} images/s over the sweep, "
        f"{record['wall_s']:.0f} s in all.", "",
        "best = best validation accuracy (at iteration), final = at the last validation, fitted = share of "
        "the flipped training labels (memorisation probe) predicted as their noisy label then, steps taken = "
        "iterations with an optimizer step, distance = mean micro-gradient cosine distance over the second half.",
        "", tables.markdown_table(pd.DataFrame(rows)), ""])


def table_row(row, e: pd.DataFrame, c: pd.DataFrame) -> dict:
    """One run's line, from its validations ``e`` and its per-iteration curve ``c``."""
    arm, its, best = arm_of(row), int(c["iter"].max()), e["val_acc"].idxmax()
    distance = tables._phase_mean(c, "d_mean", its / 2)
    return {"noise": f"{row['data.noise']:.0%}", "seed": int(row["seed"]),
            "arm": LABEL[arm] + ("" if row["status"] == "finished" else f" ({row['status']})"),
            "iterations": f"{its:,}", "best (%)": 100 * e.loc[best, "val_acc"],
            "at iteration": int(e.loc[best, "iter"]), "final (%)": 100 * e["val_acc"].iloc[-1],
            "fitted (%)": 100 * e["mem_flipped_noisy_acc"].iloc[-1] if row["data.noise"] > 0 else math.nan,
            "steps taken (%)": 100 * (c["stepped_win"] * c["stride"]).sum() / its,
            "images seen": f"{int(c['images_seen'].max()):,}",
            "distance, 2nd half": "—" if math.isnan(distance) else f"{distance:.3f}"}  # batch arms measure none


def check_sizes(out: Path) -> None:
    files = sorted(f for f in out.rglob("*") if f.is_file())
    size = sum(f.stat().st_size for f in files)
    ok = len(files) <= MAX_FILES and size <= MAX_BYTES and all(f.stat().st_size <= MAX_FILE_BYTES for f in files)
    print(f"{'wrote' if ok else 'WARNING: too much to bring back:'} {len(files)} files, {size / 2**20:.1f} MiB, "
          f"in {out} (at most {MAX_FILES} files, 16 MiB each, {MAX_BYTES // 2**20} MiB in all)", flush=True)


# ----------------------------------------------------------------------------- main


def command_line() -> str:
    return " ".join(["python", "scripts/gpu_evidence.py", *sys.argv[1:]])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="the dry run: tiny model, a few iterations, a few images")
    p.add_argument("--budget-s", type=float, default=None, help="wall seconds from start to the last run's end "
                   f"(default {GPU.budget_s:.0f}; {QUICK.budget_s:.0f} with --quick)")
    p.add_argument("--seeds", type=int, default=2, help="seeds to run where time allows (seed 0 first)")
    p.add_argument("--robust", action="store_true", help="add experiment=robust's arms: label smoothing, GCE, "
                   "SCE, co-teaching (readable path) and GAF + GCE, at the same length")
    p.add_argument("--jpeg", default=None, help="the CIFAR-10 JPEG copy (default: data/, then the offline copy)")
    p.add_argument("--out", default=None, help="where the outputs go (default results/gpu-small on CUDA, "
                   "outputs/gpu-evidence for --quick)")
    p.add_argument("--run", nargs=2, metavar=("CONFIG", "RUN_DIR"), help=argparse.SUPPRESS)  # one sweep run
    a = p.parse_args(argv)
    if a.run:
        return a
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; --device cpu --quick is the dry run")
    if a.device == "cpu" and not a.quick:
        p.error("the sweep needs a GPU; on a CPU only the dry run: --device cpu --quick")
    if a.seeds < 1:
        p.error(f"--seeds must be >= 1, got {a.seeds}")
    a.scale = QUICK if a.quick else GPU
    a.arms = {**ARMS, **ROBUST_ARMS} if a.robust else ARMS
    a.budget_s = a.scale.budget_s if a.budget_s is None else a.budget_s
    a.out = Path(a.out or ROOT / ("outputs/gpu-evidence" if a.quick else f"results/{EXPERIMENT}"))
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
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": command_line(),
              "budget_s": a.budget_s, "images_seen": 0}
    with tempfile.TemporaryDirectory(prefix="gpu-evidence-") as tmp:
        work = Path(tmp)
        results, compile = preflight(a, a.out)
        record["preflight"] = {n: {k: r[k] for k in ("status", "seconds", "detail")} for n, r in results.items()}
        record["preflight_s"] = round(time.perf_counter() - t0, 1)
        print(f"preflight: PASS in {record['preflight_s']:.0f} s (target <= 90 s); train.compile={compile}", flush=True)
        speeds, compile = measure_or_fall_back(a, work, compile)
        record["compile"] = compile
        left = a.budget_s - (time.perf_counter() - t0)
        plan = make_plan(SAFETY * left, speeds, a.scale, a.seeds, a.arms)
        print(plan.describe(left), flush=True)
        record["speeds"] = [asdict(s) for s in speeds]
        record["plan"] = {"runs": [r.name for r in plan.runs], "k": plan.k, "iterations": plan.iterations,
                          "predicted_s": round(plan.predicted_s, 1), "why": plan.why, "left_s": round(left, 1)}
        sweep(a, plan, compile, work, a.out, record)
    print(f"done in {time.perf_counter() - t0:.0f} s (budget {a.budget_s:.0f} s)", flush=True)
    check_sizes(a.out)
    return record


if __name__ == "__main__":
    main()
