"""Total training throughput of K runs sharing one device (what `reproduce.py --jobs K` buys).

A small GAF step leaves most of a large GPU idle; several runs side by side can fill it.
For each K this starts K identical-but-for-seed training runs at once (real runs of
experiments/train.py, each in its own process and run directory) and reports, side by side
with K = 1 and as ratios: the summed images/s over the wall time until the slowest ends
(process start-up included, as a sweep sees it), and the sum of the runs' own training-loop
images/s (summary.json: start-up excluded). The default runs are long enough (3,000
iterations) that the loop, not the start-up, dominates the wall time on a GPU.

    python scripts/bench_concurrent.py --jobs 1 2 4                       # device=auto
    python scripts/bench_concurrent.py --jobs 1 2 --quick                 # seconds, on a CPU
    python scripts/bench_concurrent.py --jobs 1 2 4 -- model=resnet18 train.iterations=500
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["data=random", "data.random_train=500", "data.random_test=100", "data.num_classes=10", "model=tiny",
         "method.per_class=4", "train.iterations=40", "train.val_every=40", "train.memorisation_samples=100"]
DEFAULT = ["data=random", "data.random_train=20000", "data.random_test=1000", "model=resnet18",
           "train.iterations=3000", "train.val_every=3000", "train.memorisation_samples=1000"]


def launch(argvs: list[list[str]], run_dirs: list[Path], env: dict | None = None, timeout: float | None = None) -> dict:
    """Start every command at once (each a training run writing its own run directory); wait
    for all; return their summaries, total images and the wall time until the last ends.
    After ``timeout`` seconds the runs still going are ended, and SystemExit says so."""
    start = time.perf_counter()
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for argv in argvs]
    try:
        errors = [p.communicate(timeout=None if timeout is None else max(0.0, start + timeout - time.perf_counter()))[1]
                  for p in procs]
    except subprocess.TimeoutExpired:
        running = [p for p in procs if p.poll() is None]
        for p in running:
            p.terminate()
        for p in running:
            p.communicate()  # reads what it still writes while it ends
        raise SystemExit(f"{len(running)} of {len(procs)} runs were still going at the {timeout:.0f} s limit "
                         "and were ended") from None
    wall = time.perf_counter() - start
    for p, err in zip(procs, errors):
        if p.returncode != 0:
            raise SystemExit(f"a run failed (exit {p.returncode}):\n{err[-2000:]}")
    summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs]
    return {"wall_s": wall, "images": sum(s["images_seen"] for s in summaries),
            "loop_images_per_s": sum(s["images_per_s"] for s in summaries), "device": summaries[0]["device_name"],
            "summaries": summaries}


def run_concurrently(k: int, overrides: list[str], workdir: Path) -> dict:
    """Start k runs of experiments/train.py at once; return their total images and the wall time until the last ends."""
    dirs = [workdir / f"k{k}/run{i}" for i in range(k)]
    argvs = [[sys.executable, str(ROOT / "experiments/train.py"), *overrides, f"seed={i}", "train.progress=false",
              f"hydra.run.dir={d}"] for i, d in enumerate(dirs)]
    return {"k": k, **launch(argvs, dirs)}


def table(rows: list[dict], what: str) -> str:
    """The rows side by side with the one-run row (k = 1), as markdown."""
    base = next(r for r in rows if r["k"] == 1)
    base_rate = base["images"] / base["wall_s"]
    lines = [f"\nConcurrent runs on **{rows[0]['device']}**, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}; each run: {what}\n",
             "| runs | wall (s) | total images/s over the wall | vs one run | summed loop images/s | vs one run |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        rate, loop = r["images"] / r["wall_s"], r["loop_images_per_s"]
        lines.append(f"| {r['k']} | {r['wall_s']:.1f} | {rate:,.0f} | {rate / base_rate:.2f}x | {loop:,.0f} "
                     f"| {loop / base['loop_images_per_s']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 4], help="concurrent runs to compare")
    p.add_argument("--quick", action="store_true", help="tiny model on random data: seconds, for CI")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = p.parse_args(argv)
    if 1 not in args.jobs:
        p.error("--jobs must include 1: the other counts are reported relative to it")
    overrides = (QUICK if args.quick else DEFAULT) + args.overrides
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_concurrently(k, overrides, Path(tmp)) for k in sorted(args.jobs)]
    print(table(rows, " ".join(overrides)))
    return rows


if __name__ == "__main__":
    main()
