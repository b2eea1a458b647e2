"""experiment=gpu_small on a lent GPU: a time-boxed call that continues the grid where the last one stopped.

    python scripts/gpu_evidence.py                          # CUDA: at most --budget-s (480 s) of wall time
    python scripts/gpu_evidence.py --results $OUT           # the device call (README: carrying the data)
    python scripts/gpu_evidence.py --device cpu --quick     # the dry run the tests run: every stage, ResNet18

It trains the preset's points as reproduce.py exported them (a lent GPU has no Hydra), as fused groups:
1. preflight: gpu_check's checks with the grid's network (which the suite runs on a CPU); 2. plan: waves
as scripts/wave_plan.py predicts them; 3. sweep: wave after wave while one fits the budget, the outputs
rewritten after each (a call cut short returns what it finished); what is left measures bench_fused.
Outputs, in --results/gpu_small/: gaf.report.collect's runs.csv, curves.csv, evals.csv, provenance.json
(every call's record in "calls") and preflight.md. The 480-s budget and the five files are a lent GPU's
defaults, not the design: --budget-s 36000 on a GPU of one's own runs the whole grid.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # gaf, from a checkout without installing (a lent GPU); bench_*, gpu_check: beside this

import bench_concurrent  # noqa: E402
import bench_fused  # noqa: E402
import gpu_check  # noqa: E402
from gaf.config import CLASSES, RunConfig  # noqa: E402
from gaf.fused_train import run_group  # noqa: E402
from gaf.report import collect  # noqa: E402  (neither Hydra nor matplotlib)
from gaf.sources import DataError, cifar10_jpeg_file  # noqa: E402
from gaf.train import run  # noqa: E402
from wave_plan import Point, Speed, jobs, load, next_wave, starting_speed, timed_rate  # noqa: E402

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
    max_fused: int  # runs in one fused group at most
    sync_steps: int  # steps of the preflight's sync-free check
    timed_steps: int  # steps of each group timed for the first wave's rate
    seeds: int  # the grid's seeds run by default


GPU = Call(budget_s=480, max_fused=32, sync_steps=200, timed_steps=20, seeds=3)
QUICK = Call(budget_s=400, max_fused=3, sync_steps=5, timed_steps=2, seeds=1)
# The dry run: the grid's points, ResNet18 still, on a few images for a few iterations.
QUICK_SIZES = {"data": {"train_per_class": 20, "test_per_class": 10}, "method": {"per_class": 1},
               "train": {"iterations": 8, "val_every": 4, "memorisation_samples": 100}}


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


# ----------------------------------------------------------------------------- 1. preflight


def preflight(a, out: Path, points: list[Point], record: dict) -> None:
    """gpu_check's sync-free, fp32-equal and (where runs are fused) fused-equal checks with the grid's
    network, classes, m and merge, reported in out/preflight.md and the record; exits where the fast
    step failed; where only the fused step did, the runs go one per process."""
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
    record["preflight"] = {n: {k: r[k] for k in ("status", "seconds", "detail", "figures")} for n, r in results.items()}
    if results.get("fused-equal", {"status": "PASS"})["status"] != "PASS":
        one_per_process(a, record, "fused-equal failed")


def one_per_process(a, record: dict, why: str) -> None:
    """Every run from now on alone in its process: a fused step that failed once fails in every group."""
    a.max_fused = record["max_fused"] = 1
    print(f"{why}: the runs go one per process", flush=True)


# ----------------------------------------------------------------------------- 2. plan


def first_speed(a, todo: list[Point], record: dict) -> Speed:
    """The first wave's speed, its rate timed on the device; where timing the fused groups fails, the
    runs go one per process."""
    try:
        rate, first = timed_rate(todo, a.device, a.max_fused, a.call.timed_steps)
    except Exception as e:  # noqa: BLE001 (a fused step that fails here would fail every group)
        one_per_process(a, record, f"FAIL timing the fused groups ({type(e).__name__}: {e})")
        rate, first = timed_rate(todo, a.device, a.max_fused, a.call.timed_steps)
    speed, source = starting_speed(rate, record["card"], ROOT / "results" if a.device == "cuda" else None)
    record["speed_timed"] = {**asdict(speed), "runs": first, "validation": source}
    print(f"speed: {rate:,.0f} images/s timed on {first} runs' groups; a validation {speed.eval_s:.2f} s "
          f"({source})", flush=True)
    return speed


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
            if a.max_fused > 1:
                one_per_process(a, record, "a wave of fused groups failed")
        waves.append({"runs": [p.folder for p in wave], "predicted_s": round(predicted, 1), "wall_s": round(wall, 1)})
        print(f"wave {len(waves)}: {wall:.0f} s, predicted {predicted:.0f} s", flush=True)
        speed, todo = speed.remeasured(*load(wave, a.max_fused), wall), todo[len(wave):]
        record.update(speed_after=asdict(speed), wall_s=round(time.perf_counter() - a.t0, 1))
        write_outputs(a, work, record)


def write_outputs(a, work: Path, record: dict) -> None:
    """gaf.report.collect's files with this call's runs and record added; a failure is printed, not raised."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its line names the temporary folder
            collect.collect([work / "sweep"], a.results, MAX_CURVE_ROWS, command=record["command"], add=True)
        collect.record_call(a.results / EXPERIMENT, record, run_roots=["TMP/sweep"])
    except Exception:
        traceback.print_exc()
        print("FAIL the outputs were not all written", flush=True)


