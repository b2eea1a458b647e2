"""Regenerate the paper's evidence: every preset's launches at one scale, then collect and plot.

    python scripts/reproduce.py --scale tiny            # the whole pipeline on a CPU, minutes
    python scripts/reproduce.py --scale small --jobs 4  # GPU-hours (150 runs), 4 runs share the GPU
    python scripts/reproduce.py --scale paper           # the paper's lengths (CIFAR-100 required)

What runs is declared in the presets: each one's `launches` (configs/experiment/*.yaml), its
sweep and its single runs, each at the scales it names. Before any run starts, every point of every launch is composed and checked (the same check
as a Hydra launch: experiments/launch.py), then the data every point needs is obtained once
(downloaded where the network allows: gaf.sources's order); where a point would not run or
the data cannot be had, one error says so and nothing is launched. --dry-run lists every
launch and its points and stops there. Finished runs are skipped (the trainer makes a
finished run directory a no-op and resumes an interrupted one), so this can be stopped and
re-launched at any point.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]  # this tree's gaf, whichever tree .venv installed
from launch import (composed_point, first_line, fixed_overrides, run_config, scale_for,  # noqa: E402
                    scale_options, sweep_keys_left_open, sweep_points)

SCALES = scale_options()
LAUNCH_FIELDS = {"multirun", "overrides", "scales"}


def declared_launches(preset: Path) -> list[tuple[list[str], bool, tuple[str, ...]]]:
    """A preset's ``launches``: (overrides, multirun?, scales it runs at) each. A multirun sweeps the
    preset's grid (hydra.sweeper.params); a single run is a baseline that a grid over GAF-only keys
    (tau, m, n) would otherwise repeat once per grid point. A launch that names no scales runs at
    every scale made for the preset (configs/scale/*.yaml: scale_for)."""
    made_for = tuple(s for s in SCALES if preset.stem in (scale_for(s) or [preset.stem]))
    out = []
    for i, entry in enumerate(OmegaConf.to_container(OmegaConf.load(preset)).get("launches") or []):
        where = f"{preset.name}: launches[{i}]"
        if not isinstance(entry, dict) or set(entry) - LAUNCH_FIELDS:
            raise ValueError(f"{where} must be a mapping of {', '.join(sorted(LAUNCH_FIELDS))}, got {entry!r}")
        scales = tuple(entry.get("scales", made_for))
        if unknown := [s for s in scales if s not in SCALES]:
            raise ValueError(f"{where}.scales: {unknown} are not scales; allowed: {', '.join(SCALES)}")
        out.append(([str(o) for o in entry.get("overrides", [])], bool(entry.get("multirun", False)), scales))
    return out


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
    """Runs at once when --jobs is not given: one per core on a CPU (single-threaded runs side
    by side do more work per second than one run on every core, as the README measures), one on a
    GPU, where a run's own step is what to speed up."""
    import torch

    device = next((o.split("=", 1)[1] for o in overrides if o.startswith("device=")), "auto")
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return max(1, os.cpu_count() or 1) if on_cpu else 1


def plan(scale: str, only: list[str] | None) -> list[tuple[str, list[str], bool]]:
    """The launches at ``scale``, every preset's (configs/experiment/*.yaml ``launches``):
    (preset, overrides, multirun?)."""
    presets = sorted((ROOT / "configs/experiment").glob("*.yaml"))
    return [(path.stem, overrides, multirun) for path in presets if not only or path.stem in only
            for overrides, multirun, scales in declared_launches(path) if scale in scales]


def points(launch: tuple[str, list[str], bool], scale: str, extra: list[str]) -> list[tuple[list[str], object, str]]:
    """Every run one launch makes: (its overrides, its RunConfig or the error that stops it, its
    folder's name: a sweep point's under the sweep's folder, a single run's overrides)."""
    from hydra import compose

    preset, overrides, multirun = launch
    given = [f"experiment={preset}", f"scale={scale}", *overrides, *extra]
    cfg = compose("config", overrides=fixed_overrides(given), return_hydra_config=True)
    if multirun:
        return [(point, *composed_point(point)) for point in sweep_points(cfg.hydra.sweeper.params, given)]
    try:
        rc = run_config(cfg, given)
        if left_open := sweep_keys_left_open(cfg, rc):
            raise ValueError(f"a single run of {preset} leaves its sweep over {', '.join(left_open)} open")
        return [(given, rc, ",".join(overrides))]
    except Exception as e:  # noqa: BLE001 (bad values, composition errors: the run's one line)
        return [(given, e, None)]


def check_plan(launches, scale: str, extra: list[str], show: bool) -> tuple[list[str], list]:
    """(errors, [(RunConfig, folder name)]) of every point of every launch; ``show`` lists them."""
    from hydra import initialize_config_dir

    errors, configs = [], []
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        for launch in launches:
            got = points(launch, scale, extra)
            if show:
                print(f"{launch[0]} {' '.join(launch[1])}: {len(got)} run{'s' * (len(got) != 1)}"
                      f"{' (multirun)' if launch[2] else ''}")
            for point, result, folder in got:
                ok = not isinstance(result, Exception)
                configs += [(result, folder)] if ok else []
                errors += [] if ok else [f"{launch[0]}: {' '.join(point)}: {first_line(result)}"]
                if show:
                    print(f"  {' '.join(point)}" + ("" if ok else f"\n    error: {first_line(result)}"))
    return errors, configs


def export(path: Path, planned: list, command: list[str]) -> None:
    """The runs as JSON, each its folder's name and its whole RunConfig, and every scale's loop (its
    configs/scale/ file's ``train``): scripts/gpu_evidence.py trains experiment=gpu_small's on a lent
    GPU, and scripts/gpu_check.py times a small-scale loop there, which has no Hydra and no YAML."""
    points = [json.dumps({"folder": folder, "config": rc.to_dict()}) for rc, folder in planned]
    loops = {s: OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "scale" / f"{s}.yaml").train) for s in SCALES}
    path.write_text(f'{{"command": {json.dumps(shlex.join(command))},\n "scale_loops": {json.dumps(loops)},\n'
                    f' "points": [\n  ' + ",\n  ".join(points) + "\n]}\n")
    print(f"exported {len(points)} runs to {path}")


def prepare_data(configs, scale: str) -> str | None:
    """Load (downloading where allowed) each data set the runs need, once; the one error, or None."""
    from gaf.train import load_data

    seen = []
    for cfg in configs:
        if cfg.data in seen:
            continue
        seen.append(cfg.data)
        try:
            note = load_data(cfg).note
        except ValueError as e:  # DataError: nothing to run on
            return f"{cfg.experiment} at --scale {scale}: {e}"
        print(f"data for {cfg.experiment} ({cfg.data.name}): {note}", flush=True)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=SCALES, default="paper")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs of a sweep at once (joblib launcher); default: one per core on a CPU, 1 on a GPU")
    p.add_argument("--only", nargs="*", default=None, help="presets to run (default: all)")
    p.add_argument("--no-plot", action="store_true", help="run only; skip collect and plot")
    p.add_argument("--dry-run", action="store_true", help="list every launch and its runs, check them, launch nothing")
    p.add_argument("--out", type=Path, default=ROOT,
                   help="folder for multirun/, outputs/ and results/ (default: the repository)")
    p.add_argument("--export", type=Path, default=None, help="write every run (its folder's name and settings) "
                   "to this JSON file and launch nothing: what a machine without Hydra trains")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. device=cuda")
    args = p.parse_args(argv)

    started, failed = time.perf_counter(), []
    jobs = args.jobs if args.jobs is not None else default_jobs(args.overrides)
    if jobs < 1:
        p.error(f"--jobs must be at least 1, got {jobs}")
    try:
        launches = plan(args.scale, args.only)
    except ValueError as e:  # a malformed `launches` entry
        print(f"error: {e}", file=sys.stderr)
        return 2
    errors, planned = check_plan(launches, args.scale, args.overrides, show=args.dry_run)
    configs = [rc for rc, _ in planned]
    if errors:
        print(f"error: {len(errors)} run(s) would not run; nothing was launched:\n  " + "\n  ".join(errors),
              file=sys.stderr)
        return 2
    if args.export:
        export(args.export, planned, ["python", "scripts/reproduce.py", *(argv if argv is not None else sys.argv[1:])])
        return 0
    if args.dry_run:
        print(f"dry run: {len(configs)} runs in {len(launches)} launches at --scale {args.scale}, every one valid")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    error = prepare_data(configs, args.scale)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for preset, overrides, multirun in launches:
        if launch(preset, overrides, multirun, args.scale, jobs, args.overrides, args.out.resolve()) != 0:
            failed.append(" ".join([preset, *overrides]))
    if not args.no_plot:
        command = shlex.join(["python", "scripts/reproduce.py", "--scale", args.scale, *args.overrides])
        out = args.out.resolve()
        scales = sorted({c.scale for c in configs})  # custom where the overrides change a scale's settings
        roots = [name for name in ("multirun", "outputs") if (out / name).is_dir()]  # named from out: no machine path
        steps = [[str(ROOT / "scripts/collect.py"), "--runs", *roots, "--results", str(out / "results"), "--command",
                  command, "--scales", *scales]] if roots else []
        steps.append([str(ROOT / "scripts/plot.py"), "--results", str(out / "results")])
        if "fig6" in {preset for preset, _, _ in launches}:  # the regime is read off figure 6's baselines
            steps.append([str(ROOT / "scripts/regime_check.py"), "--results", str(out / "results")])
        for script in steps:
            if subprocess.run([sys.executable, *script], cwd=out).returncode != 0:
                failed.append(Path(script[0]).name)
    minutes = (time.perf_counter() - started) / 60
    used = resource.getrusage(resource.RUSAGE_CHILDREN)  # CPU time of every launch: what a shared machine hides
    print(f"\nreproduce --scale {args.scale}: {minutes:.1f} min wall, {(used.ru_utime + used.ru_stime) / 60:.1f} "
          "CPU-minutes" + (f"; FAILED: {failed}" if failed else "; all done"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
