"""Hydra entry point: compose the config, hand it to gaf.train.run. Nothing else.

    python experiments/train.py data=cifar100 data.noise=0.4 method=gaf method.tau=0.97
    python experiments/train.py -m experiment=fig6 scale=tiny
    python experiments/train.py -m experiment=fig6 scale=tiny dry_run=true   # list the points, launch nothing
    torchrun --nproc_per_node=4 experiments/train.py distributed=true method.n_micro=4

Every launch is checked as a whole before it starts (experiments/launch.py): a sweep's points
all at once, a run's settings, its folder.
"""

import logging
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's gaf, whichever tree .venv installed
from gaf.rundir import RunDirError  # noqa: E402
from launch import collect, run_config, unknown_key  # noqa: E402 (also registers config.yaml's resolvers)

log = logging.getLogger(__name__)


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    try:
        notes = []
        settings = run_config(cfg, hydra_cfg.overrides.task, hydra_cfg.runtime.choices, notes)
        for note in notes:
            log.info(note)
        if collect(settings, hydra_cfg.runtime.output_dir):  # hydra/launcher=fused trains the jobs as groups
            return float("nan")
        from gaf.train import run  # torch and the models load once the settings are known to be good

        summary = run(settings, hydra_cfg.runtime.output_dir)
    except (ValueError, RunDirError) as e:  # bad settings, missing data, a run directory in use or unreadable
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if summary.get("stopped_by") == "SIGTERM":  # checkpointed; a sweep stops here too, as the signal asked
        sys.exit(128 + signal.SIGTERM)
    return summary.get("best_val_acc", float("nan"))


if __name__ == "__main__":
    if error := unknown_key(sys.argv[1:]):  # before Hydra, whose own refusal takes several lines
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    main()
