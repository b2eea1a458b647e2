"""A run's settings: the dataclass schema, building it from a nested dict, validation,
what the settings decide on a device, and which settings may change between launches
of one run directory.

Plain dataclasses, no Hydra object: ``RunConfig.from_dict`` takes what Hydra (or anyone)
composes; ``validate`` rejects bad settings up front with one message each; ``resolve``
decides once, on the run's device, what the trainer derives from them (``RunPlan``).

The schema imports no torch and no gaf module but the records of the data sets and methods
(gaf.datasets, gaf.methods) and the settings' rules (gaf.rules), all pure Python: reading run
files needs neither torch nor Hydra. The other choices are literals here, and the modules
implementing them are held to them (tests/test_configs.py checks the models, merges, optimizers
and distributed modes against their registries).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from dataclasses import dataclass, field

from gaf.datasets import DATA_SETS, named
from gaf.methods import METHODS as METHOD_RECORDS, Method
from gaf.rules import setting  # a schema field and its Rule: what the setting may hold

# The data sets (gaf.datasets' records), what may stand in for them (None: nothing), their sizes.
DATASETS = tuple(DATA_SETS)
FALLBACKS = (None, *dict.fromkeys(s for d in DATA_SETS.values() for s in d.stand_ins))
FALLBACK_WHEN = ("missing", "always")
TRAIN_PER_CLASS = {d.name: d.train_per_class for d in DATA_SETS.values() if d.train_per_class}
CLASSES = {d.name: d.classes for d in DATA_SETS.values() if d.classes}
# The networks of gaf.models.MODELS, and the size keys (model.width, model.blocks) each takes.
MODEL_SIZES = {"resnet18": (), "resnet18_cifar": (), "resnet34_cifar": (), "vit_tiny": (),
               "resnet_cifar": ("width", "blocks"), "cnn4": ("width",), "tiny": ("width",)}
METHODS = tuple(METHOD_RECORDS)  # gaf.methods' records
MERGES = ("halving", "mean")  # gaf.filter.MERGES
LOSSES = ("ce", "label_smoothing", "gce", "sce")  # gaf.losses.LOSSES
OPTIMIZERS = ("sgd", "adam", "adamw")  # gaf.optim.OPTIMIZERS
SCHEDULES = ("plateau", "cosine")  # gaf.schedule.SCHEDULES
DIST_MODES = ("gram", "allgather")  # gaf.distributed.MODES
# train.compile -> FastGAFStep's compile argument.
COMPILE_MODES = {"none": False, "graph": "graph", "full": True}


def _method(cfg):
    """The record of the run's method (a name of none: a record with no effects, for the schema's
    own error to name)."""
    return METHOD_RECORDS.get(cfg.method.name, _NO_METHOD)


_NO_METHOD = Method("", "", microbatches=False, fast=False)


def threshold_of(cfg) -> tuple[str, dict]:
    """The run's threshold: a scheme of gaf.threshold.THRESHOLDS and the arguments that build it."""
    m = cfg.method
    if m.adaptive_k is None:
        return "fixed", {"tau": m.tau}
    return "adaptive", {"tau_max": m.tau, "k": m.adaptive_k, "window": m.adaptive_window}


def _data_sets(flag: str) -> str:
    """The data sets with this flag of their record, as a message names them: data=a or data=b."""
    return " or ".join(f"data={d.name}" for d in DATA_SETS.values() if getattr(d, flag))


