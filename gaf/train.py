"""One training run, baseline or GAF: build the data, model and stepper, then the loop.

``run(cfg, run_dir)`` takes a plain ``RunConfig`` dataclass (``gaf.config``; no Hydra
object) and a directory, and writes the run directory's files (``gaf.rundir``, ``gaf.checkpoint``):
``config.json``, ``metrics.csv`` (one row per iteration: loss, accuracy, every
micro-gradient distance d1..d{n-1}, accepted, stepped, lr, tau), ``eval.csv`` (one row per
validation: train/val loss and accuracy, and the memorisation probe), ``summary.json`` and
``checkpoint.pt`` (written atomically at every validation).

Re-using a run directory resumes from its checkpoint; a finished run is a no-op.
The step itself is a *stepper* (``gaf.steppers.make_stepper``): ``stepper(xs, ys)`` takes
n microbatches as one (n, b, C, H, W) tensor and returns ``gaf.step.StepStats`` (device
tensors), so the readable, fast and distributed paths plug in alike. The process the run
trains in (rank, device, SIGTERM, progress bar) is ``gaf.process``'s; its clocks, ``gaf.clock``'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from gaf import data as gdata
from gaf.augment import augment, normalize
from gaf.checkpoint import CheckpointError, prior_run, save_checkpoint
from gaf.clock import RunClock
from gaf.config import RunConfig, RunPlan, class_size_error, resolve, threshold_of, validate
from gaf.datasets import DATA_SETS
from gaf.methods import METHODS
from gaf.distributed import check_replicas
from gaf.evaluation import MemorisationProbe, accuracy, evaluate, is_finite
from gaf.models import build_model
from gaf.samplers import BatchSampler, ClassBalancedSampler
from gaf.log import CsvLog, WandbLogger
from gaf.process import check_shares, progress_bar, sigterm_stops, this_process
from gaf.rundir import RunDirError, RunDirLock, environment, write_json, write_summary
from gaf.step import StepStats
from gaf.steppers import build_optimizer, build_schedule, make_coteaching, make_loss, make_stepper
from gaf.threshold import build_threshold
from gaf.torchrun import local_slice

__all__ = ["CheckpointError", "RunConfig", "RunDirError", "run", "validate"]

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- data


def load_data(cfg: RunConfig) -> gdata.ImageDataset:
    d = cfg.data
    if d.root is not None and not Path(d.root).is_dir():  # never a silent fall back to other sources
        raise gdata.DataError(f"data.root={d.root} is not a folder; create it (data sets are downloaded into it) "
                              "or leave data.root unset (data/ in the repository)")
    return gdata.load_dataset(
        d.name, d.root, label_file=d.label_file, noise=d.noise, seed=cfg.seed, download=d.download,
        fallback=d.fallback, fallback_when=d.fallback_when, jpeg_path=d.jpeg_path, train_per_class=d.train_per_class,
        test_per_class=d.test_per_class, random_size=(d.random_train, d.random_test), num_classes=d.num_classes,
    )


def make_sampler(cfg: RunConfig, ds: gdata.ImageDataset):
    m = cfg.method
    # The paper balances on clean labels under synthetic noise and on the human (noisy)
    # labels for CIFAR-100N, where no clean labels would be known in practice.
    labels = ds.train_y if DATA_SETS[cfg.data.name].human_labels else ds.clean_y
    smallest = int(torch.bincount(labels.cpu(), minlength=ds.num_classes).min())
    if METHODS[m.name].microbatches:
        if error := class_size_error(cfg, smallest, f"in its smallest class ({ds.name})"):
            raise gdata.DataError(error)  # the sampler's own check, in the run's keys
        return ClassBalancedSampler(labels, ds.num_classes, m.per_class, m.n_micro, cfg.seed,
                                    replacement=m.replacement)
    if smallest < m.batch_size // ds.num_classes:  # the batch's balanced part: batch_size // classes of each
        raise gdata.DataError(
            f"method.batch_size={m.batch_size} takes {m.batch_size // ds.num_classes} image(s) of each of "
            f"{ds.num_classes} classes per batch, but the smallest class of {ds.name} has {smallest}"
            f"{' (by its human labels)' if DATA_SETS[cfg.data.name].human_labels else ''}; use method.batch_size <= "
            f"{(smallest + 1) * ds.num_classes - 1}, or more images per class (data.train_per_class)")
    return BatchSampler(labels, ds.num_classes, m.batch_size, cfg.seed)


def draw_batch(sampler, ds: gdata.ImageDataset, generator: torch.Generator, device: torch.device):
    """The next step's images (n, b, C, H, W), augmented and normalised on ``device``, and labels.

    The sampler draws indices on the host; on CUDA they travel through pinned memory
    (``pin_memory`` takes a block the caching host allocator frees only once the copy
    has run), so the copy is asynchronous and the host never waits for the GPU."""
    idx = sampler.sample()  # (n, b)
    if device.type == "cuda":
        idx = idx.pin_memory()
    idx = idx.to(device, non_blocking=True)
    x = augment(ds.train_x[idx.flatten()], generator)
    return normalize(x, ds.mean, ds.std).unflatten(0, idx.shape), ds.train_y[idx]


# ----------------------------------------------------------------------------- the run


def run(cfg: RunConfig, run_dir: str | os.PathLike) -> dict:
    """Train one run into ``run_dir``; resume if it holds a checkpoint; no-op if finished.

    Under torchrun (``cfg.distributed``) every rank calls this with the same config and
    directory (on a file system all ranks see); only rank 0 writes files.
    """
    validate(cfg)
    run_dir = Path(run_dir)
    with this_process(cfg) as (rank, world, device):
        plan = resolve(cfg, device.type)
        check_shares(cfg, world)
        run_dir.mkdir(parents=True, exist_ok=True)
        with RunDirLock(run_dir) if rank == 0 else contextlib.nullcontext():  # rank 0 writes the files
            summary, ckpt = prior_run(run_dir, cfg.to_dict())
            if (done := nothing_to_do(cfg, run_dir, summary, ckpt)) is not None:
                return done
            trainer = Trainer(cfg, run_dir, rank, world, device, plan)
            if ckpt is not None:
                trainer.restore(ckpt)
            elif trainer.is_main:  # a fresh start: no rows of an attempt that never checkpointed
                for p in (trainer.metrics.path, trainer.evals.path):
                    p.unlink(missing_ok=True)
            with sigterm_stops(trainer):
                return trainer.run()


def nothing_to_do(cfg: RunConfig, run_dir: Path, summary: dict | None, ckpt: dict | None) -> dict | None:
    """The summary of a run that must not train (finished, diverged, or its ``train.stop_after`` already
    reached), said in the log; None where it trains."""
    if summary is not None and summary.get("status") in ("finished", "diverged"):
        log.info("%s: already %s; nothing to do", run_dir, summary["status"])
        return summary
    if (reached := stop_reached(cfg, summary, ckpt)) is not None:
        log.info("%s: train.stop_after=%d already reached (iteration %d); nothing to do: relaunch without it, "
                 "or with a larger value, to go on", run_dir, cfg.train.stop_after, reached)
        return summary or {"status": "stopped", "iterations": reached, "resumes_from": reached}
    return None


def stop_reached(cfg: RunConfig, summary: dict | None, ckpt: dict | None) -> int | None:
    """The iteration at which an earlier launch already reached ``train.stop_after`` (a relaunch would
    recompute the iterations after its checkpoint and stop again), or None."""
    stop = cfg.train.stop_after
    if stop is None:
        return None
    done = max(ckpt["state"]["iter"] if ckpt is not None else 0,
               summary.get("iterations", 0) if summary is not None and summary.get("status") == "stopped" else 0)
    return done if done >= stop else None


@dataclass
class StepRecord:
    """One step as the trainer holds it until a flush: the stepper's stats (device tensors)
    and the trainer's own bookkeeping."""

    iter: int
    images_seen: int
    lr: float
    time_s: float  # wall time when the step was issued (on CUDA the GPU may still be running it)
    stats: StepStats


