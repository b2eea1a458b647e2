"""Reading the collected results: the one loader the figures, the tables, the notebook and the
regime check share, the names of what ran, and a record of which files were read.

Reads only what gaf.report.collect wrote (results/<experiment>/{runs,curves,evals}.csv,
provenance.json) and the paper's figure-6 values (gaf/report/paper_facts/figure6.csv); never run
directories. ``load`` keeps finished runs at one scale per experiment (the largest present
unless asked for another).
"""

import contextlib
import functools
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from gaf.datasets import DATA_SETS, stand_in_prefix
from gaf.methods import METHODS
from gaf.sources import REPO

SCALE_FILES = REPO / "configs" / "scale"  # a scale is its file there

DATA = {d.name: d.title for d in DATA_SETS.values()}  # how figures and tables name a data set

NAME = {m.name: m.title for m in METHODS.values()}  # ... and a method
MODEL = {"tiny": "tiny CNN", "cnn4": "4-conv CNN", "resnet_cifar": "small CIFAR ResNet", "resnet18": "ResNet18",
         "resnet18_cifar": "ResNet18 (CIFAR stem)", "resnet34_cifar": "ResNet34 (CIFAR stem)",
         "vit_tiny": "small ViT (vit_tiny)"}

CURVE_COLUMNS = ["run_id", "iter", "d_mean", "d_mean_win", "stride", "acc", "loss"]

EVAL_COLUMNS = ["run_id", "iter", "train_acc", "val_acc"]

PAPER_FACTS = Path(__file__).resolve().parent / "paper_facts"  # installed with the package

PAPER_FIG6 = PAPER_FACTS / "figure6.csv"

PAPER_FIG6_SETUP = ("cifar100", "resnet18")  # the data set and network of the paper's figure 6

_reads: dict | None = None  # inside reads_recorded(): {input key: sha256 of the file, or None if absent}

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

def input_key(path, results_dir):
    """A file a figure reads, named portably: the paper's facts as paper_facts/<file>, else relative
    to the results folder."""
    path = Path(path).resolve()
    if PAPER_FACTS in path.parents:
        return path.relative_to(PAPER_FACTS.parent).as_posix()
    return path.relative_to(Path(results_dir).resolve()).as_posix()

def input_path(key, results_dir):
    return PAPER_FACTS.parent / key if key.startswith("paper_facts/") else Path(results_dir) / key

def file_hash(path):
    return sha256(path.read_bytes()) if path.is_file() else None

def note_read(path, results_dir):
    """Record that the figure being drawn reads ``path`` (absent files too: their arrival changes it)."""
    if _reads is not None:
        _reads[input_key(path, results_dir)] = file_hash(Path(path))

def load(results_dir, experiment, scale=None):
    """Finished runs of one experiment at one scale, with their curves and evals; None if there are none."""
    d = Path(results_dir) / experiment
    for name in ("runs.csv", "curves.csv", "evals.csv", "provenance.json"):
        note_read(d / name, results_dir)
    if not (d / "runs.csv").is_file():
        return None
    runs = pd.read_csv(d / "runs.csv")
    runs = runs[runs["status"] == "finished"]
    if runs.empty:
        return None
    scale = scale or max(runs["scale"].unique(), key=scale_size)
    runs = runs[runs["scale"] == scale].reset_index(drop=True)
    if runs.empty:
        return None
    ids = set(runs["run_id"])
    frames = {}
    for name, columns in (("curves", CURVE_COLUMNS), ("evals", EVAL_COLUMNS)):
        f = pd.read_csv(d / f"{name}.csv") if (d / f"{name}.csv").is_file() else pd.DataFrame()
        f = f.reindex(columns=list(dict.fromkeys([*columns, *f.columns])))  # a run without rows still plots (empty)
        frames[name] = f[f["run_id"].isin(ids)]
    prov = json.loads((d / "provenance.json").read_text()) if (d / "provenance.json").is_file() else {}
    return SimpleNamespace(experiment=experiment, scale=scale, runs=runs, provenance=prov, **frames)

