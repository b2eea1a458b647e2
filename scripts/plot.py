"""Result files -> figures 1-9, table 1 and the paper-vs-reproduction note.

Reads only what scripts/collect.py wrote (results/<experiment>/{runs,curves,evals}.csv,
provenance.json) and the paper's figure-6 values (scripts/paper_facts/figure6.csv); never
run directories. Uses finished runs only, at one scale per experiment (the largest present
unless --scale says otherwise). A figure whose experiment has no results yet is skipped
with a note. Every figure's title names its scale (when not "paper") and any data
substitution, taken from runs.csv.

    python scripts/plot.py                    # results/ -> results/<experiment>/figN.{png,pdf}, results/table1.{md,csv}
    python scripts/plot.py --results R --scale tiny --only fig6 table1
"""

import argparse
import json
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # figures made without pyplot: no global state, any backend

PAPER_FIG6 = Path(__file__).resolve().parent / "paper_facts" / "figure6.csv"
PAPER_FIG6_SETUP = ("cifar100", "resnet18")  # the data set and network of the paper's figure 6
SCALES = ["tiny", "small", "paper"]  # smallest to largest; unknown scales rank lowest
COLOR = {"gaf": "#1f4fb4", "baseline": "#d62728"}
MARKER = {"gaf": "s", "baseline": "^"}
NAME = {"gaf": "GAF", "baseline": "baseline"}
DATA = {"cifar100": "CIFAR-100", "cifar100n": "CIFAR-100N-Fine", "cifar10": "CIFAR-10",
        "cifar10_jpeg": "CIFAR-10 (JPEG copy)", "random": "random images and labels"}
MODEL = {"tiny": "tiny CNN", "cnn4": "4-conv CNN", "resnet_cifar": "small CIFAR ResNet", "resnet18": "ResNet18",
         "resnet18_cifar": "ResNet18 (CIFAR stem)", "resnet34_cifar": "ResNet34 (CIFAR stem)",
         "vit_tiny": "small ViT (vit_tiny)"}
CURVE_COLUMNS = ["run_id", "iter", "d_mean", "d_mean_win", "stride", "acc", "loss"]
EVAL_COLUMNS = ["run_id", "iter", "train_acc", "val_acc"]
STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
         "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
         "legend.frameon": False, "lines.linewidth": 1.5, "figure.dpi": 110, "savefig.dpi": 150}
matplotlib.rcParams.update(STYLE)


# ---------------------------------------------------------------- loading
def load(results_dir, experiment, scale=None):
    """Finished runs of one experiment at one scale, with their curves and evals; None if there are none."""
    d = Path(results_dir) / experiment
    if not (d / "runs.csv").is_file():
        return None
    runs = pd.read_csv(d / "runs.csv")
    runs = runs[runs["status"] == "finished"]
    if runs.empty:
        return None
    scale = scale or max(runs["scale"].unique(), key=lambda s: SCALES.index(s) if s in SCALES else -1)
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


def data_used(runs):
    """The data set each run trained on: summary.json's data_used where collected, else read off
    its data note (a substitution says what it substituted), else the data set asked for."""
    from_note = note_texts(runs).map(lambda n: "cifar10_jpeg" if "substituted the CIFAR-10 JPEG copy" in n
                          else "random" if "substituted random images" in n else None)
    used = runs["data_used"] if "data_used" in runs else pd.Series(np.nan, index=runs.index, dtype=object)
    return used.where(used.notna() & (used != ""), from_note.where(from_note.notna(), runs["data.name"]))


def ran_on(asked, used):
    """What a run trained on, named first, and what it stood in for."""
    if pd.isna(used) or used == asked:
        return data_label(asked)
    if asked == "cifar100n":  # human labels cannot apply to other images: symmetric noise at their rate
        return f"{data_label(used)} with symmetric 40.2% noise, standing in for CIFAR-100N-Fine"
    return f"{data_label(used)} standing in for {data_label(asked)}"


def ran_labels(runs):
    """ran_on for every run, as a Series."""
    return pd.Series([ran_on(a, u) for a, u in zip(runs["data.name"], data_used(runs))], index=runs.index,
                     dtype=object)


def datasets_of(runs):
    """The data sets the runs trained on, by their display names (a substitute first)."""
    return ", ".join(_unique(ran_labels(runs)))


def title_suffix(runs):
    """'[tiny scale: tiny CNN; <data note>]' from runs.csv, or '' for paper-scale runs on the paper's data."""
    parts = []
    scales = sorted(_unique(runs["scale"]), key=lambda s: SCALES.index(s) if s in SCALES else -1)
    if scales != ["paper"]:
        parts.append(f"{'/'.join(scales)} scale: {models_of(runs)}")
    parts += data_notes(runs)
    return f"[{'; '.join(parts)}]" if parts else ""


def data_notes(runs):
    """The first sentence of each distinct data note (the substitution); full notes stay in provenance.json."""
    return _unique(note_texts(runs).map(lambda n: n.split(". ")[0].strip().rstrip(".")))


