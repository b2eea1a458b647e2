"""experiment=gpu_small on a lent GPU: a time-boxed call that continues the grid where the last one stopped.

    python scripts/gpu_evidence.py                          # CUDA: at most --budget-s (480 s) of wall time
    python scripts/gpu_evidence.py --results $OUT           # the device call (README: carrying the data)
    python scripts/gpu_evidence.py --device cpu --quick     # the dry run the tests run: every stage, ResNet18

It trains the preset's points (configs/experiment/gpu_small.yaml at scale=gpu) as reproduce.py exports
them to configs/experiment/gpu_small.points.json (a lent GPU has no Hydra), as fused groups
(gaf.fused_train), and holds only what is about one call with a time budget:

 1. preflight  gpu_check's sync-free, fp32-equal and fused-equal checks with the grid's network, classes,
               m and merge (the suite runs them on a CPU with ResNet18; fused-equal only where runs are
               fused); a failed fused-equal sends the runs one per process.
 2. plan       a wave is the longest run of the points still to go, in the preset's order, predicted to
               end within the time left (the first wave: within half of it), one process per fused group,
               all at once; the first rate is timed on the device, and each wave rescales the prediction.
 3. sweep      wave after wave; the outputs rewritten after each, so a call cut short returns what it
               finished. Budget left over (>= FUSED_BENCH_S) measures bench_fused.

Outputs, in --results/gpu_small/: runs.csv, curves.csv, evals.csv and provenance.json as gaf.report.collect
writes them (this call's runs added to those it continues from; "calls" records every call) and
preflight.md: five files, within what a device call brings back. The 480-s budget and the file count
are a lent GPU's defaults, not the design: --budget-s 36000 on a GPU of one's own runs the whole grid.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # gaf, from a checkout without installing (a lent GPU); bench_*, gpu_check: beside this

import bench_concurrent  # noqa: E402
import bench_fused  # noqa: E402
import gpu_check  # noqa: E402
from gaf.config import CLASSES, RunConfig  # noqa: E402
from gaf.fused_train import groups, run_group  # noqa: E402
from gaf.report import collect  # noqa: E402  (neither Hydra nor matplotlib)
from gaf.sources import DataError, cifar10_jpeg_file  # noqa: E402
from gaf.train import run  # noqa: E402

EXPERIMENT = "gpu_small"
POINTS = ROOT / "configs" / "experiment" / f"{EXPERIMENT}.points.json"
DATA_FILES = ("runs.csv", "curves.csv", "evals.csv", "provenance.json")  # what a call continues from
GRACE_S = 30  # runs still going this long after --budget-s are ended (a device call is cut at its timeout)
FUSED_BENCH_S = 90  # budget left after the waves that buys bench_fused's measurement
MAX_CURVE_ROWS = 500  # per run in curves.csv: the whole grid (90 runs) stays under 16 MiB
EVAL_S, START_S = 1.0, 30.0  # a run's validation, and a wave's start and end, on a card never recorded


@dataclass(frozen=True)
class Call:
    """How a call spends its time, apart from what it trains."""

    budget_s: float  # --budget-s by default
    max_fused: int  # runs in one fused group at most
    sync_steps: int  # steps of the preflight's sync-free check
    timed_steps: int  # steps of each group timed for the first wave's rate
    seeds: int  # the grid's seeds run by default


GPU = Call(budget_s=480, max_fused=32, sync_steps=200, timed_steps=20, seeds=3)
QUICK = Call(budget_s=400, max_fused=3, sync_steps=5, timed_steps=2, seeds=1)
# The dry run: the grid's points, ResNet18 still, on a few images for a few iterations.
QUICK_SIZES = {"data": {"train_per_class": 20, "test_per_class": 10}, "method": {"per_class": 1},
               "train": {"iterations": 8, "val_every": 4, "memorisation_samples": 100}}


class Point(NamedTuple):
    """One run of the grid: its folder's name (Hydra's, for the same point) and its settings."""

    folder: str
    config: dict

    @property
    def shape(self) -> tuple[str, int, int]:
        """(kind, n, b) of its step: GAF's n microbatches of per_class images of every class, or one batch."""
        m = self.config["method"]
        if m["name"] == "gaf":
            return "gaf", m["n_micro"], m["per_class"] * CLASSES[self.config["data"]["name"]]
        return "baseline", 1, m["batch_size"]

    @property
    def images(self) -> int:
        """Training images over the whole run."""
        return self.config["train"]["iterations"] * self.shape[1] * self.shape[2]

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


def jobs(points: list[Point], max_fused: int) -> list[list[Point]]:
    """These points as the processes that train them: fused groups of at most ``max_fused``."""
    return [[points[i] for i in g] for g in groups([RunConfig.from_dict(p.config) for p in points], max_fused)]


