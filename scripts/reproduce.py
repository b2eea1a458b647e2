"""Regenerate the paper's evidence: every figure preset at one scale, then collect and plot.

    python scripts/reproduce.py --scale tiny            # the whole pipeline on a CPU, minutes
    python scripts/reproduce.py --scale small --jobs 4  # about one GPU-hour, 4 runs share the GPU
    python scripts/reproduce.py --scale paper           # the paper's lengths (CIFAR-100 required)

Finished runs are skipped (the trainer makes a finished run directory a no-op and
resumes an interrupted one), so this can be stopped and re-launched at any point.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (preset, extra overrides, multirun?). A multirun sweeps the preset's own grid
# (hydra.sweeper.params); the single runs are the baselines that a grid over GAF-only
# keys (tau, m, n) would otherwise repeat once per grid point.
PLAN: list[tuple[str, list[str], bool]] = [
    ("fig1", [], True),
    ("fig3", [], True),
    ("fig4", [], True),
    ("fig5", [], True),
    ("fig6", [], True),
    ("fig7", [], True),
    ("fig7", ["method=baseline"], False),
    ("fig8", [], True),
    ("fig8", ["method=baseline", "method.batch_size=128"], False),
    ("fig8", ["method=baseline", "method.batch_size=512"], False),
    ("fig9", [], True),
    ("fig9", ["method=baseline"], False),
    ("table1", [], True),
]


def launch(preset: str, overrides: list[str], multirun: bool, scale: str, jobs: int, extra: list[str],
           out: Path) -> int:
    cmd = [sys.executable, str(ROOT / "experiments/train.py")]
    cmd += ["-m"] if multirun else []
    cmd += [f"experiment={preset}", f"scale={scale}", *overrides, *extra]
    if out != ROOT:  # keep the layout the presets use, under another folder
        cmd += [f"hydra.sweep.dir={out}/multirun/{preset}/{scale}",
                f"hydra.run.dir={out}/outputs/{preset}/{scale}/" + "${bounded_dirname:${hydra.job.override_dirname}}"]
    if multirun and jobs > 1:
        cmd += ["hydra/launcher=shared_gpu", f"hydra.launcher.n_jobs={jobs}"]
    print(f"\n=== {preset} {' '.join(overrides)}\n$ {shlex.join(cmd)}", flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=["tiny", "small", "paper"], default="paper")
    p.add_argument("--jobs", type=int, default=1, help="runs sharing the device at once (joblib launcher)")
    p.add_argument("--only", nargs="*", default=None, help="presets to run (default: all)")
    p.add_argument("--no-plot", action="store_true", help="run only; skip collect and plot")
    p.add_argument("--out", type=Path, default=ROOT,
                   help="folder for multirun/, outputs/ and results/ (default: the repository)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. device=cuda")
    args = p.parse_args(argv)

    started, failed = time.perf_counter(), []
    for preset, overrides, multirun in PLAN:
        if args.only and preset not in args.only:
            continue
        if launch(preset, overrides, multirun, args.scale, args.jobs, args.overrides, args.out.resolve()) != 0:
            failed.append(" ".join([preset, *overrides]))
    if not args.no_plot:
        command = shlex.join(["python", "scripts/reproduce.py", "--scale", args.scale, *args.overrides])
        out = args.out.resolve()
        for script in (["scripts/collect.py", "--runs", str(out / "multirun"), str(out / "outputs"),
                        "--results", str(out / "results"), "--command", command],
                       ["scripts/plot.py", "--results", str(out / "results")]):
            if subprocess.run([sys.executable, *script], cwd=ROOT).returncode != 0:
                failed.append(script[0])
    minutes = (time.perf_counter() - started) / 60
    print(f"\nreproduce --scale {args.scale}: {minutes:.1f} min" + (f"; FAILED: {failed}" if failed else "; all done"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
