"""Hydra entry point: compose the config, hand it to gaf.train.run. Nothing else.

    python experiments/train.py data=cifar100 data.noise=0.4 method=gaf method.tau=0.97
    python experiments/train.py -m experiment=fig6 scale=tiny
    torchrun --nproc_per_node=4 experiments/train.py distributed=true method.n_micro=4
"""

import hashlib
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gaf.config import RunConfig
from gaf.rundir import RunDirError
from gaf.train import run

NAME_BYTES = 200  # a folder name may hold 255 bytes; leave room for Hydra's and the file system's suffixes


def bounded_dirname(name: str) -> str:
    """Hydra's override_dirname as a folder name: as it is when short enough, else a readable
    prefix and a hash of the whole (about 15 overrides passed 255 bytes: OSError 36)."""
    raw = name.encode()
    if len(raw) <= NAME_BYTES:
        return name
    tail = ",...-" + hashlib.sha256(raw).hexdigest()[:12]
    prefix = raw[: NAME_BYTES - len(tail)].rsplit(b",", 1)[0]  # whole overrides only
    return prefix.decode(errors="ignore") + tail


# A scale's row (config.yaml `scales`) -> the settings it fixes. m (per_class) and the model
# are left out: presets sweep m (figures 4, 8) and pick their own networks (figure 3).
SCALE_KEYS = {"iterations": ("train", "iterations"), "val_every": ("train", "val_every"),
              "train_per_class": ("data", "train_per_class"), "test_per_class": ("data", "test_per_class"),
              "fallback": ("data", "fallback"), "fallback_when": ("data", "fallback_when"),
              "memorisation_samples": ("train", "memorisation_samples")}


def settings_scale(cfg) -> str:
    """The scale a run's settings are: its `scale` when its length and data match that scale's
    row, else "custom" (an ad-hoc run is not a paper-scale run because `scale` defaults to paper)."""
    row = cfg["scales"][cfg["scale"]]
    keys = [k for k in SCALE_KEYS if k in row and not (cfg["data"]["name"] == "random" and SCALE_KEYS[k][0] == "data")]
    same = all(row[k] == cfg[SCALE_KEYS[k][0]][SCALE_KEYS[k][1]] for k in keys)  # random data: no subsets, no fallback
    return cfg["scale"] if same else "custom"


# Registered at import; Hydra hands registered resolvers on to its joblib and SLURM workers.
OmegaConf.register_new_resolver("bounded_dirname", bounded_dirname, replace=True)
OmegaConf.register_new_resolver("settings_scale", lambda *, _root_: settings_scale(_root_), replace=True)


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    container = OmegaConf.to_container(cfg, resolve=True)
    container["scale"] = settings_scale(container)
    container.pop("scales", None)  # presets' per-scale tables, already interpolated
    try:
        summary = run(RunConfig.from_dict(container), HydraConfig.get().runtime.output_dir)
    except (ValueError, RunDirError) as e:  # bad settings, missing data, a run directory in use or unreadable
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return summary.get("best_val_acc", float("nan"))


if __name__ == "__main__":
    main()
