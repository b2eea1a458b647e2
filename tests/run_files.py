"""A tiny training run's config and its result files, for the trainer's tests.

    from run_files import read_csv, tiny_config, without_times
"""

import csv

from gaf.config import RunConfig


def tiny_config(**sections) -> RunConfig:
    """A run of seconds on random data (5 classes, the tiny CNN, CPU); ``sections`` override
    keys per section (a dict updates the section, anything else replaces the key)."""
    base = {
        "data": {"name": "random", "random_train": 200, "random_test": 50, "num_classes": 5},
        "model": {"name": "tiny"},
        "method": {"name": "gaf", "tau": 0.97, "n_micro": 3, "per_class": 2},
        "optim": {"lr": 0.05},
        "train": {"iterations": 6, "val_every": 2, "memorisation_samples": 100, "progress": False},
        "device": "cpu",
    }
    if sections.get("method", {}).get("name") in ("baseline", "coteaching"):  # GAF's keys have no effect on them
        base["method"] = {}
    if sections.get("data", {}).get("name", "random") != "random":  # nor random data's sizes on real data
        base["data"] = {}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return RunConfig.from_dict(base)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_times(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]