def titled(fig, title, r=None):
    """Suptitle = title + the scale/data suffix; a grey provenance footer. Returns the figure."""
    width = int(fig.get_figwidth() * 11.5)  # characters per line at 10 pt
    suffix = title_suffix(r.runs) if r is not None else ""
    fig.suptitle("\n".join(textwrap.wrap(title, width) + textwrap.wrap(suffix, width)), fontsize=10)
    if r is not None:
        p = r.provenance
        n = len(r.runs)
        foot = (f"{n} finished run{'s' * (n != 1)} ({r.experiment}, scale {r.scale}); "
                f"device {', '.join(p.get('devices', []))}; "
                f"collected {p.get('collected_at', '?')[:10]}; regenerate: make figures")
        lines = textwrap.wrap(foot, int(fig.get_figwidth() * 17))  # characters per line at 6.5 pt
        fig.text(0.5, 0.005, "\n".join(lines), ha="center", va="bottom", fontsize=6.5, color="0.45")
        bottom = (0.12 * len(lines) + 0.04) / fig.get_figheight()
        fig.get_layout_engine().set(rect=(0, bottom, 1, 1 - bottom))  # (left, bottom, width, height)
    return fig


def freeze_layout(fig):
    """Constrained layout settles the axes with last-digit float noise from one run to the next;
    fixing its result, rounded, makes unchanged results give byte-identical files."""
    fig.draw_without_rendering()
    for ax in fig.axes:
        ax.set_position([round(v, 6) for v in ax.get_position().bounds])
    fig.set_layout_engine("none")


def save(fig, path):
    """path/to/figN -> figN.png and figN.pdf, the same bytes for the same results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    freeze_layout(fig)
    fig.savefig(path.with_suffix(".png"))
    fig.savefig(path.with_suffix(".pdf"), metadata={"CreationDate": None})  # no date: unchanged results, same bytes
    return [path.with_suffix(".png"), path.with_suffix(".pdf")]


def legend(ax, **kw):
    """A legend when something is labelled (a run without rows draws nothing)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def new_figure(rows, cols, size, **kw):
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False, **kw)


# ---------------------------------------------------------------- small helpers
def curve(r, run_id):
    return r.curves[r.curves["run_id"] == run_id].sort_values("iter")


def evals(r, run_id):
    return r.evals[r.evals["run_id"] == run_id].sort_values("iter")


def rolling_distance(c, frac=0.05):
    """Rolling mean of the distance over ~frac of the run, in iterations, from the per-window means."""
    d = c["d_mean_win"] if "d_mean_win" in c else c["d_mean"]
    stride = float(c["stride"].median()) if "stride" in c and len(c) else 1.0
    window = max(1, round(frac * c["iter"].max() / stride)) if len(c) else 1
    return d.rolling(window, min_periods=1).mean()


def plot_distance(ax, c, color, label, raw=True):
    """Raw distance (thin) and its rolling average (thick); a dotted line at 1 = orthogonal."""
    if c["d_mean"].notna().any():
        if raw:
            ax.plot(c["iter"], c["d_mean"], color=color, alpha=0.25, lw=0.7)
        ax.plot(c["iter"], rolling_distance(c), color=color, label=label)
    ax.axhline(1.0, color="0.3", ls=":", lw=1)
    ax.set_ylabel("cosine distance")


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


# ---------------------------------------------------------------- figures
def fig1(results_dir, scale=None):
    """Baseline train/val accuracy (top) and micro-gradient cosine distance (bottom), one column per dataset."""
    r = load(results_dir, "fig1", scale)
    if r is None:
        return None
    order = sorted(_unique(r.runs["data.name"]), key=lambda d: (d != "cifar100", d != "cifar100n", d))
    fig, ax = new_figure(2, len(order), (4.6 * len(order) + 0.6, 6.2), sharex="col")
    for j, name in enumerate(order):
        runs = r.runs[r.runs["data.name"] == name]
        for k, rid in enumerate(runs["run_id"]):
            tag = f" (seed {runs['seed'].iloc[k]})" if len(runs) > 1 else ""
            e = evals(r, rid)
            ax[0, j].plot(e["iter"], 100 * e["train_acc"], color="C0",
                          label="train: noisy labels, augmented batches" + tag)
            ax[0, j].plot(e["iter"], 100 * e["val_acc"], color="C1", label="validation" + tag)
            plot_distance(ax[1, j], curve(r, rid), "C2", "rolling average" + tag)
        ax[1, j].plot([], [], color="C2", alpha=0.25, lw=0.7, label="raw")
        ran = ran_on(name, data_used(runs).iloc[0]) if len(runs) else data_label(name)
        ax[0, j].set_title("\n".join(textwrap.wrap(ran, 56)), fontsize=8)
        ax[0, j].set_ylabel("accuracy (%)")
        ax[1, j].set_xlabel("iteration")
        legend(ax[0, j], loc="lower right")
        legend(ax[1, j], loc="lower right")
    return titled(fig, f"Figure 1: baseline accuracy and cosine distance between micro-gradients, "
                       f"{models_of(r.runs)} (data: column titles)", r)


