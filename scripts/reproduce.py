"""Regenerate the paper's evidence: every figure preset at one scale, then collect and plot.

    python scripts/reproduce.py --scale tiny            # the whole pipeline on a CPU, minutes
    python scripts/reproduce.py --scale small --jobs 4  # about one GPU-hour, 4 runs share the GPU
    python scripts/reproduce.py --scale paper           # the paper's lengths (CIFAR-100 required)

Before any run starts, the data every chosen preset needs at this scale is obtained once
(downloaded where the network allows: gaf.sources's order); where it cannot be had, one
error names every source tried and nothing is launched. Finished runs are skipped (the
trainer makes a finished run directory a no-op and resumes an interrupted one), so this
can be stopped and re-launched at any point.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]

# (preset, extra overrides, multirun?, scales it runs at: None = all). A multirun sweeps the
# preset's own grid (hydra.sweeper.params); the single runs are the baselines that a grid over
# GAF-only keys (tau, m, n) would otherwise repeat once per grid point. The tiny scale skips
# table1's own runs (its rows are figure 6's) and fig8's batch-512 baseline (the 30-minute
# CPU budget; the presets say so).
PLAN: list[tuple[str, list[str], bool, tuple[str, ...] | None]] = [
    ("fig1", [], True, None),
    ("fig3", [], True, None),
    ("fig4", [], True, None),
    ("fig5", [], True, None),
    ("fig6", [], True, None),
    ("fig7", [], True, None),
    ("fig7", ["method=baseline"], False, None),
    ("fig8", [], True, None),
    ("fig8", ["method=baseline", "method.batch_size=128"], False, None),
    ("fig8", ["method=baseline", "method.batch_size=512"], False, ("small", "paper")),
    ("fig9", [], True, None),
    ("fig9", ["method=baseline"], False, None),
    ("table1", [], True, ("small", "paper")),
    ("premise", [], True, None),
    ("premise", ["method.per_class=2", "model.width=16"], True, ("tiny",)),  # the m axis, at width 16
    ("premise", ["method.per_class=2,4", "model.width=16"], True, ("small", "paper")),
    # One baseline per width; at tiny, width 16's is figure 6's (seed 0, 40% noise): the same run.
    ("premise", ["method=baseline", "method.tau=0.97", "model.width=4"], True, ("tiny",)),
    ("premise", ["method=baseline", "method.tau=0.97", "model.width=16,64"], True, ("small", "paper")),
]


def launch(preset: str, overrides: list[str], multirun: bool, scale: str, jobs: int, extra: list[str],
           out: Path) -> int:
    cmd = [sys.executable, str(ROOT / "experiments/train.py")]
    cmd += ["-m"] if multirun else []
    cmd += [f"experiment={preset}", f"scale={scale}", *overrides]
    env = None
    if jobs > 1:
        # Several runs at once, each with its share of the cores: on a CPU, single-threaded
        # runs side by side do more work per second than one run on every core. Single runs
        # get the same share, so that no number depends on the machine's core count (on a
        # CPU the thread count changes the summation order, and a run's numbers with it).
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if multirun:
            cmd += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
            if not any(o.startswith("train.progress=") for o in extra):
                cmd += ["train.progress=false"]  # side-by-side bars would interleave
    cmd += extra
    print(f"\n=== {preset} {' '.join(overrides)}\n$ (cd {shlex.quote(str(out))}; {shlex.join(cmd)})", flush=True)
    # Run directories are relative to the working directory (config.yaml's hydra.run/sweep.dir),
    # data paths to the repository: running in `out` keeps the presets' layout under it.
    return subprocess.run(cmd, cwd=out, env=env).returncode


def default_jobs(overrides: list[str]) -> int:
    """Runs at once when --jobs is not given: one per core on a CPU (measured on 2 cores: two
    single-threaded runs side by side train 1.1-1.4x the images per second of one run on both),
    one on a GPU, where a run's own step is what to speed up."""
    import torch

    device = next((o.split("=", 1)[1] for o in overrides if o.startswith("device=")), "auto")
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return max(1, os.cpu_count() or 1) if on_cpu else 1