METRICS_COLUMNS = ["iter", "images_seen", "loss", "acc", "tau", "accepted", "stepped", "lr", "d_mean"]
EVAL_COLUMNS = ["iter", "epoch", "images_seen", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                "mem_clean_acc", "mem_flipped_noisy_acc", "mem_flipped_true_acc", "time_s"]


class Trainer:
    """One run's data, model, optimizer, stepper and counters; ``run()`` runs the loop
    from wherever ``state`` stands (0, or a restored checkpoint) and writes the files."""

    def __init__(self, cfg: RunConfig, run_dir: Path, rank: int, world: int, device: torch.device, plan: RunPlan):
        self.cfg, self.run_dir, self.rank, self.world, self.device, self.plan = cfg, run_dir, rank, world, device, plan
        self.is_main = rank == 0
        self.summary_path, self.ckpt_path = run_dir / "summary.json", run_dir / "checkpoint.pt"
        torch.manual_seed(cfg.seed)
        if device.type == "cuda":  # fixed shapes: cuDNN picks the fastest convolutions once
            torch.backends.cudnn.benchmark = True
        self.ds = load_data(cfg).to(device)
        self.sampler = make_sampler(cfg, self.ds)
        self.model = build_model(cfg.model.name, self.ds.num_classes, width=cfg.model.width,
                                 blocks=cfg.model.blocks).to(device)
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters(), masked=plan.fast)
        self.schedule = build_schedule(cfg, self.optimizer)  # sets the lr: before each step, after each validation
        m = cfg.method
        self.threshold = build_threshold(*threshold_of(cfg))  # GAF's tau (a baseline's is unused)
        self.stepper = (make_coteaching(cfg, self.model, self.optimizer, self.ds) if METHODS[m.name].peer else
                        make_stepper(cfg, self.model, self.optimizer, make_loss(cfg, self.ds.num_classes),
                                     self.threshold, plan))
        self.aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        self.probe = MemorisationProbe.draw(self.ds, cfg.train.memorisation_samples, cfg.seed + 2, device)
        self.n_dist = m.n_micro - 1 if METHODS[m.name].microbatches else 0
        self.distance_keys = [f"d{k}" for k in range(1, self.n_dist + 1)]
        self.metrics = CsvLog(run_dir / "metrics.csv",
                              METRICS_COLUMNS + self.distance_keys + ["time_s"])
        self.evals = CsvLog(run_dir / "eval.csv", EVAL_COLUMNS)
        self.state = {"iter": 0, "images_seen": 0, "steps_taken": 0, "best_val_acc": float("nan"),
                      "final_val_acc": float("nan")}
        self.clock = RunClock()
        self.pending: list[StepRecord] = []  # steps not yet written
        self.since_eval: list[dict] = []  # metrics rows since the last validation
        self.logger: WandbLogger | None = None
        self.terminated = False  # SIGTERM received: stop after this step (sigterm_stops)

    def _state(self, **overrides) -> dict:
        """The counters and the clock's times, as checkpoints and summaries hold them."""
        return {**self.state, **self.clock.state_dict(), **overrides}

    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint; rows written after it are dropped (they are recomputed)."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["scheduler"])
        self.sampler.load_state_dict(ckpt["sampler"])
        self.aug_gen.set_state(ckpt["aug_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.threshold.load_state_dict(ckpt["adaptive_tau"])  # the threshold's state, under its first scheme's name
        if ckpt.get("stepper") is not None:  # a stepper's own state (co-teaching's peer)
            self.stepper.load_state_dict(ckpt["stepper"])
        self.clock.load_state_dict(ckpt["state"])
        self.since_eval = list(ckpt.get("since_eval") or [])  # a checkpoint between validations (SIGTERM)
        self.state.update({k: v for k, v in ckpt["state"].items() if k in self.state})
        if self.is_main:
            self.metrics.truncate_after(self.state["iter"])
            self.evals.truncate_after(self.state["iter"])
            log.info("%s: resuming at iteration %d", self.run_dir, self.state["iter"])

    def run(self) -> dict:
        """The loop, then the summary: finished, diverged, or stopped (train.stop_after)."""
        self.begin()
        status, last = self._loop()
        return self.end(status, last)

    def begin(self) -> None:
        """Before the loop: the summary (status running), config.json, the wandb logger."""
        self._env = environment(self.device)
        self._started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if self.is_main:  # the summary first: a run directory with files but no summary is not a run's
            write_summary(self.summary_path, self.cfg, self._state(), self._env, self.ds, "running", self._started)
            write_json(self.run_dir / "config.json", self.cfg.to_dict())
        self.logger = WandbLogger(self.cfg, self.run_dir) if self.is_main else None

    def end(self, status: str, last: int) -> dict:
        """After the loop: the summary of what ran (``last``: the last iteration run)."""
        env, started = self._env, self._started
        self.clock.stop()
        if self.logger:
            self.logger.finish()
        if not self.is_main:
            return {"status": status}
        if status == "stopped":  # what ran, and where a relaunch goes on from
            resume, by = self.state["iter"], "SIGTERM" if self.terminated else "train.stop_after"
            summary = write_summary(self.summary_path, self.cfg, self._state(iter=last), env, self.ds, status,
                                    started, resumes_from=resume, stopped_by=by)
            log.info("%s: stopped after iteration %d (%s); a relaunch resumes from the checkpoint at "
                     "iteration %d", self.run_dir, last, by, resume)
            return summary
        summary = write_summary(self.summary_path, self.cfg, self._state(), env, self.ds, status, started)
        log.info("%s: %s; best val acc %.4f, %.0f images/s", self.run_dir, status, self.state["best_val_acc"],
                 summary.get("images_per_s", 0))
        return summary

    def _loop(self) -> tuple[str, int]:
        """(status, last iteration run): finished, diverged or stopped."""
        cfg, start = self.cfg, self.state["iter"]
        self.clock.start()
        progress = progress_bar(cfg, start, self.is_main)
        self.model.train()
        it = start
        try:
            for it in range(start + 1, cfg.train.iterations + 1):
                self._step(it)
                progress.update(1)
                if status := self.after_step(it, progress):
                    return status, it
            return "finished", it
        finally:
            progress.close()

    def after_step(self, it: int, progress=None) -> str | None:
        """What follows iteration ``it``'s step: a flush, at a validation the validation and the
        checkpoint; "diverged" or "stopped" where the run ends here, else None."""
        cfg = self.cfg
        at_eval = it % cfg.train.val_every == 0 or it == cfg.train.iterations
        if (at_eval or len(self.pending) >= 100) and not self._flush():
            return "diverged"
        if at_eval:
            self.before_validation()
            if not self._validate_and_checkpoint(it):
                return "diverged"
            self.clock.skip()  # validation is not training time
            self.state["iter"] = it  # the last checkpointed iteration
            if progress is not None:
                progress.set_postfix(val_acc=f"{self.state['final_val_acc']:.3f}")
        if self.terminated:
            return self._checkpoint_now(it, at_eval)
        if cfg.train.stop_after is not None and it >= cfg.train.stop_after:
            return "stopped"
        return None

    def _checkpoint_now(self, it: int, at_eval: bool) -> str:
        """Stopped by SIGTERM after iteration ``it``: checkpointed there (unless a validation just was)."""
        if not at_eval:
            if not self._flush():
                return "diverged"
            self.before_validation()
            if self.is_main:
                self._save_checkpoint(it, self.clock.wall())
            self.state["iter"] = it
        return "stopped"

    def before_validation(self) -> None:
        """A hook: the model and optimizer as the step left them (a fused group writes them back)."""
        sync = getattr(self.stepper, "sync_back", None)
        if sync is not None:
            sync()

    def _step(self, it: int) -> None:
        """One training step; its outputs stay on the device in ``pending`` until a flush."""
        cfg, state, world = self.cfg, self.state, self.world
        xs, ys = draw_batch(self.sampler, self.ds, self.aug_gen, self.device)
        images = ys.numel()
        if cfg.distributed:  # every rank drew the same global step; it takes its rows
            if not METHODS[cfg.method.name].microbatches:  # (1, B) -> (world, B / world)
                xs, ys = xs.unflatten(1, (world, -1))[0], ys.unflatten(1, (world, -1))[0]
            xs, ys = local_slice(xs, self.rank, world), local_slice(ys, self.rank, world)
        self.schedule.before_step(it)  # the lr this step uses (and its metrics row shows)
        stats = self.stepper(xs, ys)
        state["images_seen"] += images
        self.pending.append(StepRecord(it, state["images_seen"], self.optimizer.param_groups[0]["lr"],
                                       self.clock.wall(), stats))

    def _pending_rows(self) -> list[dict]:
        """The pending steps as metrics rows (one host sync for all of them)."""
        pending, n_dist = self.pending, self.n_dist
        stacked = {k: torch.stack([getattr(r.stats, k).float().reshape(-1) for r in pending]).cpu()
                   for k in ("loss", "correct", "accepted", "stepped", "tau")}
        dists = torch.stack([r.stats.distances.float() for r in pending]).cpu() if n_dist else None
        rows = []
        for j, r in enumerate(pending):
            row = {"iter": r.iter, "images_seen": r.images_seen, "loss": float(stacked["loss"][j]),
                   "acc": float(stacked["correct"][j]) / r.stats.samples, "tau": round(float(stacked["tau"][j]), 6),
                   "accepted": int(stacked["accepted"][j]), "stepped": int(stacked["stepped"][j]),
                   "lr": r.lr, "time_s": round(r.time_s, 3)}
            if n_dist:
                row["d_mean"] = float(dists[j].mean())
                row.update({f"d{k}": float(dists[j, k - 1]) for k in range(1, n_dist + 1)})
            rows.append(row)
        return rows

    def _flush(self) -> bool:
        """Write pending metrics rows; False if the loss went non-finite."""
        if not self.pending:
            return True
        rows = self._pending_rows()  # waits for the GPU: the time up to here is the steps' real time
        self.clock.count_training()
        self.pending.clear()
        self.since_eval.extend(rows)
        self.state["steps_taken"] += sum(r["stepped"] for r in rows)
        if self.is_main:
            self.metrics.append(rows)
            if self.logger:
                for r in rows:
                    self.logger.log(r, step=r["iter"])
        # A NaN distance means a non-finite micro-gradient (both GAF paths skip that step).
        bad = [r["iter"] for r in rows if not all(math.isfinite(r[k]) for k in ("loss", *self.distance_keys))]
        if bad:
            log.error("%s: non-finite training loss or micro-gradient at iteration %d; stopping. The last good "
                      "checkpoint (iteration %d) is kept.", self.run_dir, bad[0], self.state["iter"])
            return False
        return True

    def _validate_and_checkpoint(self, it: int) -> bool:
        """Evaluate and checkpoint; False (and no checkpoint) if the model went non-finite."""
        ds, batch = self.ds, self.cfg.train.eval_batch_size
        val_loss, preds = evaluate(self.model, ds.test_x, ds.test_y, ds, batch)
        if not (math.isfinite(val_loss) and is_finite(self.model)):
            log.error("%s: non-finite validation loss or weights at iteration %d; stopping. The last good "
                      "checkpoint (iteration %d) is kept.", self.run_dir, it, self.state["iter"])
            return False
        val_acc = accuracy(preds == ds.test_y)
        _, probe_preds = evaluate(self.model, self.probe.x, self.probe.noisy_y, ds, batch)
        self.schedule.after_validation(val_loss)
        row = self._eval_row(it, val_loss, val_acc, probe_preds)
        state = self.state
        state["final_val_acc"] = val_acc
        state["best_val_acc"] = val_acc if math.isnan(state["best_val_acc"]) else max(state["best_val_acc"], val_acc)
        if self.cfg.distributed:
            check_replicas(self.model)
        if self.is_main:
            self.evals.append([row])
            if self.logger:
                self.logger.log({f"eval/{k}": v for k, v in row.items()}, step=it)
            self._save_checkpoint(it, row["time_s"])
            # what a killed run's files hold: its summary counts up to this checkpoint
            write_summary(self.summary_path, self.cfg, self._state(iter=it), self._env, self.ds, "running",
                          self._started)
            log.info("%s: iteration %d/%d: val acc %.4f (best %.4f), flipped labels fitted %.3f, %.0f images/s",
                     self.run_dir, it, self.cfg.train.iterations, val_acc, state["best_val_acc"],
                     row["mem_flipped_noisy_acc"], state["images_seen"] / max(self.clock.training, 1e-9))
        return True

    def _eval_row(self, it: int, val_loss: float, val_acc: float, probe_preds: torch.Tensor) -> dict:
        """One eval.csv row; the train columns average the metrics rows since the last one."""
        since, state = self.since_eval, self.state
        row = {
            "iter": it, "epoch": round(state["images_seen"] / len(self.ds.train_y), 4),
            "images_seen": state["images_seen"], "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": sum(r["loss"] for r in since) / max(len(since), 1),
            "train_acc": sum(r["acc"] for r in since) / max(len(since), 1),
            "val_loss": val_loss, "val_acc": val_acc,
            **self.probe.accuracies(probe_preds),
            "time_s": round(self.clock.wall(), 3),
        }
        since.clear()
        return row

    def _save_checkpoint(self, it: int, elapsed: float) -> None:
        save_checkpoint(self.ckpt_path, {
            "config": self.cfg.to_dict(), "state": self._state(iter=it, elapsed=elapsed),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(), "sampler": self.sampler.state_dict(),
            "aug_rng": self.aug_gen.get_state(), "torch_rng": torch.get_rng_state(),
            "adaptive_tau": self.threshold.state_dict(),  # the threshold's state (gaf.threshold)
            "stepper": self.stepper.state_dict() if hasattr(self.stepper, "state_dict") else None,
            "since_eval": list(self.since_eval),  # the next validation's train means (empty at a validation)
        })