# ----------------------------------------------------------------------------- 1. preflight


def preflight(a, out: Path, points: list[Point]) -> dict:
    """gpu_check's sync-free, fp32-equal and (where runs are fused) fused-equal checks with the grid's
    network, classes, m and merge, reported in out/preflight.md; exits where the fast step failed, and
    where only the fused step did, sets a.max_fused to 1 (one run per process)."""
    gaf = next(p.config for p in points if p.config["method"]["name"] == "gaf")
    args = gpu_check.parse_args(["--device", a.device, *(["--quick"] if a.quick else []), "--jpeg", str(a.data)])
    ctx = gpu_check.context(args)  # decodes the JPEG copy once, into the cache every run then reads
    ctx.model, ctx.classes, ctx.m = gaf["model"]["name"], CLASSES[gaf["data"]["name"]], gaf["method"]["per_class"]
    ctx.merge, ctx.sync_steps = gaf["method"]["merge"], a.call.sync_steps
    checks = ["sync-free", "fp32-equal", *(["fused-equal"] if a.max_fused > 1 else [])]  # no group, no question
    results = gpu_check.run_checks(ctx, checks)
    (out / "preflight.md").write_text(gpu_check.markdown(gpu_check.environment(ctx) | {"command": command_line()},
                                                         results, []))
    if failed := [name for name, r in results.items() if r["status"] != "PASS" and name != "fused-equal"]:
        sys.exit(f"FAIL preflight {failed[0]}: {results[failed[0]]['detail']}; the grid did not run "
                 f"(report: {out / 'preflight.md'})")
    if results.get("fused-equal", {"status": "PASS"})["status"] != "PASS":
        a.max_fused = 1
        print("fused-equal failed: the runs go one per process", flush=True)
    return results


# ----------------------------------------------------------------------------- 2. plan


@dataclass(frozen=True)
class Speed:
    """A wave's time: start_s + its images / rate + its validations x eval_s. A fused group validates
    its members in turn and the groups validate at once, so the validations counted are the largest
    group's. With one run per process this is the model fitted to the recorded H200 calls, whose
    waves it predicts within 3% and 13% (tests/test_gpu_evidence.py)."""

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


def recorded_speed(card: str, results: Path = ROOT / "results") -> Speed | None:
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


