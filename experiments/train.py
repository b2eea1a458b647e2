"""Hydra entry point: compose the config, hand it to gaf.train.run. Nothing else.

    python experiments/train.py data=cifar100 data.noise=0.4 method=gaf method.tau=0.97
    python experiments/train.py -m experiment=fig6 scale=tiny
    torchrun --nproc_per_node=4 experiments/train.py distributed=true method.n_micro=4
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gaf.config import RunConfig
from gaf.rundir import RunDirError
from gaf.train import run


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("scales", None)  # presets' per-scale tables, already interpolated
    try:
        summary = run(RunConfig.from_dict(container), HydraConfig.get().runtime.output_dir)
    except (ValueError, RunDirError) as e:  # bad settings, missing data, a run directory in use or unreadable
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return summary.get("best_val_acc", float("nan"))


if __name__ == "__main__":
    main()
