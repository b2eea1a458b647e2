"""hydra/launcher=fused: a sweep's points trained as fused groups (gaf.fused_train), each an ordinary run.

    python experiments/train.py -m experiment=fig6 hydra/launcher=fused
    python experiments/train.py -m ... hydra/launcher=fused hydra.launcher.max_fused=8

Its settings: configs/hydra/launcher/fused.yaml (max_fused). Every point is a Hydra job as under the
basic launcher (its folder, its .hydra/ files, its number, its settings checked; the same job loop,
written with Hydra's public helpers), but a job hands its settings to this launcher instead of
training. The launcher then groups the points whose steps can be one program
(``gaf.fused_train.group_key``: the same data set, model, method kind, n, microbatch or batch size,
length) into groups of at most ``max_fused`` and trains each group with ``run_group``; points of
different shapes go into separate groups.
A group its runs cannot share, or whose one member fits no group in the device's memory, is one
line (exit 2); SIGTERM stops the group under way as it stops one run, and the sweep (exit 143).
"""

import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Sequence

from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

import launch
from gaf.fused_train import groups

log = logging.getLogger(__name__)


@contextlib.contextmanager
def member_logs(dirs: list[str]):
    """Each member's train.log gets its own lines (they begin with its folder) and the group's, as a
    job's train.log gets its run's under the basic launcher (Hydra's handlers are gone by now)."""
    handlers = []
    for d in dirs:
        handler = logging.FileHandler(Path(d) / "train.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        handler.addFilter(lambda r, d=d: r.name == "gaf.fused_train" or r.getMessage().startswith(d))
        handlers.append(handler)
        logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()


class FusedLauncher(Launcher):
    """Runs every point as a Hydra job (which hands in its checked run), then trains them as groups."""

    def __init__(self, max_fused: int = 32) -> None:
        super().__init__()
        self.max_fused = max_fused  # checked with the launch (experiments/launch.py: fused_groups)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from gaf.fused_train import check_group, run_group
        from gaf.rundir import RunDirError

        with launch.collecting() as points:
            returns = self.run_jobs(job_overrides, initial_job_idx)  # each job checks and hands in its run
        for members in groups([cfg for cfg, _ in points], self.max_fused):
            cfgs, dirs = [points[i][0] for i in members], [points[i][1] for i in members]
            log.info("fused group of %d: %s", len(members), ", ".join(dirs))
            try:
                check_group(cfgs)
                with member_logs(dirs):
                    summaries = run_group(cfgs, dirs)
            except (ValueError, RunDirError) as e:  # a group over memory, a folder in use: one line
                launch.refuse(f"hydra/launcher=fused: {e}")
            for i, summary in zip(members, summaries):
                returns[i].return_value = summary.get("best_val_acc", float("nan"))
            if any(s.get("stopped_by") == "SIGTERM" for s in summaries):  # checkpointed; the sweep stops, as one run's
                sys.exit(128 + signal.SIGTERM)
        return returns

    def run_jobs(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        """Each point as Hydra's basic launcher runs it, one after another: its config composed from its
        overrides, numbered, and run in its folder under the sweep directory (its .hydra/ files, its log)."""
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs locally")
        returns = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(job_config):
                job_config.hydra.job.id = idx
                job_config.hydra.job.num = idx
            returns.append(run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                   config=job_config, job_dir_key="hydra.sweep.dir",
                                   job_subdir_key="hydra.sweep.subdir"))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)  # the job set its own
        return returns
