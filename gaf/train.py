"""One training run, baseline or GAF: loop, validation, metrics, checkpoint/resume.

``run(cfg, run_dir)`` takes a plain ``RunConfig`` dataclass (no Hydra object) and a
directory. It writes, next to each other:

- ``config.json``   the resolved config;
- ``metrics.csv``   one row per iteration: loss, accuracy, every micro-gradient
                    distance (d1..d{n-1}), accepted, stepped, lr, tau;
- ``eval.csv``      one row per validation: train/val loss and accuracy, and the
                    memorisation probe (accuracy on clean vs. flipped training samples);
- ``summary.json``  status, final/best val accuracy, images seen, wall time, device,
                    versions and the config;
- ``checkpoint.pt`` model, optimizer, scheduler, sampler and RNG states, written
                    atomically at every validation.

Re-using a run directory resumes from its checkpoint; a finished run is a no-op.
The step itself is a *stepper* (see ``make_stepper``): ``stepper(xs, ys)`` takes n
microbatches as one (n, b, C, H, W) tensor and returns device tensors, so the fast
path (``gaf.fast``) and the distributed path (``gaf.distributed``) plug in here.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from gaf import data as gdata
from gaf.distributed import MODES as DIST_MODES
from gaf.distributed import (DistributedGAFStep, DistributedMeanStep, check_replicas, init_from_env,
                             local_slice, shutdown)
from gaf.fast import OPTIMIZERS, FastGAFStep, FastPlainStep
from gaf.fast import build_optimizer as build_named_optimizer
from gaf.filter import AdaptiveTau, check_merge, check_tau
from gaf.models import build_model
from gaf.step import gaf_step, unfiltered_stats

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- config


@dataclass
class DataConfig:
    name: str = "cifar100"  # cifar100 | cifar100n | cifar10 | cifar10_jpeg | random
    root: str = "data"  # a folder (CIFAR) or the .tar.gz of the JPEG copy
    label_file: str | None = None  # CIFAR-100N: CIFAR-100_human.pt
    noise: float = 0.0  # symmetric label noise rate p in [0, 1)
    download: bool = False
    fallback: str | None = None  # where CIFAR-100 is missing: cifar10_jpeg | random (said in the note)
    jpeg_path: str | None = None  # the JPEG copy, for the cifar10_jpeg fallback
    train_per_class: int | None = None  # class-balanced subsets, for small scales
    test_per_class: int | None = None
    random_train: int = 5000  # random data (figure 5)
    random_test: int = 1000
    num_classes: int | None = None  # random data only


@dataclass
class ModelConfig:
    name: str = "resnet18"


@dataclass
class MethodConfig:
    name: str = "gaf"  # gaf | baseline
    tau: float = 0.97
    n_micro: int = 2  # n: microbatches per step
    per_class: int = 1  # m: images per class per microbatch
    merge: str = "halving"  # halving (authors' package) | mean (their multi-GPU script)
    replacement: bool = False  # sample microbatches with replacement when classes are small
    adaptive_k: float | None = None  # set: tau_t = min(tau, mean + k*std of recent distances)
    adaptive_window: int = 200
    batch_size: int = 128  # baseline batch (class-balanced + random fill)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    plateau_factor: float = 0.1  # ReduceLROnPlateau on validation loss, stepped per validation
    plateau_patience: int = 100


@dataclass
class LoopConfig:
    iterations: int = 1000
    val_every: int = 100
    eval_batch_size: int = 1000
    memorisation_samples: int = 10000  # training samples probed for memorisation at each validation
    fast: bool | None = None  # the fused GPU path; None = on when the device is CUDA
    amp: bool = False  # bf16 autocast on CUDA (fast path)
    compile: str = "none"  # fast path on CUDA: none | graph (capture the step) | full (torch.compile, then capture)
    batched: bool = False  # fast path: all micro-gradients in one torch.func.vmap pass instead of n passes
    progress: bool | None = None  # tqdm; None = only on a terminal and not in CI
    stop_after: int | None = None  # stop (as if killed) after this iteration: tests, time-limited jobs


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "gaf"


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    distributed: bool = False
    dist_mode: str = "gram"  # gram (shards + Gram all-reduce) | allgather (the authors' script)
    experiment: str = "single"
    scale: str = "paper"

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Build from a nested dict; an unknown key is an error naming it."""
        return _from_dict(cls, d, "")

    def to_dict(self) -> dict:
        """Plain JSON types (tuples become lists), so it compares equal to what was saved."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _from_dict(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                         f"allowed under {prefix.rstrip('.') or '<root>'}: {sorted(fields)}")
    kwargs = {}
    for k, v in d.items():
        sub = fields[k].default_factory if fields[k].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[k] = _from_dict(sub, v, f"{prefix}{k}.")
        elif k == "betas" and v is not None:
            kwargs[k] = tuple(v)
        else:
            kwargs[k] = v
    return cls(**kwargs)


# train.compile -> FastGAFStep's compile argument.
COMPILE_MODES = {"none": False, "graph": "graph", "full": True}

# How a run is driven, not what it computes: changing these between launches of one run
# directory is allowed (e.g. resume a run stopped by train.stop_after, without a progress bar).
OPERATIONAL_KEYS = {"train": ("stop_after", "progress"), "wandb": ("mode", "project")}


def same_run(a: dict | None, b: dict) -> bool:
    """Whether two config dicts describe the same computation (operational keys aside)."""
    if a is None:
        return False

    def strip(c: dict) -> dict:
        c = dict(c)
        for section, keys in OPERATIONAL_KEYS.items():
            c[section] = {k: v for k, v in c.get(section, {}).items() if k not in keys}
        return c

    return strip(a) == strip(b)


def validate(cfg: RunConfig) -> None:
    """Reject bad settings up front, each with one clear message."""
    m, d, o, t = cfg.method, cfg.data, cfg.optim, cfg.train
    if m.name not in ("gaf", "baseline"):
        raise ValueError(f"method.name must be 'gaf' or 'baseline', got {m.name!r}")
    check_tau(m.tau)
    check_merge(m.merge)
    if m.name == "gaf" and not (isinstance(m.n_micro, int) and m.n_micro >= 2):
        raise ValueError(f"method.n_micro must be an integer >= 2, got {m.n_micro!r}")
    if m.name == "gaf" and not (isinstance(m.per_class, int) and m.per_class >= 1):
        raise ValueError(f"method.per_class must be an integer >= 1, got {m.per_class!r}")
    if m.name == "baseline" and not (isinstance(m.batch_size, int) and m.batch_size >= 1):
        raise ValueError(f"method.batch_size must be an integer >= 1, got {m.batch_size!r}")
    if not (0.0 <= d.noise < 1.0):
        raise ValueError(f"data.noise must lie in [0, 1), got {d.noise}")
    if o.name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {o.name!r}")
    if o.name == "sgd" and o.nesterov and not o.momentum > 0:
        raise ValueError(f"optim.nesterov=true needs optim.momentum > 0, got momentum={o.momentum}")
    if not (o.lr > 0):
        raise ValueError(f"optim.lr must be > 0, got {o.lr}")
    if not (isinstance(t.iterations, int) and t.iterations >= 1):
        raise ValueError(f"train.iterations must be an integer >= 1, got {t.iterations!r}")
    if not (isinstance(t.val_every, int) and t.val_every >= 1):
        raise ValueError(f"train.val_every must be an integer >= 1, got {t.val_every!r}")
    if cfg.wandb.mode not in ("disabled", "offline", "online"):
        raise ValueError(f"wandb.mode must be disabled, offline or online, got {cfg.wandb.mode!r}")
    if t.compile not in COMPILE_MODES:
        raise ValueError(f"train.compile must be one of {', '.join(COMPILE_MODES)}, got {t.compile!r}")
    if t.compile != "none" and not str(cfg.device).startswith(("cuda", "auto")):
        raise ValueError(f"train.compile={t.compile} captures a CUDA graph; it needs device=cuda, got {cfg.device!r}")
    if cfg.dist_mode not in DIST_MODES:
        raise ValueError(f"dist_mode must be one of {', '.join(DIST_MODES)}, got {cfg.dist_mode!r}")
    if cfg.scale not in ("tiny", "small", "paper"):
        raise ValueError(f"scale must be tiny, small or paper, got {cfg.scale!r}")


# ----------------------------------------------------------------------------- steppers


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn) -> Callable:
    """The baseline: one forward/backward over the whole batch and an optimizer step."""

    def step(xs: torch.Tensor, ys: torch.Tensor) -> dict:
        x, y = xs.flatten(0, 1), ys.flatten()
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        optimizer.step()
        return unfiltered_stats(loss, (out.detach().argmax(1) == y).sum())

    return step


def reference_step(model, optimizer, loss_fn, tau, merge) -> Callable:
    """GAF through the readable ``gaf_step`` (host syncs; the reference semantics)."""

    def step(xs: torch.Tensor, ys: torch.Tensor) -> dict:
        threshold = float(tau.current()) if isinstance(tau, AdaptiveTau) else tau
        out = gaf_step(model, optimizer, loss_fn, list(zip(xs, ys)), tau, merge)
        dev = xs.device
        return {
            "loss": torch.tensor(out["loss"], device=dev),
            "correct": torch.tensor(round(out["accuracy"] * ys.numel()), device=dev),
            "distances": torch.tensor(out["distances"], device=dev),
            "accepted": torch.tensor(out["accepted"], device=dev),
            "stepped": torch.tensor(out["stepped"], device=dev),
            "tau": torch.tensor(threshold, dtype=torch.float32, device=dev),
        }

    return step


def build_optimizer(cfg: OptimConfig, params, masked: bool = False) -> torch.optim.Optimizer:
    """torch.optim's SGD/Adam/AdamW, or (fast path) their masked twins that apply a skipped
    step as a mask on the device."""
    return build_named_optimizer(cfg.name, params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                 weight_decay=cfg.weight_decay, betas=cfg.betas, masked=masked)


def make_stepper(cfg: RunConfig, model, optimizer, loss_fn, tau, fast: bool) -> Callable:
    """The baseline steps plainly. Averaging with measured distances (figures 1, 4, 5) is
    GAF at tau = 2 with the mean merge, which accepts everything (tested)."""
    if cfg.distributed:
        if cfg.method.name == "baseline":  # every rank a slice of the batch, one all-reduce
            return DistributedMeanStep(model, optimizer, loss_fn)
        return DistributedGAFStep(model, optimizer, loss_fn, tau, cfg.method.merge, mode=cfg.dist_mode)
    if fast:
        options = dict(amp_dtype=torch.bfloat16 if cfg.train.amp else None, channels_last=cfg.train.amp,
                       compile=COMPILE_MODES[cfg.train.compile])
        if cfg.method.name == "baseline":
            return FastPlainStep(model, optimizer, loss_fn, **options)
        return FastGAFStep(model, optimizer, loss_fn, tau, cfg.method.merge, batched=cfg.train.batched, **options)
    if cfg.method.name == "baseline":
        return plain_step(model, optimizer, loss_fn)
    return reference_step(model, optimizer, loss_fn, tau, cfg.method.merge)


# ----------------------------------------------------------------------------- files


class CsvLog:
    """Append-only CSV with a fixed header, truncatable to the rows before a checkpoint."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(rows)

    def truncate_after(self, iteration: int) -> None:
        """Drop rows written after ``iteration`` (they are recomputed on resume)."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["iter"]) <= iteration]
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read."""


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file: say which, and what to do
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e}); "
                           "delete it to restart this run from scratch") from None


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import torchvision

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
        "argv": sys.argv,
    }