# When a setting has an effect: (the condition, what runs instead, said when it is set anyway; {c} is the run's
# config).
APPLIES = {
    "microbatches": (lambda c: _method(c).microbatches,
            "method={c.method.name} steps on one batch of method.batch_size images: no microbatches, no filter"),
    "adaptive": (lambda c: _method(c).microbatches and threshold_of(c)[0] == "adaptive",
                 "the adaptive threshold is off (set method.adaptive_k to turn it on)"),
    "batch": (lambda c: not _method(c).microbatches,
              "method=gaf draws method.n_micro microbatches of method.per_class images per class"),
    "peer": (lambda c: _method(c).peer,
                   f"only {' or '.join(f'method={m.name}' for m in METHOD_RECORDS.values() if m.peer)} "
                   "trains two networks"),
    "label_smoothing": (lambda c: c.loss.name == "label_smoothing", "only loss=label_smoothing smooths"),
    "gce": (lambda c: c.loss.name == "gce", "only loss=gce has q"),
    "sce": (lambda c: c.loss.name == "sce", "only loss=sce has alpha and beta"),
    "human_labels": (lambda c: any(d.human_labels for d in named(c.data.name)),
                     f"only {_data_sets('human_labels')} reads a label file"),
    "substitutable": (lambda c: any(c.data.fallback in (None, *d.stand_ins) and d.stand_ins for d in named(c.data.name)),
                      "only " + ", ".join(f"data={d.name} (by {' or '.join(d.stand_ins)})"
                                          for d in DATA_SETS.values() if d.stand_ins) + " can be substituted"),
    "fallback": (lambda c: c.data.fallback is not None and APPLIES["substitutable"][0](c),
                 "no data.fallback is set"),
    "jpeg": (lambda c: any(d.jpeg for d in named(c.data.name, c.data.fallback)),
             f"only {_data_sets('jpeg')} (as data.name or data.fallback) reads the JPEG copy"),
    "random": (lambda c: any(d.random for d in named(c.data.name, c.data.fallback)),
               f"only {_data_sets('random')} (as data.name or data.fallback) has these sizes"),
    "sgd": (lambda c: c.optim.name == "sgd", "only optim=sgd has momentum"),
    "adam": (lambda c: c.optim.name in ("adam", "adamw"), "only optim=adam and optim=adamw have betas"),
    "plateau": (lambda c: c.optim.schedule == "plateau",
                "only optim.schedule=plateau reduces the lr on validation loss"),
    "distributed": (lambda c: c.distributed, "distributed=false runs in one process"),
}


@dataclass
class DataConfig:
    name: str = setting("cifar100", "choice", choices=DATASETS)
    # Where data comes from: gaf.sources (under root, a download, the offline copies, in that order).
    # root: the folder data sets live in and are downloaded into; null: data/ in the repository
    root: str | None = setting(None, "path", optional=True)
    # CIFAR-100N's CIFAR-100_human.pt; null: looked for (gaf.sources)
    label_file: str | None = setting(None, "path", optional=True, applies="human_labels")
    noise: float = setting(0.0, "float", low=0, high=1, open_high=True)  # symmetric label noise rate p
    download: bool = setting(True, "bool")  # fetch a missing data set where the network allows
    # instead of CIFAR-100: cifar10 | cifar10_jpeg | random (said in the note)
    fallback: str | None = setting(None, "choice", choices=tuple(f for f in FALLBACKS if f), optional=True,
                                   applies="substitutable")
    # missing: only where CIFAR-100 cannot be had | always
    fallback_when: str = setting("missing", "choice", choices=FALLBACK_WHEN, applies="fallback")
    # the CIFAR-10 JPEG copy (.tar.gz or folder); null: looked for (gaf.sources)
    jpeg_path: str | None = setting(None, "path", optional=True, applies="jpeg")
    # class-balanced subsets, for small scales
    train_per_class: int | None = setting(None, "int", low=1, optional=True)
    test_per_class: int | None = setting(None, "int", low=1, optional=True)
    random_train: int = setting(5000, "int", low=1, applies="random")  # random data (figure 5)
    random_test: int = setting(1000, "int", low=1, applies="random")
    num_classes: int | None = setting(None, "int", low=2, optional=True)  # random data only


@dataclass
class ModelConfig:
    name: str = setting("resnet18", "choice", choices=tuple(MODEL_SIZES))
    # Size keys of MODEL_SIZES (resnet_cifar: width, blocks; cnn4, tiny: width); null = the model's default.
    width: int | None = setting(None, "int", low=1, optional=True)
    blocks: int | None = setting(None, "int", low=1, optional=True)