@functools.cache
def scale_size(scale):
    """How large a scale is, to pick the largest and to sort: (1, the iterations its configs/scale/ file
    trains, its name); a name of no file (custom) ranks lowest."""
    import yaml  # only here: collecting results (gaf.report.collect) needs no PyYAML

    path = SCALE_FILES / f"{scale}.yaml"
    if not isinstance(scale, str) or not path.is_file():
        return (0, 0, str(scale))
    return (1, yaml.safe_load(path.read_text())["train"]["iterations"], scale)

def _unique(series):
    return [v for v in dict.fromkeys(series.dropna()) if v != ""]

def models_of(runs):
    """The runs' models, by their display names (with their widths where a model has one)."""
    names = []
    for m in _unique(runs["model.name"]):
        widths = _unique(runs.loc[runs["model.name"] == m, "model.width"]) if "model.width" in runs else []
        names.append(MODEL.get(m, m) + (f" (width {', '.join(f'{w:g}' for w in widths)})" if widths else ""))
    return ", ".join(names)

def note_texts(runs):
    """Each run's data note as text ('' where it has none)."""
    if "data_note" not in runs:
        return pd.Series("", index=runs.index, dtype=object)
    return runs["data_note"].astype(object).fillna("").astype(str)

def data_asked(runs):
    """The data set each run asked for (what a substitute stood in for): runs.csv's data_asked, where
    data.name is the data that ran; files collected before it named what was asked in data.name."""
    asked = runs["data_asked"] if "data_asked" in runs else pd.Series(np.nan, index=runs.index, dtype=object)
    return asked.where(asked.notna() & (asked != ""), runs["data.name"])

def data_used(runs):
    """The data set each run trained on: summary.json's data_used where collected, else read off
    its data note (a substitution says what it substituted), else the data set asked for."""
    from_note = note_texts(runs).map(lambda n: next((d.name for d in DATA_SETS.values()
                                                     if d.as_stand_in and f"substituted {stand_in_prefix(d)}" in n), None))
    used = runs["data_used"] if "data_used" in runs else pd.Series(np.nan, index=runs.index, dtype=object)
    return used.where(used.notna() & (used != ""), from_note.where(from_note.notna(), data_asked(runs)))

def ran_on(asked, used):
    """What a run trained on, named first, and what it stood in for."""
    if pd.isna(used) or used == asked:
        return data_label(asked)
    if human_labelled(asked):  # human labels cannot apply to other images: symmetric noise at their rate
        return (f"{data_label(used)} with symmetric {DATA_SETS[asked].human_noise_rate:.1%} noise, standing in for "
                f"{data_label(asked)}")
    return f"{data_label(used)} standing in for {data_label(asked)}"

def ran_labels(runs):
    """ran_on for every run, as a Series."""
    return pd.Series([ran_on(a, u) for a, u in zip(data_asked(runs), data_used(runs))], index=runs.index,
                     dtype=object)

def datasets_of(runs):
    """The data sets the runs trained on, by their display names (a substitute first)."""
    return ", ".join(_unique(ran_labels(runs)))

def title_suffix(runs):
    """'[tiny scale: tiny CNN; <data note>]' from runs.csv, or '' for paper-scale runs on the paper's data."""
    parts = []
    scales = sorted(_unique(runs["scale"]), key=scale_size)
    if scales != ["paper"]:
        parts.append(f"{'/'.join(scales)} scale: {models_of(runs)}")
    parts += data_notes(runs)
    return f"[{'; '.join(parts)}]" if parts else ""

def data_notes(runs):
    """The first sentence of each distinct data note (the substitution); full notes stay in provenance.json."""
    return _unique(note_texts(runs).map(lambda n: n.split(". ")[0].strip().rstrip(".")))

def curve(r, run_id):
    return r.curves[r.curves["run_id"] == run_id].sort_values("iter")

def evals(r, run_id):
    return r.evals[r.evals["run_id"] == run_id].sort_values("iter")

def variant(runs):
    """A label per run: 'GAF' / 'baseline', plus the method settings that vary within that method."""
    keys = {"method.tau": "tau", "method.n_micro": "n", "method.per_class": "m", "method.merge": "merge",
            "method.batch_size": "batch"}
    labels = pd.Series(runs["method.name"].map(lambda m: NAME.get(m, m)), index=runs.index)
    for method, group in runs.groupby("method.name"):
        varying = [k for k in keys if k in group and group[k].nunique(dropna=False) > 1]
        for i, row in group.iterrows():
            extra = ", ".join(f"{keys[k]}={_fmt(row[k])}" for k in varying)
            labels[i] += f" ({extra})" if extra else ""
    return labels