def timed_rate(a, todo: list[Point]) -> tuple[float, int]:
    """Images/s of a full first wave's groups' steps (a full group of GAF runs, two arms in three, and
    the baselines beside them), each group timed in turn on the device (bench_fused: random images of
    the runs' shapes, the graph captured where the runs capture it); and how many runs that wave has."""
    wave, images, seconds = todo[: max(3 * a.max_fused // 2, 3)], 0.0, 0.0
    for job in jobs(wave, a.max_fused):
        kind, n, b = job[0].shape
        bench = SimpleNamespace(device=a.device, model=job[0].config["model"]["name"], warmup=3,
                                classes=CLASSES[job[0].config["data"]["name"]], steps=a.call.timed_steps,
                                shapes={kind: (n, b)})
        per_step = len(job) * n * b
        images += per_step
        seconds += per_step / (bench_fused.fused if len(job) > 1 else bench_fused.separate)(bench, kind, len(job))
    if a.device == "cuda":
        torch.cuda.empty_cache()  # the runs' processes get the memory this one's cache would keep
    return images / seconds, len(wave)


def first_speed(a, todo: list[Point], record: dict) -> Speed:
    """The first wave's speed: its rate timed on the device (``timed_rate``), validation and start as
    the card's last call recorded them, else guessed. Where timing the fused groups fails, the runs
    go one per process."""
    recorded = recorded_speed(record["card"]) if a.device == "cuda" else None
    try:
        rate, first = timed_rate(a, todo)
    except Exception as e:  # noqa: BLE001 (a fused step that fails here would fail every group)
        print(f"FAIL timing the fused groups ({type(e).__name__}: {e}): the runs go one per process", flush=True)
        a.max_fused = record["max_fused"] = 1
        rate, first = timed_rate(a, todo)
    speed = Speed(rate, *((recorded.eval_s, recorded.start_s) if recorded else (EVAL_S, START_S)))
    record["speed_timed"] = {**asdict(speed), "runs": first, "validation": "recorded" if recorded else "guessed"}
    print(f"speed: {rate:,.0f} images/s timed on {first} runs' groups; a validation {speed.eval_s:.2f} s "
          f"({record['speed_timed']['validation']})", flush=True)
    return speed


def next_wave(todo: list[Point], speed: Speed, max_fused: int, left_s: float) -> list[Point]:
    """The longest run of ``todo``'s first points predicted to end within ``left_s`` (at least one)."""
    fitting = [i for i in range(1, len(todo) + 1) if speed.wave_s(todo[:i], max_fused) <= left_s]
    return todo[: max(fitting, default=1)]


# ----------------------------------------------------------------------------- 3. sweep and outputs


def launch(a, wave: list[Point], work: Path) -> dict:
    """Train the wave at once, one process per fused group on one CPU thread (bench_concurrent: the
    summaries and the wall time until the last ends), ending those still going at the deadline."""
    argvs, run_dirs = [], []
    for job in jobs(wave, a.max_fused):
        dirs = [work / "sweep" / p.folder for p in job]
        path = dirs[0].with_name(dirs[0].name + ".job.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([[as_run(a, p.config), str(d)] for p, d in zip(job, dirs)]))
        argvs.append([sys.executable, str(Path(__file__).resolve()), "--run", str(path)])
        run_dirs += dirs
    return bench_concurrent.launch(argvs, run_dirs, {**os.environ, "OMP_NUM_THREADS": "1"},
                                   timeout=a.deadline - time.perf_counter())


def as_run(a, config: dict) -> dict:
    """A point's settings with how this call runs it: its device, graph capture, data file, no bar."""
    return {**config, "device": a.device, "data": {**config["data"], "jpeg_path": a.jpeg},
            "train": {**config["train"], "compile": a.compile, "progress": False}}


def train_job(path: str) -> list[dict]:
    """A process's runs: one run alone (gaf.train.run), or a fused group (gaf.fused_train.run_group)."""
    configs, run_dirs = zip(*json.loads(Path(path).read_text()))
    configs = [RunConfig.from_dict(c) for c in configs]
    return [run(configs[0], run_dirs[0])] if len(configs) == 1 else run_group(configs, run_dirs)


def sweep(a, todo: list[Point], speed: Speed, work: Path, record: dict) -> None:
    """Wave after wave while one is predicted to end within the budget; the outputs rewritten after each."""
    waves = record["waves"] = []
    todo = todo[: a.runs]
    while todo:
        left = a.t0 + a.budget_s - time.perf_counter()
        wave = next_wave(todo, speed, a.max_fused, left / 2 if not waves else left)
        predicted = speed.wave_s(wave, a.max_fused)
        if waves and predicted > left:
            print(f"stop: {len(todo)} runs not made; the next wave is predicted to take {predicted:.0f} s, "
                  f"{left:.0f} s are left", flush=True)
            break
        print(f"wave {len(waves) + 1}: {len(wave)} runs in {len(jobs(wave, a.max_fused))} processes, predicted "
              f"{predicted:.0f} s ({speed.rate:,.0f} images/s) of the {left:.0f} s left", flush=True)
        started = time.perf_counter()
        try:
            got = launch(a, wave, work)
            wall, record["images_seen"] = got["wall_s"], record["images_seen"] + got["images"]
        except SystemExit as e:  # a failed or cut run must not cost the outputs of the others
            wall = time.perf_counter() - started
            print(f"FAIL wave {len(waves) + 1}: {e}", flush=True)
            if a.max_fused > 1:  # a fused group that fails once would fail in every wave
                print("the rest go one per process", flush=True)
                a.max_fused = record["max_fused"] = 1
        waves.append({"runs": [p.folder for p in wave], "predicted_s": round(predicted, 1), "wall_s": round(wall, 1)})
        print(f"wave {len(waves)}: {wall:.0f} s, predicted {predicted:.0f} s", flush=True)
        speed, todo = speed.remeasured(*load(wave, a.max_fused), wall), todo[len(wave):]
        record.update(speed_after=asdict(speed), wall_s=round(time.perf_counter() - a.t0, 1))
        write_outputs(a, work, record)


def write_outputs(a, work: Path, record: dict) -> None:
    """gaf.report.collect's files with this call's runs added, and provenance.json's "calls" with this call's
    record (replacing an earlier version of it); a failure is printed, not raised."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its line names the temporary folder
            collect.collect([work / "sweep"], a.results, MAX_CURVE_ROWS, command=record["command"], add=True)
        path = a.results / EXPERIMENT / "provenance.json"
        provenance = json.loads(path.read_text()) if path.is_file() else {}
        calls = [c for c in provenance.get("calls", []) if c.get("date") != record["date"]] + [record]
        path.write_text(json.dumps({**provenance, "calls": calls, "run_roots": ["TMP/sweep"]}, indent=2, default=str)
                        + "\n")
    except Exception:
        traceback.print_exc()
        print("FAIL the outputs were not all written", flush=True)


def bench(a, left_s: float) -> list[str]:
    """What the budget left after the waves buys: bench_fused.py's GAF table (K runs as processes,
    in turn, fused), or why there is none."""
    sizes = ["--quick", "--k", "1", "3"] if a.quick else ["--k", "1", "3", "9", "--steps", "50"]
    argv = [sys.executable, str(ROOT / "scripts" / "bench_fused.py"), "--device", a.device, "--kinds", "gaf", *sizes]
    try:
        got = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=left_s)
    except subprocess.TimeoutExpired:
        return [f"bench_fused did not end within the {left_s:.0f} s left"]
    if got.returncode != 0:
        return [f"bench_fused failed (exit {got.returncode}): {got.stderr.strip().splitlines()[-1:]}"]
    out = got.stdout.splitlines()
    return out[next(i for i, line in enumerate(out) if line.startswith("K runs of")):]


# ----------------------------------------------------------------------------- main


def command_line() -> str:
    """This call's command line, ``$OUT`` for the device tool's output folder (no machine's paths)."""
    text = " ".join(["python", "scripts/gpu_evidence.py", *sys.argv[1:]])
    return text.replace(os.environ["OUT"], "$OUT") if os.environ.get("OUT") else text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="the dry run: ResNet18 on a few images, a few iterations")
    for name, what in (("budget-s", "wall seconds from start to the last wave's end"), ("seeds", "seeds of the grid"),
                       ("max-fused", "runs in one fused group at most (1: one run per process)")):
        p.add_argument(f"--{name}", type=float if name == "budget-s" else int, default=None, help=f"{what} (default "
                       f"{getattr(GPU, name.replace('-', '_')):g}; {getattr(QUICK, name.replace('-', '_')):g} with --quick)")
    p.add_argument("--runs", type=int, default=None, help="at most this many runs in this call")
    p.add_argument("--jpeg", default=None, help="the CIFAR-10 JPEG copy (default: data/, then the offline copy)")
    p.add_argument("--results", default=None, help=f"the folder whose {EXPERIMENT}/ the call continues and writes; "
                   "where that holds no grid, it starts from results/'s (default results/; outputs/gpu-evidence, "
                   "from nothing, with --quick)")
    p.add_argument("--no-bench", action="store_true", help="no bench_fused measurement with the budget left")
    p.add_argument("--run", metavar="JOB", help=argparse.SUPPRESS)  # one process's runs
    a = p.parse_args(argv)
    if a.run:
        return a
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; --device cpu --quick is the dry run")
    if a.device == "cpu" and not a.quick:
        p.error("the grid needs a GPU; on a CPU only the dry run: --device cpu --quick")
    a.call, a.compile = (QUICK if a.quick else GPU), ("graph" if a.device == "cuda" else "none")  # CUDA graphs
    for name in ("budget_s", "seeds", "max_fused", "runs"):
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
        if name != "runs":
            setattr(a, name, getattr(a, name) or getattr(a.call, name))
    a.results = Path(a.results or ROOT / ("outputs/gpu-evidence" if a.quick else "results"))
    try:
        a.data, a.data_source = cifar10_jpeg_file(None, a.jpeg)
    except DataError as e:
        p.error(str(e))
    return a


def call_folder(a) -> Path:
    """--results/gpu_small/, holding the grid to continue from: its own, or results/'s copied in."""
    out, committed_grid = a.results / EXPERIMENT, ROOT / "results" / EXPERIMENT
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "runs.csv").is_file() and not a.quick:
        for name in DATA_FILES:
            if (committed_grid / name).is_file():
                shutil.copy(committed_grid / name, out / name)
    return out


def main(argv=None) -> dict | list | None:
    a = parse_args(argv)
    if a.run:
        return train_job(a.run)
    a.t0 = time.perf_counter()
    a.deadline = a.t0 + a.budget_s + GRACE_S
    card = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    out = call_folder(a)
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
    results = preflight(a, out, points)
    record.update(max_fused=a.max_fused, compile=a.compile,
                  preflight={n: {k: r[k] for k in ("status", "seconds", "detail", "figures")} for n, r in results.items()})
    speed = first_speed(a, todo, record)
    with tempfile.TemporaryDirectory(prefix="gpu-evidence-") as tmp:
        sweep(a, todo, speed, Path(tmp), record)
        if not a.no_bench and (left := a.budget_s - (time.perf_counter() - a.t0)) >= FUSED_BENCH_S:
            record["fused_bench"] = bench(a, left)
            print("\n".join(record["fused_bench"]), flush=True)
            write_outputs(a, Path(tmp), record)
    files = sorted(f for f in out.iterdir() if f.is_file())
    print(f"done in {time.perf_counter() - a.t0:.0f} s (budget {a.budget_s:.0f} s): {len(files)} files, "
          f"{sum(f.stat().st_size for f in files) / 2**20:.1f} MiB in {out}", flush=True)
    return record


if __name__ == "__main__":
    main()