@dataclass
class MethodConfig:
    name: str = setting("gaf", "choice", choices=METHODS)
    tau: float = setting(0.97, "float", low=0, high=2, applies="microbatches")  # the cosine distance's range
    n_micro: int = setting(2, "int", low=2, applies="microbatches")  # n: microbatches per step
    per_class: int = setting(1, "int", low=1, applies="microbatches")  # m: images per class per microbatch
    # halving (authors' package) | mean (their multi-GPU script)
    merge: str = setting("halving", "choice", choices=MERGES, applies="microbatches")
    # sample microbatches with replacement when classes are small
    replacement: bool = setting(False, "bool", applies="microbatches")
    # set: tau_t = min(tau, mean + k*std of recent distances)
    adaptive_k: float | None = setting(None, "float", low=0, optional=True, applies="microbatches")
    adaptive_window: int = setting(200, "int", low=2, applies="adaptive")
    # the batch of baseline and co-teaching (class-balanced + random fill)
    batch_size: int = setting(128, "int", low=1, applies="batch")
    # co-teaching: R(t)'s plateau, the fraction of each batch a network leaves out; null: the
    # fraction of flipped training labels (the noise rate, as Han et al. assume it known)
    forget_rate: float | None = setting(None, "float", low=0, high=1, open_high=True, optional=True,
                                        applies="peer")
    ramp_epochs: float = setting(10.0, "float", low=0, applies="peer")  # T_k: epochs over which R(t) ramps up


@dataclass
class LossConfig:
    """The training loss (validation always reports cross-entropy): gaf.losses."""

    name: str = setting("ce", "choice", choices=LOSSES)
    smoothing: float = setting(0.1, "float", low=0, high=1, open_high=True, applies="label_smoothing")
    q: float = setting(0.7, "float", low=0, high=1, open_low=True, applies="gce")  # GCE: q -> 0 is CE, 1 MAE
    # SCE: alpha CE + beta RCE; null: Wang et al.'s for the data that ran (CIFAR-10: 0.1, 1.0; CIFAR-100: 6.0, 0.1)
    alpha: float | None = setting(None, "float", low=0, optional=True, applies="sce")
    beta: float | None = setting(None, "float", low=0, optional=True, applies="sce")


@dataclass
class OptimConfig:
    name: str = setting("sgd", "choice", choices=OPTIMIZERS)
    lr: float = setting(0.01, "float", low=0, open_low=True)
    momentum: float = setting(0.9, "float", low=0, high=1, open_high=True, applies="sgd")
    nesterov: bool = setting(True, "bool", applies="sgd")
    weight_decay: float = setting(1e-2, "float", low=0)
    betas: tuple[float, float] = setting((0.9, 0.999), "pair", low=0, high=1, open_high=True, applies="adam")
    # the lr schedule (gaf.schedule): plateau (the paper's: ReduceLROnPlateau on validation loss, stepped per
    # validation) | cosine (lr * 0.5 * (1 + cos(pi (t - 1) / train.iterations)) at iteration t = 1..)
    schedule: str = setting("plateau", "choice", choices=SCHEDULES)
    plateau_factor: float = setting(0.1, "float", low=0, high=1, open_low=True, open_high=True, applies="plateau")
    plateau_patience: int = setting(100, "int", low=0, applies="plateau")


@dataclass
class LoopConfig:
    iterations: int = setting(1000, "int", low=1)
    val_every: int = setting(100, "int", low=1)
    eval_batch_size: int = setting(1000, "int", low=1)
    # training samples probed for memorisation at each validation (0: no probe)
    memorisation_samples: int = setting(10000, "int", low=0)
    fast: bool | None = setting(None, "bool", optional=True)  # the fused path; None = on when the device is CUDA
    amp: bool = setting(False, "bool")  # bf16 autocast (fast path)
    # fast path: channels_last images and weights; None = as amp
    channels_last: bool | None = setting(None, "bool", optional=True)
    # fast path on CUDA: none | graph (capture the step) | full (torch.compile, then capture)
    compile: str = setting("none", "choice", choices=tuple(COMPILE_MODES))
    # fast path, GAF: all micro-gradients in one torch.func.vmap pass instead of n passes
    batched: bool = setting(False, "bool")
    progress: bool | None = setting(None, "bool", optional=True)  # tqdm; None = only on a terminal and not in CI
    # stop (as if killed) after this iteration: tests, time-limited jobs
    stop_after: int | None = setting(None, "int", low=1, optional=True)