def data_configs(preset: str, scale: str, extra: list[str]) -> list[dict]:
    """The distinct ``data`` sections of a preset's runs at ``scale`` (its sweep over the data
    group included), composed as the runs compose them, with the caller's data overrides."""
    from hydra import compose, initialize_config_dir

    overrides = [f"experiment={preset}", f"scale={scale}", *(o for o in extra if o.startswith("data"))]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        swept = compose("config", overrides=overrides, return_hydra_config=True).hydra.sweeper.params.get("data")
        groups = [[f"data={g}"] for g in str(swept).split(",")] if swept else [[]]
        configs = [OmegaConf.to_container(compose("config", overrides=[*overrides[:2], *g, *overrides[2:]]),
                                          resolve=True) for g in groups]
    return [c for i, c in enumerate(configs) if c["data"] not in [d["data"] for d in configs[:i]]]


def prepare_data(presets: list[str], scale: str, extra: list[str]) -> str | None:
    """Load (downloading where allowed) each data set the presets need, once; the one error, or None."""
    from gaf.config import RunConfig
    from gaf.train import load_data

    where_from = ("name", "root", "label_file", "download", "fallback", "fallback_when", "jpeg_path")
    seen = []
    for preset in presets:
        for container in data_configs(preset, scale, extra):
            container.pop("scales", None)
            source = {k: container["data"][k] for k in where_from}
            if source in seen:
                continue
            seen.append(source)
            try:
                note = load_data(RunConfig.from_dict(container)).note
            except ValueError as e:  # DataError: nothing to run on
                return f"{preset} at --scale {scale}: {e}"
            print(f"data for {preset} ({source['name']}): {note}", flush=True)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=["tiny", "small", "paper"], default="paper")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs of a sweep at once (joblib launcher); default: one per core on a CPU, 1 on a GPU")
    p.add_argument("--only", nargs="*", default=None, help="presets to run (default: all)")
    p.add_argument("--no-plot", action="store_true", help="run only; skip collect and plot")
    p.add_argument("--out", type=Path, default=ROOT,
                   help="folder for multirun/, outputs/ and results/ (default: the repository)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. device=cuda")
    args = p.parse_args(argv)

    started, failed = time.perf_counter(), []
    jobs = args.jobs if args.jobs is not None else default_jobs(args.overrides)
    if jobs < 1:
        p.error(f"--jobs must be at least 1, got {jobs}")
    args.out.mkdir(parents=True, exist_ok=True)
    presets = list(dict.fromkeys(p for p, _, _, sc in PLAN if (not args.only or p in args.only)
                                  and (not sc or args.scale in sc)))
    error = prepare_data(presets, args.scale, args.overrides)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for preset, overrides, multirun, scales in PLAN:
        if (args.only and preset not in args.only) or (scales and args.scale not in scales):
            continue
        if launch(preset, overrides, multirun, args.scale, jobs, args.overrides, args.out.resolve()) != 0:
            failed.append(" ".join([preset, *overrides]))
    if not args.no_plot:
        command = shlex.join(["python", "scripts/reproduce.py", "--scale", args.scale, *args.overrides])
        out = args.out.resolve()
        for script in (["scripts/collect.py", "--runs", str(out / "multirun"), str(out / "outputs"),
                        "--results", str(out / "results"), "--command", command],
                       ["scripts/plot.py", "--results", str(out / "results")],
                       ["scripts/regime_check.py", "--results", str(out / "results")]):
            if subprocess.run([sys.executable, *script], cwd=ROOT).returncode != 0:
                failed.append(script[0])
    minutes = (time.perf_counter() - started) / 60
    used = resource.getrusage(resource.RUSAGE_CHILDREN)  # CPU time of every launch: what a shared machine hides
    print(f"\nreproduce --scale {args.scale}: {minutes:.1f} min wall, {(used.ru_utime + used.ru_stime) / 60:.1f} "
          "CPU-minutes" + (f"; FAILED: {failed}" if failed else "; all done"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