# ----------------------------------------------------------------------------- main


def command_line() -> str:
    """This call's command line, ``$OUT`` for the device tool's output folder (no machine's paths)."""
    text = " ".join(["python", "scripts/gpu_evidence.py", *sys.argv[1:]])
    return text.replace(os.environ["OUT"], "$OUT") if os.environ.get("OUT") else text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="the dry run: ResNet18 on a few images, a few iterations")
    p.add_argument("--budget-s", type=float, help=f"wall seconds to the last wave's end (default {GPU.budget_s:g})")
    p.add_argument("--seeds", type=int, help=f"seeds of the grid (default {GPU.seeds}; {QUICK.seeds} with --quick)")
    p.add_argument("--max-fused", type=int, help=f"runs in a fused group at most, 1: one per process (default "
                   f"{GPU.max_fused}; {QUICK.max_fused} with --quick)")
    p.add_argument("--runs", type=int, help="at most this many runs in this call")
    p.add_argument("--jpeg", help="the CIFAR-10 JPEG copy (default: data/, then the offline copy)")
    p.add_argument("--results", help=f"the folder whose {EXPERIMENT}/ the call continues and writes, from results/'s "
                   "where it holds none (default results/; outputs/gpu-evidence, from nothing, with --quick)")
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
              "budget_s": a.budget_s, "images_seen": 0}  # provenance.json's "calls" entry
    points = grid(a.seeds, a.quick)
    todo = [p for p in points if p.folder not in committed(points, out)]
    print(f"grid: {len(todo)} of {len(points)} runs to go ({len(points) - len(todo)} committed)", flush=True)
    if not todo:
        return record
    record.update(max_fused=a.max_fused, compile=a.compile)
    preflight(a, out, points, record)
    speed = first_speed(a, todo, record)
    with tempfile.TemporaryDirectory(prefix="gpu-evidence-") as tmp:
        sweep(a, todo, speed, Path(tmp), record)
        if not a.no_bench and (left := a.budget_s - (time.perf_counter() - a.t0)) >= FUSED_BENCH_S:
            record["fused_bench"] = bench_fused.gaf_table_within(left, a.device, a.quick)
            print("\n".join(record["fused_bench"]), flush=True)
            write_outputs(a, Path(tmp), record)
    files = sorted(f for f in out.iterdir() if f.is_file())
    print(f"done in {time.perf_counter() - a.t0:.0f} s (budget {a.budget_s:.0f} s): {len(files)} files, "
          f"{sum(f.stat().st_size for f in files) / 2**20:.1f} MiB in {out}", flush=True)
    return record


if __name__ == "__main__":
    main()