@dataclass
class WandbConfig:
    mode: str = setting("disabled", "choice", choices=("disabled", "offline", "online"))  # never prompts for a login
    project: str = setting("gaf", "text")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    seed: int = setting(0, "int", low=0, high=2**31 - 1)  # seed + k seeds the other streams: 31 bits
    device: str = setting("auto", "device")
    distributed: bool = setting(False, "bool")  # true under torchrun: each rank is one (or more) microbatches
    # gram (shards + Gram all-reduce) | allgather (the authors' script)
    dist_mode: str = setting("gram", "choice", choices=DIST_MODES, applies="distributed")
    experiment: str = setting("single", "text")  # a preset's name; results are grouped by it
    # a label: the scale chosen (a configs/scale/ file: launch.py refuses others), else custom (settings_scale)
    scale: str = setting("custom", "text")

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
        elif k == "betas" and isinstance(v, (list, tuple)):
            kwargs[k] = tuple(v)
        else:
            kwargs[k] = v
    return cls(**kwargs)


def settings(obj, prefix: str = ""):
    """Every leaf setting of a config dataclass (or the class): (dotted key, Field, value or None)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name) if not isinstance(obj, type) else None
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            yield from settings(value if value is not None else f.default_factory, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, value


def validate(cfg: RunConfig) -> None:
    """Reject bad settings up front, each with one message naming the key and what is allowed:
    every setting against its schema ``Rule``, then the rules that tie settings together."""
    for key, f, value in settings(cfg):
        f.metadata["rule"].check(key, value)
    for key, value, why in inapplicable(cfg):
        raise ValueError(f"{key}={json.dumps(value)} has no effect here: {why}; leave {key} unset")
    o, t = cfg.optim, cfg.train
    check_size(cfg.model.name, width=cfg.model.width, blocks=cfg.model.blocks)
    if o.name == "sgd" and o.nesterov and not o.momentum > 0:
        raise ValueError(f"optim.nesterov=true needs optim.momentum > 0, got momentum={o.momentum}")
    if t.compile != "none" and not cfg.device.startswith(("cuda", "auto")):
        raise ValueError(f"train.compile={t.compile} captures a CUDA graph; it needs device=cuda, got {cfg.device!r}")
    if t.compile == "full" and t.batched:
        raise ValueError("train.compile=full does not combine with train.batched=true (torch.compile of vmap "
                         "is not used); use train.compile=graph or train.batched=false")
    if DATA_SETS[cfg.data.name].human_labels and cfg.data.noise > 0:
        raise ValueError(f"data.noise={cfg.data.noise} with data={cfg.data.name}: "
                         f"{DATA_SETS[cfg.data.name].title}'s noise is its human labels; use data.noise=0")
    if error := class_size_error(cfg, most_images_per_class(cfg), "per class at most"):
        raise ValueError(error)
    if cfg.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"wandb.mode={cfg.wandb.mode} needs wandb: pip install 'gaf[wandb]', or set wandb.mode=disabled")
    if t.batched and not _method(cfg).microbatches:
        raise ValueError(f"train.batched=true batches GAF's micro-gradients; method={cfg.method.name} has none: "
                         "drop train.batched")
    if not _method(cfg).fast and (cfg.distributed or t.fast):
        raise ValueError(f"method={cfg.method.name} runs on the readable path of one process; drop "
                         f"{'distributed=true' if cfg.distributed else 'train.fast=true'}")


def check_size(name: str, **size: int | None) -> dict:
    """The size keys that apply to model ``name`` (None dropped), or ValueError naming the bad one."""
    size = {k: v for k, v in size.items() if v is not None}
    for key, value in size.items():
        if key not in MODEL_SIZES.get(name, ()):
            allowed = ", ".join(f"model.{k}" for k in MODEL_SIZES.get(name, ())) or "no size keys"
            raise ValueError(f"model.{key} does not apply to model {name!r} (it takes {allowed})")
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"model.{key} must be an integer >= 1, got {value!r}")
    return size


def most_images_per_class(cfg: RunConfig) -> float:
    """The most training images per class any data set this run may train on can have on average
    (a substitute included): a step needing more cannot be class-balanced."""
    d = cfg.data
    names = [d.fallback] if d.fallback_when == "always" and d.fallback else [d.name, d.fallback]
    sizes = [r.train_per_class or d.random_train / (d.num_classes or CLASSES.get(d.name, 100)) for r in named(*names)]
    return min(max(sizes), d.train_per_class or math.inf)


def class_size_error(cfg: RunConfig, available: float, what: str) -> str | None:
    """Why GAF's class-balanced microbatches cannot be drawn from ``available`` images of a class, or None."""
    m = cfg.method
    need = m.per_class * m.n_micro
    if not _method(cfg).microbatches or m.replacement or need <= available:
        return None
    return (f"method.per_class={m.per_class} x method.n_micro={m.n_micro} = {need} images of every class per step, "
            f"but the data has {available:g} {what}; lower method.per_class or method.n_micro, "
            "or set method.replacement=true")


