"""Result files -> figures 1-9 and the premise, robust and gpu_small figures: ``FIGURES``.

Each figure is a function (results folder, scale -> matplotlib Figure, or None where its
experiment has no finished runs yet). Reads the collected results through gaf.report.data
(finished runs, at one scale per experiment: the largest present unless a scale is asked for).
Every figure's title names its scale (when not "paper") and any data substitution, taken from
runs.csv. gaf.report.regenerate saves them (scripts/plot.py).
"""

import textwrap

import numpy as np
import pandas as pd

from gaf.report.data import (MODEL, NAME, _fmt, _unique, acc_stats, arm, curve, data_asked, data_label, data_order,
                             data_used, datasets_of, evals, load, models_of, noise_pct, optimizer, random_data, ran_on,
                             read_paper_fig6, role, spread, symmetric_noise_asked, variant)
from gaf.report.plot import (COLOR, MARKER, integer_ticks, legend, new_figure, plot_distance, rolling_distance,
                             seed_mean, shade, titled)
from gaf.report.tables import GPU_SMALL_ARMS, gpu_small_table, premise_table, robust_table


# ---------------------------------------------------------------- the paper's figures


def fig1(results_dir, scale=None):
    """Baseline train/val accuracy (top) and micro-gradient cosine distance (bottom), one column per dataset."""
    r = load(results_dir, "fig1", scale)
    if r is None:
        return None
    asked = data_asked(r.runs)
    order = sorted(_unique(asked), key=data_order)
    fig, ax = new_figure(2, len(order), (4.6 * len(order) + 0.6, 6.2), sharex="col")
    for j, name in enumerate(order):
        runs = r.runs[asked == name]
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
    integer_ticks(ax[0, 1].yaxis)
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
    for k, (_, label, rid) in enumerate(sized):
        plot_distance(ax[0, 0], curve(r, rid), shade(k, len(sized)), label, raw=False)
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
    elif random_data(row.get("data.name")) and pd.notna(row.get("data.random_train")):
        settings += f", {int(row['data.random_train'])} training images"
    ax[0, 0].set_title(settings, fontsize=8)
    return titled(fig, "Figure 5: random images and random labels, baseline vs. GAF", r)


def fig6(results_dir, scale=None):
    """Best validation accuracy vs label noise, GAF vs baseline, with the paper's values dashed."""
    r = load(results_dir, "fig6", scale)
    if r is None:
        return None
    runs = r.runs[symmetric_noise_asked(r.runs)]
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


# ---------------------------------------------------------------- the premise, robust and gpu_small experiments


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


def robust(results_dir, scale=None):
    """Each arm of experiment=robust at each noise level: best and final validation accuracy (bars,
    the std over seeds as error bars) and the flipped labels it fitted by the end."""
    df = robust_table(results_dir, scale)
    if df is None:
        return None
    r, levels = df.attrs["source"], sorted(df["noise (%)"].unique())
    fig, ax = new_figure(2, len(levels), (max(6.4, 0.75 * df["arm"].nunique() * len(levels)), 6.4), sharey="row")
    for j, noise in enumerate(levels):
        d = df[df["noise (%)"] == noise]
        x = np.arange(len(d))
        top, bottom = ax[0, j], ax[1, j]
        for k, (col, shade) in enumerate((("best", COLOR["gaf"]), ("final", "0.6"))):
            err = d[f"{col} std"] if d[f"{col} std"].notna().any() else None
            top.bar(x + (k - 0.5) * 0.38, d[f"{col} (%)"], 0.38, yerr=err, color=shade, capsize=2,
                    label=f"{col} validation accuracy")
        bottom.bar(x, d["flipped fitted (%)"], 0.6, color=COLOR["baseline"])
        top.set(title=f"{noise:g}% label noise", ylim=(0, None))
        bottom.set(ylim=(0, 100))
        bottom.set_xticks(x, d["arm"], rotation=40, ha="right")
        top.set_xticks(x, [""] * len(x))
    ax[0, 0].set_ylabel("validation accuracy (%)")
    ax[1, 0].set_ylabel("flipped labels fitted at the end (%)")
    legend(ax[0, -1], fontsize=7)
    return titled(fig, f"GAF against what a practitioner would use instead, {models_of(r.runs)} on "
                       f"{datasets_of(r.runs)}", r)


ARM_COLOR = {"baseline (CE)": COLOR["baseline"], "averaging (tau 2)": "#2ca02c", "GAF": COLOR["gaf"]}


def gpu_small(results_dir, scale=None):
    """experiment=gpu_small: a pair of rows per optimizer (validation accuracy, solid, and flipped
    training labels fitted, dashed, per arm: the mean over seeds, their range shaded; beneath,
    plain averaging's micro-gradient distance), one column per noise level."""
    df = gpu_small_table(results_dir, scale)
    if df is None:
        return None
    r, runs = df.attrs["source"], df.attrs["runs"]
    meta = r.runs.assign(optimizer=r.runs.apply(optimizer, axis=1), arm=r.runs.apply(arm, axis=1))
    optimizers, noises = list(dict.fromkeys(runs["optimizer"])), sorted(runs["noise"].unique())
    fig, ax = new_figure(2 * len(optimizers), len(noises), (max(7.0, 3.4 * len(noises) + 0.8), 4.6 * len(optimizers)),
                         sharex="col", gridspec_kw={"height_ratios": [2, 1] * len(optimizers)})
    for i, o in enumerate(optimizers):
        for j, noise in enumerate(noises):
            top, bottom = ax[2 * i, j], ax[2 * i + 1, j]
            cell = meta[(meta["optimizer"] == o) & (meta["data.noise"] == noise)]
            for name in GPU_SMALL_ARMS:
                ids = cell.loc[cell["arm"] == name, "run_id"]
                if ids.empty:
                    continue
                e = r.evals[r.evals["run_id"].isin(ids)]
                seed_mean(top, e, "val_acc", ARM_COLOR[name], f"{name} ({len(ids)} seed{'s' * (len(ids) > 1)})")
                if noise > 0:
                    seed_mean(top, e, "mem_flipped_noisy_acc", ARM_COLOR[name], None, ls="--")
                if name == "averaging (tau 2)":
                    plot_distance(bottom, curve(r, ids.iloc[0]), ARM_COLOR[name], None)
            top.set_title(f"{o}\n{noise:.0%} noise", fontsize=8)
            top.set_ylabel("accuracy (%)")
            bottom.set_xlabel("iteration")
    legend(ax[0, 0], loc="best", fontsize=6)  # the arms' colours, once
    return titled(fig, f"GAF, plain averaging on the same microbatches and the batch-128 baseline, "
                       f"{models_of(r.runs)}. Solid: validation accuracy; dashed: flipped training labels fitted "
                       "(mean over seeds, range shaded); beneath: averaging's distance (first seed)", r)


FIGURES = {"fig1": fig1, "fig2": fig2, "fig3": fig3, "fig4": fig4, "fig5": fig5, "fig6": fig6, "fig7": fig7,
           "fig8": fig8, "fig9": fig9, "premise": premise, "robust": robust, "gpu_small": gpu_small}