def fig2(results_dir=None, scale=None):
    """Schematic: aligned, orthogonal and opposed 2-D gradients, with D = 1 - cos computed from the drawn vectors."""
    a = np.array([1.0, 0.35])
    cases = [("aligned", np.array([0.85, 0.6])), ("orthogonal", np.array([-0.35, 1.0])),
             ("opposed", np.array([-0.9, -0.45]))]
    fig, ax = new_figure(1, 3, (9.0, 3.4))
    for axis, (name, b) in zip(ax[0], cases):
        d = 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        for v, color, lab in ((a, COLOR["gaf"], "$g_1$"), (b, COLOR["baseline"], "$g_2$")):
            axis.annotate("", xy=v, xytext=(0, 0), arrowprops=dict(arrowstyle="-|>", color=color, lw=2))
            axis.text(*(1.12 * v), lab, color=color, ha="center", va="center", fontsize=11)
        axis.set_title(f"{name}: D = {d:.2f}")
        axis.set_xlim(-1.3, 1.3), axis.set_ylim(-1.3, 1.3)
        axis.set_aspect("equal")
        axis.set_axis_off()
        axis.axhline(0, color="0.85", lw=0.8), axis.axvline(0, color="0.85", lw=0.8)
        axis.plot(0, 0, "o", color="0.3", ms=3)
    return titled(fig, r"Figure 2: cosine distance $D(g_1, g_2) = 1 - g_1 \cdot g_2 / (|g_1|\,|g_2|)$"
                       "  (0 aligned, 1 orthogonal, 2 opposite)")


def fig3(results_dir, scale=None, late=0.25):
    """Analogue of the ViT figure: distances in the last `late` fraction of a baseline small-ViT run."""
    r = load(results_dir, "fig3", scale)
    if r is None:
        return None
    runs = r.runs[r.runs.apply(role, axis=1) == "baseline"]
    runs = runs if len(runs) else r.runs
    fig, ax = new_figure(1, 2, (10.0, 3.8), width_ratios=[2.2, 1])
    for k, rid in enumerate(runs["run_id"]):
        c = curve(r, rid)
        c = c.assign(_roll=rolling_distance(c, 0.02))
        c = c[c["iter"] >= (1 - late) * c["iter"].max()]
        tag = f"seed {runs['seed'].iloc[k]}"
        ax[0, 0].plot(c["iter"], c["d_mean"], color=f"C{k}", alpha=0.3, lw=0.7)
        ax[0, 0].plot(c["iter"], c["_roll"], color=f"C{k}", label=f"rolling average ({tag})")
        h = c.dropna(subset=["d_mean"])
        ax[0, 1].hist(h["d_mean"], weights=h["stride"], bins=30, color=f"C{k}", alpha=0.6, label=tag)
    ax[0, 0].axhline(1.0, color="0.3", ls=":", lw=1)
    ax[0, 0].set(xlabel="iteration", ylabel="cosine distance", title=f"last {late:.0%} of training")
    legend(ax[0, 0], loc="lower right")
    ax[0, 1].axvline(1.0, color="0.3", ls=":", lw=1)
    ax[0, 1].set(xlabel="cosine distance", ylabel="iterations", title="histogram, same window")
    ax[0, 1].yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    return titled(fig, f"Figure 3 analogue (ViT-L/16 on ImageNet is out of reach): {models_of(runs)} on "
                       f"{datasets_of(runs)}, baseline, cosine distance between micro-gradients late in training", r)


def batch_label(row):
    """(sort key, label): a baseline's batch size, or GAF's microbatch size m (images per class)."""
    if row["method.name"] == "baseline" and pd.notna(row.get("method.batch_size")):
        return int(row["method.batch_size"]), f"batch {int(row['method.batch_size'])}"
    return int(row["method.per_class"]), f"m = {int(row['method.per_class'])}"


def fig4(results_dir, scale=None):
    """Rolling-average distance over training, baseline runs at several batch sizes."""
    r = load(results_dir, "fig4", scale)
    if r is None:
        return None
    runs = r.runs[r.runs.apply(role, axis=1) == "baseline"]
    runs = runs if len(runs) else r.runs
    sized = sorted((batch_label(row) + (row["run_id"],) for _, row in runs.iterrows()), key=lambda t: (t[0], t[2]))
    fig, ax = new_figure(1, 1, (6.4, 4.2))
    cmap = matplotlib.colormaps["viridis"]
    for k, (_, label, rid) in enumerate(sized):
        plot_distance(ax[0, 0], curve(r, rid), cmap(k / max(1, len(sized) - 1) * 0.9), label, raw=False)
    ax[0, 0].set_xlabel("iteration")
    plain = (runs["method.name"] != "baseline").any()
    legend(ax[0, 0], title="microbatch: m images per class" if plain else "batch size", loc="lower right", ncol=2)
    what = "plain averaging (tau = 2), by microbatch size m" if plain else "baseline, by batch size"
    return titled(fig, f"Figure 4: rolling average of the micro-gradient cosine distance, {what}, "
                       f"{models_of(runs)} on {datasets_of(runs)}", r)