# ----------------------------------------------------------------------------- data


def load_data(cfg: RunConfig) -> gdata.ImageDataset:
    d = cfg.data
    return gdata.load_dataset(
        d.name, d.root, label_file=d.label_file, noise=d.noise, seed=cfg.seed, download=d.download,
        fallback=d.fallback, jpeg_path=d.jpeg_path, train_per_class=d.train_per_class,
        test_per_class=d.test_per_class, random_size=(d.random_train, d.random_test), num_classes=d.num_classes,
    )


def make_sampler(cfg: RunConfig, ds: gdata.ImageDataset):
    m = cfg.method
    # The paper balances on clean labels under synthetic noise and on the human (noisy)
    # labels for CIFAR-100N, where no clean labels would be known in practice.
    labels = ds.train_y if cfg.data.name == "cifar100n" else ds.clean_y
    if m.name == "gaf":
        return gdata.ClassBalancedSampler(labels, ds.num_classes, m.per_class, m.n_micro, cfg.seed,
                                          replacement=m.replacement)
    return gdata.BatchSampler(labels, ds.num_classes, m.batch_size, cfg.seed)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ds, batch_size: int) -> tuple[float, torch.Tensor]:
    """Mean loss and predictions over uint8 images ``x`` (no augmentation)."""
    model.eval()
    loss_sum, preds = 0.0, []
    for i in range(0, len(x), batch_size):
        xb = gdata.normalize(x[i : i + batch_size], ds.mean, ds.std)
        out = model(xb).float()
        loss_sum += float(F.cross_entropy(out, y[i : i + batch_size], reduction="sum"))
        preds.append(out.argmax(1))
    model.train()
    return loss_sum / max(len(x), 1), torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def is_finite(model: nn.Module) -> bool:
    """Every floating parameter and buffer finite (one host sync)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _acc(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else float("nan")


# ----------------------------------------------------------------------------- the run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} asked for, but CUDA is not available here; use device=cpu or auto")
    return dev


def run(cfg: RunConfig, run_dir: str | os.PathLike) -> dict:
    """Train one run into ``run_dir``; resume if it holds a checkpoint; no-op if finished.

    Under torchrun (``cfg.distributed``) every rank calls this with the same config and
    directory (on a file system all ranks see); only rank 0 writes files.
    """
    validate(cfg)
    if not cfg.distributed:
        return _run(cfg, Path(run_dir), 0, 1, resolve_device(cfg.device))
    rank, world, _, device = init_from_env()
    try:
        split, what = ((cfg.method.n_micro, "method.n_micro") if cfg.method.name == "gaf"
                       else (cfg.method.batch_size, "method.batch_size"))
        if split % world:
            raise ValueError(f"{what}={split} must be a multiple of the number of ranks ({world}): "
                             "every rank takes an equal share of each step")
        return _run(cfg, Path(run_dir), rank, world, device)
    finally:
        shutdown()


def _run(cfg: RunConfig, run_dir: Path, rank: int, world: int, device: torch.device) -> dict:
    is_main = rank == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path, ckpt_path = run_dir / "summary.json", run_dir / "checkpoint.pt"
    config = cfg.to_dict()
    if summary_path.exists():
        previous = json.loads(summary_path.read_text())
        if previous.get("status") in ("finished", "diverged") and same_run(previous.get("config"), config):
            log.info("%s: already %s; nothing to do", run_dir, previous["status"])
            return previous
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if ckpt is not None and not same_run(ckpt["config"], config):
        raise ValueError(f"run directory {run_dir} holds a checkpoint of a different config; "
                         "use a fresh directory or delete checkpoint.pt")

    torch.manual_seed(cfg.seed)
    ds = load_data(cfg).to(device)
    sampler = make_sampler(cfg, ds)
    model = build_model(cfg.model.name, ds.num_classes).to(device)
    fast = cfg.train.fast if cfg.train.fast is not None else device.type == "cuda"
    fast = fast and not cfg.distributed
    optimizer = build_optimizer(cfg.optim, model.parameters(), masked=fast)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.optim.plateau_factor, patience=cfg.optim.plateau_patience)
    m = cfg.method
    tau: float | AdaptiveTau = (AdaptiveTau(m.tau, m.adaptive_k, m.adaptive_window)
                                if m.adaptive_k is not None else m.tau)
    loss_fn = nn.CrossEntropyLoss()
    stepper = make_stepper(cfg, model, optimizer, loss_fn, tau, fast)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    # A fixed random subset of the training set, probed at every validation for memorisation.
    probe = torch.randperm(len(ds.train_y), generator=torch.Generator().manual_seed(cfg.seed + 2))
    probe = probe[: cfg.train.memorisation_samples].to(device)
    probe_x, probe_y = ds.train_x[probe], ds.train_y[probe]
    probe_true, probe_flipped = ds.clean_y[probe], ds.flipped[probe]

    n_dist = m.n_micro - 1 if m.name == "gaf" else 0
    metrics = CsvLog(run_dir / "metrics.csv", ["iter", "images_seen", "loss", "acc", "tau", "accepted", "stepped",
                                               "lr", "d_mean"] + [f"d{k}" for k in range(1, n_dist + 1)] + ["time_s"])
    evals = CsvLog(run_dir / "eval.csv", ["iter", "epoch", "images_seen", "lr", "train_loss", "train_acc",
                                          "val_loss", "val_acc", "mem_clean_acc", "mem_flipped_noisy_acc",
                                          "mem_flipped_true_acc", "time_s"])
    state = {"iter": 0, "images_seen": 0, "steps_taken": 0, "best_val_acc": float("nan"),
             "final_val_acc": float("nan"), "elapsed": 0.0, "train_time": 0.0}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        sampler.load_state_dict(ckpt["sampler"])
        aug_gen.set_state(ckpt["aug_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        if isinstance(tau, AdaptiveTau):
            tau.load_state_dict(ckpt["adaptive_tau"])
        state.update(ckpt["state"])
        if is_main:
            metrics.truncate_after(state["iter"])
            evals.truncate_after(state["iter"])
            log.info("%s: resuming at iteration %d", run_dir, state["iter"])
    elif is_main:
        for p in (metrics.path, evals.path):
            p.unlink(missing_ok=True)
    env = environment(device)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if is_main:
        write_json(run_dir / "config.json", config)
        write_summary(summary_path, cfg, state, env, ds, "running", started)
    logger = WandbLogger(cfg, run_dir, config) if is_main else None

    pending: list[tuple[int, int, dict]] = []  # (iter, images_seen, device tensors) not yet written
    since_eval: list[dict] = []
    status = "running"

    def flush() -> bool:
        """Write pending metrics rows (one host sync); False if the loss went non-finite."""
        if not pending:
            return True
        stacked = {k: torch.stack([torch.as_tensor(p[2][k]).float().reshape(-1) for p in pending]).cpu()
                   for k in ("loss", "correct", "accepted", "stepped", "tau")}
        dists = torch.stack([p[2]["distances"].float() for p in pending]).cpu() if n_dist else None
        rows = []
        for j, (it, seen, out) in enumerate(pending):
            row = {"iter": it, "images_seen": seen, "loss": float(stacked["loss"][j]),
                   "acc": float(stacked["correct"][j]) / out["batch"], "tau": round(float(stacked["tau"][j]), 6),
                   "accepted": int(stacked["accepted"][j]), "stepped": int(stacked["stepped"][j]),
                   "lr": out["lr"], "time_s": round(out["time"], 3)}
            if n_dist:
                row["d_mean"] = float(dists[j].mean())
                row.update({f"d{k}": float(dists[j, k - 1]) for k in range(1, n_dist + 1)})
            rows.append(row)
        pending.clear()
        since_eval.extend(rows)
        state["steps_taken"] += sum(r["stepped"] for r in rows)
        if is_main:
            metrics.append(rows)
            if logger:
                for r in rows:
                    logger.log(r, step=r["iter"])
        bad = [r["iter"] for r in rows if not math.isfinite(r["loss"])]
        if bad:
            log.error("%s: non-finite training loss at iteration %d; stopping. The last good checkpoint "
                      "(iteration %d) is kept.", run_dir, bad[0], state["iter"])
            return False
        return True

    def validate_and_checkpoint(it: int) -> bool:
        """Evaluate and checkpoint; False (and no checkpoint) if the model went non-finite."""
        val_loss, preds = evaluate(model, ds.test_x, ds.test_y, ds, cfg.train.eval_batch_size)
        if not (math.isfinite(val_loss) and is_finite(model)):
            log.error("%s: non-finite validation loss or weights at iteration %d; stopping. The last good "
                      "checkpoint (iteration %d) is kept.", run_dir, it, state["iter"])
            return False
        val_acc = _acc(preds == ds.test_y)
        _, probe_preds = evaluate(model, probe_x, probe_y, ds, cfg.train.eval_batch_size)
        scheduler.step(val_loss)
        row = {
            "iter": it, "epoch": round(state["images_seen"] / len(ds.train_y), 4), "images_seen": state["images_seen"],
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": sum(r["loss"] for r in since_eval) / max(len(since_eval), 1),
            "train_acc": sum(r["acc"] for r in since_eval) / max(len(since_eval), 1),
            "val_loss": val_loss, "val_acc": val_acc,
            "mem_clean_acc": _acc((probe_preds == probe_y)[~probe_flipped]),
            "mem_flipped_noisy_acc": _acc((probe_preds == probe_y)[probe_flipped]),
            "mem_flipped_true_acc": _acc((probe_preds == probe_true)[probe_flipped]),
            "time_s": round(state["elapsed"] + time.perf_counter() - t_start, 3),
        }
        since_eval.clear()
        state["final_val_acc"] = val_acc
        state["best_val_acc"] = val_acc if math.isnan(state["best_val_acc"]) else max(state["best_val_acc"], val_acc)
        if cfg.distributed:
            check_replicas(model)
        if is_main:
            evals.append([row])
            if logger:
                logger.log({f"eval/{k}": v for k, v in row.items()}, step=it)
            save_checkpoint(ckpt_path, {
                "config": config, "state": {**state, "iter": it, "elapsed": row["time_s"]},
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
                "aug_rng": aug_gen.get_state(), "torch_rng": torch.get_rng_state(),
                "adaptive_tau": tau.state_dict() if isinstance(tau, AdaptiveTau) else None,
            })
        return True

    t_start = time.perf_counter()
    start_iter = state["iter"]
    progress = _progress(cfg, start_iter, is_main)
    model.train()
    for it in range(start_iter + 1, cfg.train.iterations + 1):
        t0 = time.perf_counter()
        idx = sampler.sample().to(device, non_blocking=True)  # (n, b)
        x = gdata.augment(ds.train_x[idx.flatten()], aug_gen)
        xs = gdata.normalize(x, ds.mean, ds.std).unflatten(0, idx.shape)
        ys = ds.train_y[idx]
        if cfg.distributed:  # every rank drew the same global step; it takes its rows
            if cfg.method.name == "baseline":  # (1, B) -> (world, B / world)
                xs, ys = xs.unflatten(1, (world, -1))[0], ys.unflatten(1, (world, -1))[0]
            xs, ys = local_slice(xs, rank, world), local_slice(ys, rank, world)
        out = stepper(xs, ys)
        out["lr"] = optimizer.param_groups[0]["lr"]
        out["batch"], out["time"] = idx.numel(), state["elapsed"] + time.perf_counter() - t_start
        state["images_seen"] += idx.numel()
        state["train_time"] += time.perf_counter() - t0
        pending.append((it, state["images_seen"], out))
        progress.update(1)
        at_eval = it % cfg.train.val_every == 0 or it == cfg.train.iterations
        if at_eval or len(pending) >= 100:
            if not flush():
                status = "diverged"
                break
        if at_eval:
            if not validate_and_checkpoint(it):
                status = "diverged"
                break
            state["iter"] = it  # the last checkpointed iteration
            progress.set_postfix(val_acc=f"{state['final_val_acc']:.3f}")
        if cfg.train.stop_after is not None and it >= cfg.train.stop_after:
            progress.close()
            log.info("%s: stopped after iteration %d (train.stop_after)", run_dir, it)
            return {"status": "stopped", "iter": it}
    else:
        status = "finished"
    progress.close()
    state["elapsed"] += time.perf_counter() - t_start
    if logger:
        logger.finish()
    summary = write_summary(summary_path, cfg, state, env, ds, status, started) if is_main else {"status": status}
    if is_main:
        log.info("%s: %s; best val acc %.4f, %.0f images/s", run_dir, status, state["best_val_acc"],
                 summary.get("images_per_s", 0))
    return summary


def write_summary(path: Path, cfg: RunConfig, state: dict, env: dict, ds, status: str, started: str) -> dict:
    summary = {
        "status": status,
        "final_val_acc": state["final_val_acc"], "best_val_acc": state["best_val_acc"],
        "iterations": state["iter"], "images_seen": state["images_seen"], "steps_taken": state["steps_taken"],
        "wall_time_s": round(state["elapsed"], 3),
        "images_per_s": state["images_seen"] / state["train_time"] if state["train_time"] > 0 else 0.0,
        "device": env["device"], "device_name": env["device_name"], "versions": env,
        "data_note": ds.note, "scale": cfg.scale, "experiment": cfg.experiment,
        "started_at": started,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds") if status != "running" else None,
        "config": cfg.to_dict(),
    }
    write_json(path, summary)
    return summary


def _progress(cfg: RunConfig, start: int, is_main: bool):
    from tqdm.auto import tqdm

    show = cfg.train.progress
    if show is None:
        show = sys.stderr.isatty() and not os.environ.get("CI")
    return tqdm(total=cfg.train.iterations, initial=start, disable=not (show and is_main), desc=cfg.experiment,
                dynamic_ncols=True)


class WandbLogger:
    """wandb, when asked for: offline by default, never a login prompt."""

    def __init__(self, cfg: RunConfig, run_dir: Path, config: dict):
        self.run = None
        if cfg.wandb.mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            raise ValueError(f"wandb.mode={cfg.wandb.mode} needs wandb: pip install 'gaf[wandb]', "
                             "or set wandb.mode=disabled") from None
        os.environ.setdefault("WANDB_SILENT", "true")
        run_id = "".join(c if c.isalnum() else "-" for c in str(run_dir.resolve()))[-64:]
        self.run = wandb.init(project=cfg.wandb.project, mode=cfg.wandb.mode, dir=str(run_dir), config=config,
                              id=run_id, resume="allow", name=run_dir.name)

    def log(self, row: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(row, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
