"""A run's settings: the dataclass schema, building it from a nested dict, validation,
and which settings may change between launches of one run directory.

Plain dataclasses, no Hydra object: ``RunConfig.from_dict`` takes what Hydra (or anyone)
composes; ``validate`` rejects bad settings up front with one message each.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from gaf.distributed import MODES as DIST_MODES
from gaf.fast import OPTIMIZERS
from gaf.filter import check_merge, check_tau


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
    channels_last: bool | None = None  # fast path: channels_last images and weights; None = as amp
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