def fig5(results_dir, scale=None):
    """Random images and labels: train/val accuracy (top) and distances (bottom), baseline vs GAF."""
    r = load(results_dir, "fig5", scale)
    if r is None:
        return None
    fig, ax = new_figure(2, 1, (7.0, 6.4), sharex=True)
    for _, row in r.runs.assign(_role=r.runs.apply(role, axis=1)).sort_values("_role").iterrows():
        m = row["_role"]
        steps = f", stepped {row['steps_taken'] / row['iterations']:.0%} of iterations" if row["iterations"] else ""
        e, color = evals(r, row["run_id"]), COLOR.get(m, "0.3")
        ax[0, 0].plot(e["iter"], 100 * e["train_acc"], color=color, label=f"{NAME.get(m, m)} train")
        ax[0, 0].plot(e["iter"], 100 * e["val_acc"], color=color, ls="--", label=f"{NAME.get(m, m)} validation")
        plot_distance(ax[1, 0], curve(r, row["run_id"]), color, NAME.get(m, m) + steps)
    ax[0, 0].set_ylabel("accuracy (%)")
    legend(ax[0, 0], loc="center right")
    ax[1, 0].set_xlabel("iteration")
    legend(ax[1, 0], loc="lower right")
    row = r.runs.iloc[0]
    settings = (f"settings: {MODEL.get(row['model.name'], row['model.name'])}, {row.get('optim.name', 'sgd')} "
                f"lr {_fmt(row.get('optim.lr'))}, weight decay {_fmt(row.get('optim.weight_decay'))}, "
                f"{int(row['iterations'])} iterations")
    if pd.notna(row.get("data.train_per_class")):
        settings += f", {int(row['data.train_per_class'])} training images per class"
    elif row.get("data.name") == "random" and pd.notna(row.get("data.random_train")):
        settings += f", {int(row['data.random_train'])} training images"
    ax[0, 0].set_title(settings, fontsize=8)
    return titled(fig, "Figure 5: random images and random labels, baseline vs. GAF", r)


def fig6(results_dir, scale=None):
    """Best validation accuracy vs label noise, GAF vs baseline, with the paper's values dashed."""
    r = load(results_dir, "fig6", scale)
    if r is None:
        return None
    runs = r.runs[~r.runs["data.name"].isin(["cifar100n", "random"])]
    runs = runs.assign(noise=noise_pct(runs), label=variant(runs))
    fig, ax = new_figure(1, 1, (6.4, 4.8))
    a = ax[0, 0]
    for (label, method), group in runs.groupby(["label", "method.name"]):
        s = acc_stats(group, "noise")
        a.errorbar(s["noise"], s["mean"], yerr=spread(s), color=COLOR.get(method), marker=MARKER.get(method),
                   mfc="none", capsize=3, label=f"{label} (this reproduction)")
    paper = read_paper_fig6()
    for method, col in (("gaf", "gaf_val_acc_pct"), ("baseline", "baseline_val_acc_pct")):
        a.plot(paper["label_noise_pct"], paper[col], color=COLOR[method], ls="--", lw=1, alpha=0.6,
               marker=MARKER[method], ms=3, label=f"{NAME[method]} (paper)")
    a.set(xlabel="label noise (%)", ylabel="best validation accuracy over the run (%)", ylim=(0, None))
    legend(a)
    return titled(fig, f"Figure 6: validation accuracy vs. symmetric label noise, {models_of(runs)} on "
                       f"{datasets_of(runs)} (dashed: the paper's values, ResNet18 on CIFAR-100, read off its plot)", r)


def _sweep_vs_baseline(r, key, xlabel, title, categorical=False, tick=_fmt):
    """GAF's best val acc along `key` (one line per noise level), the baseline as a horizontal line."""
    runs = r.runs.assign(noise=noise_pct(r.runs))
    gaf, base = runs[runs["method.name"] != "baseline"], runs[runs["method.name"] == "baseline"]
    levels = sorted(runs["noise"].unique())
    xs = sorted(gaf[key].dropna().unique())
    pos = {x: (i if categorical else x) for i, x in enumerate(xs)}
    fig, ax = new_figure(1, 1, (6.4, 4.4))
    a = ax[0, 0]
    for k, p in enumerate(levels):
        one = len(levels) == 1
        tag = "" if one else f", {p:g}% noise"
        s = acc_stats(gaf[gaf["noise"] == p], key)
        a.errorbar(s[key].map(pos), s["mean"], yerr=spread(s), marker="s", mfc="none", capsize=3,
                   color=COLOR["gaf"] if one else f"C{k}", label="GAF" + tag)
        b = base[base["noise"] == p]
        if len(b):
            a.axhline(100 * b["best_val_acc"].mean(), color=COLOR["baseline"] if one else f"C{k}", ls="--",
                      label="baseline" + tag)
    if categorical:
        a.set_xticks(range(len(xs)), [tick(x) for x in xs])
    a.set(xlabel=xlabel, ylabel="best validation accuracy over the run (%)")
    legend(a)
    noise = f" at {levels[0]:g}% label noise" if len(levels) == 1 else ""
    return titled(fig, f"{title}{noise}, {datasets_of(runs)}", r)


def fig7(results_dir, scale=None):
    """Best val accuracy vs the agreement threshold tau, baseline as a horizontal line."""
    r = load(results_dir, "fig7", scale)
    if r is None:
        return None
    tick = lambda t: f"{t:g}" + ("\n(= averaging)" if t >= 2 else "")  # noqa: E731
    return _sweep_vs_baseline(r, "method.tau", "threshold tau (evenly spaced)", "Figure 7: validation accuracy vs. tau",
                              categorical=True, tick=tick)