def role(row):
    """'baseline' for the baseline and for plain averaging (GAF at tau = 2 accepts every
    micro-gradient: how figures 1, 3, 4 and 5 measure a baseline's distances), else 'gaf'."""
    return "baseline" if row["method.name"] == "baseline" or row.get("method.tau", 0) >= 2 else "gaf"

# The arms of experiment=robust, in the order figures and tables list them.
ARMS = ["baseline (CE)", "label smoothing", "GCE", "SCE", "co-teaching", "averaging (tau 2)", "GAF", "GAF + GCE"]
LOSS_NAME = {"label_smoothing": "label smoothing", "gce": "GCE", "sce": "SCE"}


def arm(row):
    """What one run is, as the robust comparison names it: the method (plain averaging is GAF
    at tau >= 2, as ``role`` says), then the training loss where it is not cross-entropy."""
    loss = row.get("loss.name")
    loss = LOSS_NAME.get(loss) if isinstance(loss, str) else None  # runs from before the loss setting: CE
    if row["method.name"] == "coteaching":
        method = "co-teaching"
    elif row["method.name"] == "baseline":
        return loss or "baseline (CE)"
    else:
        method = "averaging (tau 2)" if role(row) == "baseline" else "GAF"
    return f"{method} + {loss}" if loss else method


def optimizer(row):
    """A run's optimizer regime as a label: its learning rate, weight decay and schedule, and whether
    they are the paper's (RunConfig's defaults)."""
    from gaf.config import RunConfig

    lr, wd, schedule = row["optim.lr"], row["optim.weight_decay"], row["optim.schedule"]
    paper = RunConfig().optim
    label = f"lr {lr:g}, weight decay {wd:g}, {schedule}"
    return label + (" (the paper's)" if (lr, wd, schedule) == (paper.lr, paper.weight_decay, paper.schedule) else "")


def arm_order(name):
    return (ARMS.index(name), name) if name in ARMS else (len(ARMS), name)


def _fmt(x):
    return "-" if pd.isna(x) else (f"{x:g}" if isinstance(x, float) else str(x))

def acc_stats(runs, by, value="best_val_acc"):
    """Mean, std and count of an accuracy (in %) over seeds, per group."""
    g = runs.assign(_v=100 * runs[value]).groupby(by, dropna=False)["_v"]
    return g.agg(["mean", "std", "count"]).reset_index()

def spread(s):
    """Error bars: the std over seeds where a point has two or more, none where it has one;
    None when no point has two (one seed draws no error bars)."""
    yerr = s["std"].where(s["count"] >= 2)
    return yerr if yerr.notna().any() else None

def noise_pct(runs):
    return 100 * runs["data.noise"].fillna(0.0)

def data_label(name):
    return DATA.get(name, name)

def human_labelled(name):
    """Whether the data set ``name`` trains on human labels (its noise is theirs, not symmetric)."""
    return name in DATA_SETS and bool(DATA_SETS[name].human_labels)

def random_data(name):
    """Whether the data set ``name`` is random images with random labels."""
    return name in DATA_SETS and DATA_SETS[name].random

def symmetric_noise_asked(runs):
    """Which runs asked for real images with symmetric label noise (no human labels, no random data)."""
    return data_asked(runs).map(lambda d: not (human_labelled(d) or random_data(d)))

def data_order(name):
    """Where a data set comes in figures: in the records' order, then unknown names alphabetically."""
    return (list(DATA_SETS).index(name) if name in DATA_SETS else len(DATA_SETS), name)

def read_paper_fig6():
    note_read(PAPER_FIG6, None)
    return pd.read_csv(PAPER_FIG6, comment="#")


@contextlib.contextmanager
def reads_recorded():
    """Within it, every result file ``load`` and ``read_paper_fig6`` read is recorded in the dict
    it yields: what a figure was drawn from (its sidecar)."""
    global _reads
    _reads = {}
    try:
        yield _reads
    finally:
        _reads = None
