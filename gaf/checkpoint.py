"""A run's checkpoint, and what a run directory already holds: whether launching a run there
resumes it, finds it done, or would replace another run's results (``prior_run``).

    checkpoint.pt  everything needed to resume (model, optimizer, scheduler, sampler and
                   random states, counters), written atomically at every validation
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gaf.rundir import RUN_FILES, RunDirError, describe_differences, read_json, same_run


class CheckpointError(RunDirError):
    """A checkpoint that cannot be read."""


# What gaf.train writes into checkpoint.pt, and needs to resume.
CHECKPOINT_KEYS = ("config", "state", "model", "optimizer", "scheduler", "sampler", "aug_rng", "torch_rng",
                   "adaptive_tau")


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file: say which, and what to do
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e}); "
                              "delete it to restart this run from scratch") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise CheckpointError(f"checkpoint {path} is not one of this trainer's (it lacks {', '.join(missing)}); "
                              "delete it to restart this run from scratch")
    return ckpt


def prior_run(run_dir: Path, config: dict) -> tuple[dict | None, dict | None]:
    """(summary, checkpoint) of this very run in ``run_dir``, either None where absent. A run of
    another config, or files that are not this trainer's, are errors: a run directory's results
    are never replaced by another run's."""
    summary_path, ckpt_path = run_dir / "summary.json", run_dir / "checkpoint.pt"
    summary = read_json(summary_path) if summary_path.exists() else None
    if summary is not None and not (isinstance(summary, dict) and isinstance(summary.get("config"), dict)):
        raise RunDirError(f"{summary_path} is not a run summary; delete it to go on from checkpoint.pt")
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    theirs = summary["config"] if summary is not None else ckpt["config"] if ckpt is not None else None
    if theirs is not None and not same_run(theirs, config):
        status = summary.get("status") if summary is not None else None
        what = ("the checkpoint of a run" if summary is None else
                f"a {status} run" if status in ("finished", "diverged", "stopped") else "an unfinished run")
        raise RunDirError(f"run directory {run_dir} holds {what} of another config: "
                          f"{describe_differences(config, theirs)}; launch this one in another run directory "
                          "(hydra.run.dir=...) to keep both")
    if summary is not None and ckpt is not None and not same_run(ckpt["config"], config):
        raise RunDirError(f"{ckpt_path} belongs to another config than {summary_path}: "
                          f"{describe_differences(config, ckpt['config'])}; delete it to restart this run")
    foreign = [name for name in RUN_FILES if (run_dir / name).exists()]
    if theirs is None and foreign:
        raise RunDirError(f"run directory {run_dir} holds {', '.join(foreign)} but no run summary: not a run of "
                          "this trainer; launch in another run directory (hydra.run.dir=...), or move them away")
    return summary, ckpt