def fig8(results_dir, scale=None):
    """CIFAR-100N: best val accuracy vs images per step; GAF over microbatch sizes m vs the baseline's batches."""
    r = load(results_dir, "fig8", scale)
    if r is None:
        return None
    runs = r.runs.assign(per_step=r.runs["images_seen"] / r.runs["iterations"])
    fig, ax = new_figure(1, 1, (6.4, 4.4))
    a = ax[0, 0]
    for method, group in runs.groupby("method.name"):
        s = acc_stats(group, "per_step")
        a.errorbar(s["per_step"], s["mean"], yerr=spread(s), color=COLOR.get(method),
                   marker=MARKER.get(method), mfc="none", capsize=3, label=NAME.get(method, method))
        for _, row in group.drop_duplicates("per_step").iterrows():
            note = (f"m={int(row['method.per_class'])}, n={int(row['method.n_micro'])}" if method == "gaf"
                    else batch_label(row)[1])
            y = s.loc[s["per_step"] == row["per_step"], "mean"].iloc[0]
            a.annotate(note, (row["per_step"], y), textcoords="offset points", xytext=(4, 5), fontsize=7,
                       color=COLOR.get(method))
    a.set_xscale("log")
    ticks = sorted(runs["per_step"].dropna().unique())
    a.set_xticks(ticks, [f"{t:g}" for t in ticks])
    a.minorticks_off()
    a.set(xlabel="images per iteration (GAF: n x m x classes; baseline: batch size)",
          ylabel="best validation accuracy over the run (%)")
    legend(a)
    return titled(fig, f"Figure 8: validation accuracy vs. images per step (compute), {datasets_of(runs)}", r)


def fig9(results_dir, scale=None):
    """Best val accuracy vs the number of microbatches n, baseline as a horizontal line."""
    r = load(results_dir, "fig9", scale)
    if r is None:
        return None
    return _sweep_vs_baseline(r, "method.n_micro", "number of microbatches n (evenly spaced)",
                              "Figure 9: validation accuracy vs. n", categorical=True)


FIGURES = {"fig1": fig1, "fig2": fig2, "fig3": fig3, "fig4": fig4, "fig5": fig5, "fig6": fig6, "fig7": fig7,
           "fig8": fig8, "fig9": fig9}


# ---------------------------------------------------------------- tables
def read_paper_fig6():
    return pd.read_csv(PAPER_FIG6, comment="#")


def _compare(runs, source):
    """Rows of (dataset, noise, GAF setting): baseline, GAF and GAF - baseline, best val acc in %: mean, s.d. and
    number of seeds of each (s.d. NaN for one seed), and the runs' length in iterations."""
    runs = runs.assign(noise=noise_pct(runs))
    gaf, base = runs[runs["method.name"] == "gaf"], runs[runs["method.name"] == "baseline"]
    if "method.batch_size" in base and base["method.batch_size"].nunique() > 1:  # the paper's baseline batch: 128
        sizes = base["method.batch_size"].dropna()
        base = base[base["method.batch_size"] == sizes.iloc[(sizes - 128).abs().argmin()]]
    gaf = gaf.assign(setting=variant(gaf))
    rows = []
    for (data, p, setting), g in gaf.groupby(["data.name", "noise", "setting"]):
        b = base[(base["data.name"] == data) & (base["noise"] == p)]
        used = data_used(g).iloc[0]
        noise = f"{p:g}" if data != "cifar100n" else "real (40.2%)" if used == data else "symmetric 40.2"
        bv, gv = 100 * b["best_val_acc"], 100 * g["best_val_acc"]
        rows.append({"dataset": ran_on(data, used), "label noise (%)": noise, "GAF setting": setting,
                     "baseline (%)": bv.mean() if len(b) else np.nan, "baseline s.d.": bv.std(),
                     "GAF (%)": gv.mean(), "GAF s.d.": gv.std(), "seeds": f"{len(b)} / {len(g)}",
                     "iterations": "/".join(f"{i:g}" for i in _unique(pd.concat([b, g])["iterations"])),
                     "runs": len(g) + len(b), "source": source, "_order": (data == "cifar100n", p)})
    return rows


def table1(results_dir, scale=None):
    """Table 1: noise levels (table1 experiment, else fig6) and CIFAR-100N (table1, else fig8). DataFrame or None."""
    rows, used = [], []
    t = load(results_dir, "table1", scale)
    for name, keep in (("fig6", lambda d: d != "cifar100n"), ("fig8", lambda d: d == "cifar100n")):
        src = t if t is not None and t.runs["data.name"].map(keep).any() else load(results_dir, name, scale)
        if src is None:
            continue
        runs = src.runs[src.runs["data.name"].map(keep) & (src.runs["data.name"] != "random")]
        rows += _compare(runs, src.experiment)
        used.append(src)
    if not rows:
        return None
    df = pd.DataFrame(rows).sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    df.insert(df.columns.get_loc("runs"), "difference (points)", df["GAF (%)"] - df["baseline (%)"])
    df.attrs["sources"] = list({s.experiment: s for s in used}.values())
    return df


def markdown_table(df, digits=1):
    """A GitHub markdown table (no tabulate dependency); NaN shows as '—'."""
    def cell(v):
        if isinstance(v, float):
            return "—" if np.isnan(v) else f"{v:.{digits}f}"
        return str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _provenance_lines(sources):
    lines = []
    for r in sources:
        p = r.provenance
        lines.append(f"- `{r.experiment}`: scale {r.scale}, {len(r.runs)} finished runs "
                     f"({p.get('n_unfinished', 0)} unfinished not used); device {', '.join(p.get('devices', []))}; "
                     f"collected {p.get('collected_at', '?')}; `{p.get('command', '?')}`")
        lines += [f"  - data note: {n} (full notes: `{r.experiment}/provenance.json`)" for n in data_notes(r.runs)]
    return lines


