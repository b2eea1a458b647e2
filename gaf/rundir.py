"""The files of a run directory: atomic JSON, whether two configs are the same run, the lock, a
run's status, the environment a run ran in and its summary (the checkpoint and what a directory already holds: ``gaf.checkpoint``;
the CSV logs and wandb: ``gaf.log``).

    config.json    the resolved config
    metrics.csv    one row per iteration
    eval.csv       one row per validation
    summary.json   status, accuracies, throughput, environment, config
    checkpoint.pt  everything needed to resume, written atomically

Reading a run's files needs no torch: this module imports it only where it describes the
environment of a run being trained (``environment``).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gaf.config import RunConfig

if TYPE_CHECKING:
    import torch


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class RunDirError(RuntimeError):
    """A run directory that cannot be used as it is: the message says which file and what to do."""


def read_json(path: Path) -> Any:
    """A JSON file of the run directory; a corrupt one is a RunDirError naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is corrupt ({e}); delete it to go on from checkpoint.pt "
                          "(or to start afresh without one)") from None


# How a run is driven, not what it computes: changing these between launches of one run
# directory is allowed (e.g. resume a run stopped by train.stop_after, without a progress bar).
OPERATIONAL_KEYS = {"train": ("stop_after", "progress"), "wandb": ("mode", "project")}


def differences(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, value in a, value in b) for every leaf where two config dicts differ
    (operational keys aside)."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        key, x, y = f"{prefix}{k}", a.get(k), b.get(k)
        section, _, name = key.partition(".")
        if name and name in OPERATIONAL_KEYS.get(section, ()):
            continue
        if isinstance(x, dict) and isinstance(y, dict):
            out += differences(x, y, key + ".")
        elif x != y:
            out.append((key, x, y))
    return out


def completed(d: dict) -> dict:
    """``d`` with every setting it lacks at its default: a run saved before a setting existed
    ran as that setting's default does (the loss section: cross-entropy)."""
    def merged(base: dict, over: dict) -> dict:
        return {**base, **{k: merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in over.items()}}
    return merged(RunConfig().to_dict(), d)


def same_run(a: dict | None, b: dict) -> bool:
    """Whether two config dicts describe the same computation (operational keys aside)."""
    return a is not None and not differences(completed(a), completed(b))


def describe_differences(here: dict, there: dict) -> str:
    """'method.tau=0.5 (it has 0.97), seed=1 (it has 0)' for an error message."""
    return ", ".join(f"{k}={json.dumps(x)} (it has {json.dumps(y)})"
                     for k, x, y in differences(completed(here), completed(there)))


class RunDirLock:
    """One process at a time per run directory: ``run.lock`` holds the owner's ``pid host``
    and an exclusive ``flock`` while the owner lives (the kernel drops it when the process
    dies, so a lock left by a dead process is stale and taken over). A lock held by a live
    process, or one written on another host (whose process this host cannot see), is an
    error naming the owner."""

    NAME = "run.lock"

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        for _ in range(5):  # the lock file may be removed between opening and locking it
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._owner(fd)
                os.close(fd)
                raise RunDirError(f"run directory {self.path.parent} is in use by {owner}; "
                                  "wait for that run to end, or use another run directory") from None
            if not self._still_there(fd):
                os.close(fd)
                continue
            owner = self._owner(fd)
            if self._elsewhere(owner):
                os.close(fd)
                raise RunDirError(f"run directory {self.path.parent} is locked by {owner} (another host, "
                                  f"this is {socket.gethostname()}); if that run has ended, delete {self.path}")
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            self._fd = fd
            return
        raise RunDirError(f"could not lock run directory {self.path.parent}: {self.path} keeps changing")

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter then finds no stale file
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _still_there(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def held(self) -> bool:
        """Whether a live process on this host holds the lock (a lock file left by a killed process is
        not held: the kernel dropped its flock). A lock written on another host counts as held."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            if self._elsewhere(self._owner(fd)):
                return True
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def holder(self) -> str | None:
        """'pid P on HOST' of the process holding the lock, or None where none does (``held``)."""
        if not self.held():
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            return self._owner(fd) or "an unknown process"
        finally:
            os.close(fd)

    @staticmethod
    def _elsewhere(owner: str) -> bool:
        """Whether a lock's owner ('pid P on HOST') runs on another host, whose processes this one cannot see."""
        return bool(owner) and not owner.endswith(f" on {socket.gethostname()}")

    @staticmethod
    def _owner(fd: int) -> str:
        """'pid P on HOST' from the lock file, or '' when it is empty (just created)."""
        text = os.pread(fd, 256, 0).decode(errors="replace").split()
        return f"pid {text[0]} on {text[1]}" if len(text) == 2 else ("an unknown process" if text else "")


# The files a run directory of this trainer holds; any of them without a summary.json is not ours.
RUN_FILES = ("config.json", "metrics.csv", "eval.csv", "summary.json", "checkpoint.pt")


def run_status(run_dir: Path, summary: dict) -> str:
    """A run's status from its summary, where "running" is checked against its lock: a run whose
    process died (SIGKILL, a lost node) is "interrupted" (relaunching it resumes it)."""
    status = summary.get("status", "unknown")
    if status == "running" and not RunDirLock(run_dir).held():
        return "interrupted"
    return status


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What a run ran in (versions, device, host, CPU): the trainer's, whose torch is already loaded."""
    import torch
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    from gaf import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "gaf": __version__,
        "git_commit": commit,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "host": socket.gethostname(),
        # On a CPU the numbers depend on it (the convolutions' summation order): reproducing a run needs it.
        "cpu_threads": torch.get_num_threads(),
        # So do the CPU's vector kernels (ATen's dispatch, oneDNN's ISA): results/README.md.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_model": cpu_model(),
        "argv": sys.argv,
    }


def write_summary(path: Path, cfg: RunConfig, state: dict, env: dict, ds, status: str, started: str,
                  **extra) -> dict:
    summary = {
        "status": status,
        "final_val_acc": state["final_val_acc"], "best_val_acc": state["best_val_acc"],
        "iterations": state["iter"], "images_seen": state["images_seen"], "steps_taken": state["steps_taken"],
        "wall_time_s": round(state["elapsed"], 3),
        "images_per_s": state["images_seen"] / state["train_time"] if state["train_time"] > 0 else 0.0,
        "train_time_s": round(state["train_time"], 3),  # the loop's wall time, validation excluded
        "device": env["device"], "device_name": env["device_name"], "versions": env,
        "data_note": ds.note, "data_used": ds.name, "num_classes": ds.num_classes,  # what ran (may be a substitute)
        "scale": cfg.scale, "experiment": cfg.experiment,
        "started_at": started,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds") if status != "running" else None,
        **extra,
        "config": cfg.to_dict(),
    }
    write_json(path, summary)
    return summary