def without_effect(cfg: RunConfig):
    """(key, Field, value, why) for every setting whose condition (``Rule.applies``) fails on ``cfg``."""
    for key, f, value in settings(cfg):
        applies = f.metadata["rule"].applies
        if applies is not None and not APPLIES[applies][0](cfg):
            yield key, f, value, APPLIES[applies][1].format(c=cfg)


def inapplicable(cfg: RunConfig, keys=None) -> list[tuple[str, object, str]]:
    """(key, value, why) for every setting that has no effect on this run and is set anyway: away from
    its default, or (``keys``) named by the caller (e.g. given on a command line)."""
    return [(key, value, why) for key, f, value, why in without_effect(cfg)
            if (key in keys if keys is not None else value != _default(f))]


def without_inapplicable(cfg: RunConfig) -> RunConfig:
    """The same run with every setting that has no effect back at its default (a preset's rows are
    written for every method and data set; a run keeps only what acts on it)."""
    d = cfg.to_dict()
    for key, f, _, _ in without_effect(cfg):
        section, _, name = key.rpartition(".")
        (d[section] if section else d)[name] = json.loads(json.dumps(_default(f)))
    return RunConfig.from_dict(d)


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass(frozen=True)
class RunPlan:
    """What a validated run's settings decide on its device, decided once (``resolve``): the
    trainer reads these instead of deriving them again."""

    device_type: str  # "cpu" | "cuda"
    fast: bool  # the fused step (gaf.fast) runs
    amp: bool  # bf16 autocast, fast path only
    channels_last: bool  # images and weights channels_last, fast path only
    compile: bool | str  # FastGAFStep's compile argument: False | "graph" | True
    batched: bool  # GAF's micro-gradients in one vmap pass, fast path only


def resolve(cfg: RunConfig, device_type: str) -> RunPlan:
    """The run's derived settings on ``device_type``, or the error of an option that would be
    ignored there (``check_fast_path_options``). ``cfg`` has passed ``validate``."""
    check_fast_path_options(cfg, device_type)
    t, fast = cfg.train, _fast_path_on(cfg, device_type)
    return RunPlan(device_type=device_type, fast=fast, amp=fast and t.amp,
                   channels_last=fast and (t.amp if t.channels_last is None else t.channels_last),
                   compile=COMPILE_MODES[t.compile], batched=fast and t.batched)


def _fast_path_on(cfg: RunConfig, device_type: str) -> bool:
    """The fused step runs (train.fast, or by default on CUDA), never under torch.distributed."""
    fast = cfg.train.fast if cfg.train.fast is not None else device_type == "cuda"
    return fast and not cfg.distributed


def check_fast_path_options(cfg: RunConfig, device_type: str) -> None:
    """train.amp, channels_last, compile and batched act on the fast path only, compile on CUDA
    only: asked for where they would be ignored (or fail after the data loaded), an error."""
    t = cfg.train
    asked = [f"train.{k}={str(v).lower()}" for k in ("amp", "channels_last", "compile", "batched")
             if (v := getattr(t, k)) not in (None, False, "none")]
    if asked and not _fast_path_on(cfg, device_type):
        why = ("distributed=true runs its own step" if cfg.distributed else
               "train.fast=false" if t.fast is False else f"the device is {device_type} (set train.fast=true)")
        raise ValueError(f"{', '.join(asked)} acts on the fast path only, which is off here: {why}")
    if t.compile != "none" and device_type != "cuda":
        raise ValueError(f"train.compile={t.compile} captures a CUDA graph; it needs device=cuda, "
                         f"got {device_type} (device={cfg.device})")