def with_spread(df, columns=("baseline", "GAF")):
    """'mean ± s.d.' cells for the markdown table (mean alone where one seed gives no s.d.)."""
    df = df.copy()
    for c in columns:
        mean, sd = df.pop(f"{c} (%)"), df.pop(f"{c} s.d.")
        cells = [("—" if np.isnan(m) else f"{m:.1f}" + ("" if np.isnan(d) else f" ± {d:.1f}"))
                 for m, d in zip(mean, sd)]
        df.insert(3 if c == "baseline" else 4, f"{c} (%)", cells)
    return df


def table1_markdown(df):
    """Table 1 with its caveat (scale, substitutions) and sources: the file and the notebook show this."""
    runs = pd.concat([s.runs for s in df.attrs["sources"]])
    suffix = title_suffix(runs)
    text = ["# Table 1: best validation accuracy (%), baseline vs. GAF", "",
            (suffix + "\n\n" if suffix else "") + "Best validation accuracy over each run (not the final one), "
            "mean ± standard deviation over seeds (no ± where one seed ran); seeds = baseline / GAF runs; "
            "difference = GAF - baseline in percentage points, of the means. Baseline = the run(s) with the "
            "same data and noise (batch size nearest the paper's 128); '—' = not run. The dataset column names "
            "what the runs trained on, and what it stood in for.", "",
            markdown_table(with_spread(df)), "",
            "Sources (regenerate: `make figures`):", *_provenance_lines(df.attrs["sources"]), ""]
    return "\n".join(text)


def write_table1(df, results_dir):
    results_dir = Path(results_dir)
    df.to_csv(results_dir / "table1.csv", index=False, float_format="%.2f")
    (results_dir / "table1.md").write_text(table1_markdown(df))
    return [results_dir / "table1.csv", results_dir / "table1.md"]


def paper_vs_repro(results_dir, scale=None):
    """The paper's figure-6 values beside the reproduced ones (fig6, else table1), or None if nothing was reproduced."""
    r = load(results_dir, "fig6", scale) or load(results_dir, "table1", scale)
    if r is None:
        return None
    runs = r.runs[~r.runs["data.name"].isin(["cifar100n", "random"])]
    gaf = runs[runs["method.name"] == "gaf"].assign(setting=lambda x: variant(x))
    if gaf["setting"].nunique() > 1:  # several GAF settings: the one covering the most noise levels
        gaf = gaf[gaf["setting"] == gaf.groupby("setting")["data.noise"].nunique().idxmax()]
    repro = {}
    for method, group in (("gaf", gaf), ("baseline", runs[runs["method.name"] == "baseline"])):
        s = acc_stats(group.assign(noise=noise_pct(group).round(6)), "noise")
        repro[method] = dict(zip(s["noise"], s["mean"]))
    paper = read_paper_fig6()
    df = pd.DataFrame({"label noise (%)": paper["label_noise_pct"],
                       "paper baseline": paper["baseline_val_acc_pct"], "repro baseline": np.nan,
                       "paper GAF": paper["gaf_val_acc_pct"], "repro GAF": np.nan})
    for method, col in (("baseline", "repro baseline"), ("gaf", "repro GAF")):
        df[col] = df["label noise (%)"].map(lambda p: repro[method].get(float(p), np.nan))
    comparable = set(data_used(runs)) == {PAPER_FIG6_SETUP[0]} and set(runs["model.name"]) == {PAPER_FIG6_SETUP[1]}
    if comparable:  # the same data set and network as the paper's figure 6: differences mean something
        df["repro - paper, baseline"] = df["repro baseline"] - df["paper baseline"]
        df["repro - paper, GAF"] = df["repro GAF"] - df["paper GAF"]
    df["GAF gain, paper"] = df["paper GAF"] - df["paper baseline"]
    df["GAF gain, repro"] = df["repro GAF"] - df["repro baseline"]
    extra = sorted((set(repro["gaf"]) | set(repro["baseline"])) - set(map(float, paper["label_noise_pct"])))
    df.attrs.update(source=r, extra_levels=extra, setting=_unique(gaf["setting"]), comparable=comparable)
    return df


def write_paper_vs_repro(df, results_dir):
    r = df.attrs["source"]
    scales = _unique(r.runs["scale"])
    setting = ", ".join(df.attrs["setting"]) or "none"
    text = ["# Figure 6: the paper's values beside this reproduction", "",
            "Best validation accuracy (%) vs. symmetric label noise. Paper: ResNet18 on CIFAR-100, read off the "
            "published figure 6 by eye (+-1 point; `scripts/paper_facts/figure6.csv`, Chaubard et al. 2024, "
            "arXiv:2412.18052). "
            f"Reproduction: experiment `{r.experiment}`, best validation accuracy over each run, mean over seeds; "
            f"GAF setting: {setting}. '—' = this noise level was not in the sweep.", "",
            f"Scale: **{', '.join(scales)}**; "
            f"models: {models_of(r.runs)}; data: {datasets_of(r.runs)}"
            + "".join(f"; {n}" for n in data_notes(r.runs)) + ".", "",
            markdown_table(df), ""]
    if not df.attrs["comparable"]:
        text += [f"No 'repro - paper' differences: these runs trained {models_of(r.runs)} on {datasets_of(r.runs)}, "
                 "the paper a ResNet18 on CIFAR-100, so their accuracies are not the same quantity. The GAF gains "
                 "(GAF - baseline) are shown side by side.", ""]
    if df.attrs["extra_levels"]:
        text += [f"Reproduced noise levels the paper's figure does not show: "
                 f"{', '.join(f'{p:g}%' for p in df.attrs['extra_levels'])} (see `{r.experiment}/runs.csv`).", ""]
    if scales != ["paper"]:
        text += [f"The {'/'.join(scales)} scale trains smaller models on smaller or substituted data for far fewer "
                 "iterations, so its accuracies are not expected to match the paper's numbers; what can be compared "
                 "is the shape: whether GAF's advantage over the baseline grows with label noise.", ""]
    else:
        text += ["Paper-scale runs: differences beyond about 2 points (the reading error of the plot plus "
                 "seed-to-seed spread) are worth a look.", ""]
    text += ["Provenance:", *_provenance_lines([r]), ""]
    path = Path(results_dir) / "paper_vs_repro.md"
    path.write_text("\n".join(text))
    return [path]


# ---------------------------------------------------------------- premise (issue 9)
def _phase_mean(c, column, start):
    """Mean of a per-window column over the iterations after `start`, windows weighted by their length."""
    c = c[c["iter"] > start]
    col = f"{column}_win" if f"{column}_win" in c else column
    w = c["stride"] if "stride" in c else pd.Series(1.0, index=c.index)
    ok = c[col].notna()
    return float((c.loc[ok, col] * w[ok]).sum() / w[ok].sum()) if ok.any() else np.nan


def _premise_baselines(r, results_dir):
    """The baseline runs at the premise's noise: its own, plus figure 6's at the same scale (the tiny scale's
    width-16 baseline is figure 6's seed-0 run at 40% noise, not run twice). Returns (runs, evals)."""
    runs, evs = [r.runs[r.runs["method.name"] == "baseline"]], [r.evals]
    f6 = load(results_dir, "fig6", r.scale)
    if f6 is not None:
        noise = r.runs["data.noise"].dropna().unique()
        b = f6.runs[(f6.runs["method.name"] == "baseline") & f6.runs["data.noise"].isin(noise)]
        runs.append(b)
        evs.append(f6.evals[f6.evals["run_id"].isin(b["run_id"])])
    return pd.concat(runs, ignore_index=True), pd.concat(evs, ignore_index=True)


def premise_table(results_dir, scale=None):
    """One row per (width, m) point of the premise preset: the unfiltered mean distance in the memorisation
    phase (tau = 2 run), GAF's share of steps taken there (tau = 0.97 run), the baseline's peak and
    memorisation, and GAF - baseline / GAF - averaging in best and final val acc (points). None if no runs."""
    r = load(results_dir, "premise", scale)
    if r is None:
        return None
    base, base_evals = _premise_baselines(r, results_dir)
    width = lambda df: df["model.width"] if "model.width" in df else pd.Series(np.nan, index=df.index)  # noqa: E731
    runs = r.runs.assign(width=width(r.runs))
    base = base.assign(width=width(base))
    rows = []
    for (w, m, seed), g in runs[runs["method.name"] == "gaf"].groupby(["width", "method.per_class", "seed"],
                                                                        dropna=False):
        avg, gaf = g[g["method.tau"] >= 2], g[g["method.tau"] < 2]
        b = base[(base["width"] == w) | (pd.isna(w) & base["width"].isna())]
        b = b[b["seed"] == seed] if (b["seed"] == seed).any() else b.head(0)
        row = {"width": w, "m": m, "seed": seed, "phase from": np.nan, "baseline memorises": "—"}
        if len(b):
            e = base_evals[base_evals["run_id"] == b["run_id"].iloc[0]].sort_values("iter")
            peak = int(e.loc[e["val_acc"].idxmax(), "iter"])
            memorises = peak < e["iter"].max()  # peaking at its last evaluation: no phase after the peak
            row.update({"phase from": peak if memorises else np.nan, "baseline memorises": "yes" if memorises else "no",
                        "baseline best": 100 * b["best_val_acc"].iloc[0],
                        "baseline final": 100 * b["final_val_acc"].iloc[0],
                        "baseline fitted flipped": 100 * e["mem_flipped_noisy_acc"].iloc[-1]})
        start = row["phase from"] if not np.isnan(row["phase from"]) else g["iterations"].max() / 2
        for name, one in (("averaging", avg), ("GAF", gaf)):
            if len(one):
                c = curve(r, one["run_id"].iloc[0])
                row[f"{name} distance"] = _phase_mean(c, "d_mean", start)
                row[f"{name} steps taken"] = _phase_mean(c, "stepped", start)
                row[f"{name} best"] = 100 * one["best_val_acc"].iloc[0]
                row[f"{name} final"] = 100 * one["final_val_acc"].iloc[0]
        rows.append(row)
    df = pd.DataFrame(rows)
    for other in ("baseline", "averaging"):
        for k in ("best", "final"):
            if f"GAF {k}" in df and f"{other} {k}" in df:
                df[f"GAF - {other}, {k}"] = df[f"GAF {k}"] - df[f"{other} {k}"]
    df.attrs["source"] = r
    return df


def premise(results_dir, scale=None):
    """Distance and gain against each swept axis: model width (at the smallest m) and m (at the largest width)."""
    df = premise_table(results_dir, scale)
    if df is None:
        return None
    r = df.attrs["source"]
    m0, w0 = df["m"].min(), df["width"].max()
    axes = [("width", df[df["m"] == m0], f"model width (m = {m0:g})"), ("m", df[df["width"] == w0],
            f"images per class per microbatch m (width {w0:g})")]
    axes = [(k, d.groupby(k).mean(numeric_only=True).reset_index(), label)
            for k, d, label in axes if d[k].nunique() > 1]
    if not axes:
        return None
    fig, ax = new_figure(2, len(axes), (4.2 * len(axes), 6.4), sharey="row")
    for j, (key, d, label) in enumerate(axes):
        top, bottom = ax[0, j], ax[1, j]
        for col, style, color, text in (
                ("averaging distance", "o-", COLOR["baseline"], "distance, averaging (tau = 2)"),
                ("GAF steps taken", "s--", COLOR["gaf"], "GAF's share of steps taken")):
            if col in d:
                top.plot(d[key], d[col], style, color=color, label=text)
        top.axhline(1.0, color="0.3", ls=":", lw=1)
        top.set(ylim=(0, 1.1), xscale="log", title="memorisation phase (after the baseline's peak)")
        for col, style, color in (("GAF - baseline, best", "^-", COLOR["baseline"]),
                                  ("GAF - baseline, final", "^:", COLOR["baseline"]),
                                  ("GAF - averaging, best", "o-", "0.4"), ("GAF - averaging, final", "o:", "0.4")):
            if col in d:
                bottom.plot(d[key], d[col], style, color=color, mfc="none", label=col)
        bottom.axhline(0, color="0.3", lw=0.8)
        bottom.set(xscale="log", xlabel=label, ylabel="validation accuracy difference (points)" if j == 0 else None)
        for a in (top, bottom):
            a.set_xticks(sorted(d[key]), [f"{x:g}" for x in sorted(d[key])])
            a.minorticks_off()
    ax[0, 0].set_ylabel("cosine distance / share of steps")
    legend(ax[0, -1], fontsize=7)
    legend(ax[1, -1], fontsize=7)
    noise = ", ".join(f"{p:g}%" for p in _unique(noise_pct(r.runs)))
    return titled(fig, f"When does GAF's premise hold? Micro-gradient distance and GAF's gain at {noise} "
                       "label noise", r)


def write_premise(df, results_dir):
    path = Path(results_dir) / "premise" / "premise.md"
    r = df.attrs["source"]
    cols = [c for c in df.columns if c not in ("seed",)]
    text = ["# When does GAF's premise hold? (experiment `premise`)", "", title_suffix(r.runs), "",
            "Per point (model width, m): 'phase from' = the iteration of the same-width baseline's best validation "
            "accuracy; after it the baseline memorises. Where the baseline peaks at its last evaluation (it never "
            "memorises: 'baseline memorises' = no) there is no such phase, and the second half of the run is measured "
            "instead. Distance = mean cosine distance between micro-gradients there "
            "in the plain-averaging run (tau = 2, mean merge: every micro-gradient measured, every step taken); steps "
            "taken = share of iterations there on which the run stepped (GAF: tau = 0.97, same microbatches). "
            "Accuracies in %, differences in points; best = best validation accuracy over the run, final = at its end.",
            "", markdown_table(df[cols], digits=2), "", "Provenance:", *_provenance_lines([r]), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
    df.to_csv(path.with_suffix(".csv"), index=False, float_format="%.4f")
    return [path, path.with_suffix(".csv")]


# ---------------------------------------------------------------- main
FIGURES["premise"] = premise
TABLES = {"table1": (table1, write_table1), "paper_vs_repro": (paper_vs_repro, write_paper_vs_repro),
          "premise_table": (premise_table, write_premise)}


def main(argv=None):
    """Draw every figure and write the tables. Returns {name: Figure or DataFrame} of what was made."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="results", help="the folder scripts/collect.py wrote")
    p.add_argument("--scale", default=None, help="plot this scale only (default: the largest one present)")
    p.add_argument("--only", nargs="+", choices=[*FIGURES, *TABLES], default=None)
    args = p.parse_args(argv)
    results = Path(args.results)
    made = {}
    for name in args.only or [*FIGURES, *TABLES]:
        if name in FIGURES:
            obj = FIGURES[name](results, args.scale)
            paths = save(obj, results / name / name) if obj is not None else []
        else:
            make, write = TABLES[name]
            obj = make(results, args.scale)
            paths = write(obj, results) if obj is not None else []
        if obj is None:
            print(f"plot: {name}: no finished runs in {results} yet, skipped")
            continue
        made[name] = obj
        print(f"plot: {name} -> {', '.join(map(str, paths))}")
    return made


if __name__ == "__main__":
    main()
