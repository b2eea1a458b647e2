"""Result files -> table 1, the paper-vs-reproduction note, the premise and the robust tables (Markdown and CSV).

Each table is a ``make`` function (results folder, scale -> DataFrame or None) and a ``write``
function (DataFrame, results folder -> the paths written); ``TABLES`` names them for gaf.report.regenerate.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from gaf.datasets import DATA_SETS
from gaf.report.data import (PAPER_FIG6_SETUP, _unique, acc_stats, arm, arm_order, curve, data_asked, data_notes,
                             data_used, datasets_of, human_labelled, load, models_of, noise_pct, optimizer, random_data,
                             ran_on, read_paper_fig6, symmetric_noise_asked, title_suffix, variant)

def _compare(runs, source):
    """Rows of (dataset, noise, GAF setting): baseline, GAF and GAF - baseline, best val acc in %: mean, s.d. and
    number of seeds of each (s.d. NaN for one seed), and the runs' length in iterations."""
    runs = runs.assign(noise=noise_pct(runs), asked=data_asked(runs))
    gaf, base = runs[runs["method.name"] == "gaf"], runs[runs["method.name"] == "baseline"]
    if "method.batch_size" in base and base["method.batch_size"].nunique() > 1:  # the paper's baseline batch: 128
        sizes = base["method.batch_size"].dropna()
        base = base[base["method.batch_size"] == sizes.iloc[(sizes - 128).abs().argmin()]]
    gaf = gaf.assign(setting=variant(gaf))
    rows = []
    for (data, p, setting), g in gaf.groupby(["asked", "noise", "setting"]):
        b = base[(base["asked"] == data) & (base["noise"] == p)]
        used = data_used(g).iloc[0]
        noise = f"{p:g}"
        if human_labelled(data):  # the noise of its human labels, or symmetric noise at their rate in their place
            rate = DATA_SETS[data].human_noise_rate
            noise = f"real ({rate:.1%})" if used == data else f"symmetric {100 * rate:g}"
        bv, gv = 100 * b["best_val_acc"], 100 * g["best_val_acc"]
        rows.append({"dataset": ran_on(data, used), "label noise (%)": noise, "GAF setting": setting,
                     "baseline (%)": bv.mean() if len(b) else np.nan, "baseline s.d.": bv.std(),
                     "GAF (%)": gv.mean(), "GAF s.d.": gv.std(), "seeds": f"{len(b)} / {len(g)}",
                     "iterations": "/".join(f"{i:g}" for i in _unique(pd.concat([b, g])["iterations"])),
                     "runs": len(g) + len(b), "source": source, "_order": (human_labelled(data), p)})
    return rows

def table1(results_dir, scale=None):
    """Table 1: noise levels (table1 experiment, else fig6) and CIFAR-100N (table1, else fig8). DataFrame or None."""
    rows, used = [], []
    t = load(results_dir, "table1", scale)
    for name, keep in (("fig6", lambda d: not human_labelled(d)), ("fig8", human_labelled)):
        src = t if t is not None and data_asked(t.runs).map(keep).any() else load(results_dir, name, scale)
        if src is None:
            continue
        asked = data_asked(src.runs)
        runs = src.runs[asked.map(keep) & ~asked.map(random_data)]
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
    runs = r.runs[symmetric_noise_asked(r.runs)]
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
            "published figure 6 by eye (+-1 point; `gaf/report/paper_facts/figure6.csv`, Chaubard et al. 2024, "
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


def robust_table(results_dir, scale=None):
    """One row per (noise, arm) of experiment=robust: best and final validation accuracy (mean and
    std over seeds, %), the flipped training labels fitted at the end (%) and the images seen.
    None if no runs."""
    r = load(results_dir, "robust", scale)
    if r is None:
        return None
    last = r.evals.sort_values("iter").groupby("run_id").tail(1).set_index("run_id")
    runs = r.runs.assign(arm=r.runs.apply(arm, axis=1), noise=noise_pct(r.runs),
                         fitted=100 * r.runs["run_id"].map(last["mem_flipped_noisy_acc"]))
    rows = []
    for (noise, name), g in runs.groupby(["noise", "arm"]):
        row = {"noise (%)": noise, "arm": name, "seeds": len(g)}
        for k in ("best", "final"):
            v = 100 * g[f"{k}_val_acc"]
            row[f"{k} (%)"], row[f"{k} std"] = v.mean(), v.std() if len(g) > 1 else np.nan
        row["flipped fitted (%)"] = g["fitted"].mean()
        row["images seen"] = int(g["images_seen"].mean())
        rows.append(row)
    df = pd.DataFrame(rows)
    df = df.sort_values(["noise (%)", "arm"], key=lambda c: c.map(arm_order) if c.name == "arm" else c)
    df = df.reset_index(drop=True)
    df.attrs["source"] = r
    return df


def write_robust(df, results_dir):
    path = Path(results_dir) / "robust" / "robust.md"
    r = df.attrs["source"]
    text = ["# Against what a practitioner would use instead (experiment `robust`)", "", title_suffix(r.runs), "",
            "Every arm trains the same network on the same data and noise, seeds alike; the baseline-type arms "
            "(cross-entropy, label smoothing 0.1, GCE q 0.7, SCE with Wang et al.'s weights for the data that "
            "ran) and co-teaching step on batches of method.batch_size images, GAF and plain averaging (tau 2, "
            "mean merge) on the same class-balanced microbatches as each other. Accuracies in % on the "
            "validation set: best = best over the run, final = at its end (mean over seeds; std where there "
            "are two or more). Flipped fitted = share of the probed training samples whose label was flipped "
            "that the network predicts as the flipped label at the end (memorisation). Images seen = training images "
            "a run consumed (co-teaching: each of its two networks): at the same iteration count the arms on "
            "batches see method.batch_size images per step, GAF and averaging n x m x classes. Our symmetric noise always "
            "changes a label; published numbers whose noise may keep it are not directly comparable.",
            "", markdown_table(df, digits=1), "", "Provenance:", *_provenance_lines([r]), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
    df.to_csv(path.with_suffix(".csv"), index=False, float_format="%.4f")
    return [path, path.with_suffix(".csv")]


# ---------------------------------------------------------------- experiment=gpu_small: GAF against its control

GPU_SMALL_ARMS = ["baseline (CE)", "averaging (tau 2)", "GAF"]
MEMORISED = 50.0  # the cosine regime's premise: the baseline fits this share (%) of the flipped labels at 40% noise


def gpu_small_runs(r):
    """One row per finished run of experiment=gpu_small: its optimizer, noise, arm, seed and what the
    tables report (accuracies, flipped labels fitted and steps taken in %; averaging's distance over
    the second half)."""
    last = r.evals.sort_values("iter").groupby("run_id").tail(1).set_index("run_id")
    rows = []
    for _, row in r.runs.iterrows():
        c = curve(r, row["run_id"])
        its = int(row["iterations"])
        rows.append({"optimizer": optimizer(row), "noise": row["data.noise"], "arm": arm(row), "seed": row["seed"],
                     "best": 100 * row["best_val_acc"], "final": 100 * row["final_val_acc"],
                     "fitted": 100 * last.loc[row["run_id"], "mem_flipped_noisy_acc"] if row["data.noise"] > 0
                     else np.nan, "taken": 100 * row["steps_taken"] / its, "images": int(row["images_seen"]),
                     "distance": _phase_mean(c, "d_mean", its / 2)})
    out = pd.DataFrame(rows)
    order = {"optimizer": lambda v: (not v.endswith("(the paper's)"), v), "arm": GPU_SMALL_ARMS.index}
    return out.sort_values(["optimizer", "noise", "arm", "seed"], key=lambda c: c.map(order[c.name])
                           if c.name in order else c).reset_index(drop=True)


def pm(values, digits=1, signed=False):
    """'mean ± std' over seeds ('mean' for one seed; '—' for none); ``signed``: the mean's sign always shown."""
    v = pd.Series(values).dropna()
    if v.empty:
        return "—"
    text = f"{v.mean():{'+' if signed else ''}.{digits}f}"
    return text + (f" ± {v.std():.{digits}f}" if len(v) > 1 else "")


def gpu_small_table(results_dir, scale=None):
    """Per optimizer, noise and arm: mean ± std over seeds of best and final validation accuracy,
    flipped labels fitted, steps taken, images seen, averaging's distance. None if no runs."""
    r = load(results_dir, "gpu_small", scale)
    if r is None:
        return None
    runs = gpu_small_runs(r)
    rows = [{"optimizer": o, "noise": f"{n:.0%}", "arm": a, "seeds": len(g), "best (%)": pm(g["best"]),
             "final (%)": pm(g["final"]), "fitted (%)": pm(g["fitted"]), "steps taken (%)": pm(g["taken"], 0),
             "images seen": f"{int(g['images'].mean()):,}", "distance, 2nd half": pm(g["distance"], 3)}
            for (o, n, a), g in runs.groupby(["optimizer", "noise", "arm"], sort=False)]
    df = pd.DataFrame(rows)
    df.attrs.update(source=r, runs=runs)
    return df


def gaf_minus_averaging(runs):
    """Per optimizer and noise: GAF minus averaging on the same seed (the same microbatches), best and
    final, mean ± std over seed pairs, and the flipped labels each arm fitted."""
    rows = []
    for (o, n), g in runs.groupby(["optimizer", "noise"], sort=False):
        pair = g.pivot_table(index="seed", columns="arm", values=["best", "final"])
        if not {("best", "GAF"), ("best", "averaging (tau 2)")} <= set(pair.columns):
            continue
        pair = pair.dropna()
        rows.append({"optimizer": o, "noise": f"{n:.0%}", "seeds": len(pair),
                     "best: GAF - averaging": pm(pair["best"]["GAF"] - pair["best"]["averaging (tau 2)"], signed=True),
                     "final: GAF - averaging": pm(pair["final"]["GAF"] - pair["final"]["averaging (tau 2)"], signed=True),
                     "fitted: averaging / GAF / baseline (%)": " / ".join(
                         pm(g.loc[g["arm"] == a, "fitted"]) for a in ("averaging (tau 2)", "GAF", "baseline (CE)"))})
    return pd.DataFrame(rows)


def premise_lines(runs):
    """Whether each optimizer's batch-128 baseline memorised at 40% noise (the cosine regime was chosen for it)."""
    lines = []
    for o, g in runs[(runs["noise"] == 0.4) & (runs["arm"] == "baseline (CE)")].groupby("optimizer", sort=False):
        verdict = "memorised" if g["fitted"].mean() >= MEMORISED else "did not memorise"
        lines.append(f"- {o}: the baseline at 40% noise fitted {pm(g['fitted'])}% of the flipped labels by its "
                     f"end: {verdict} (premise: >= {MEMORISED:.0f}%).")
    return lines


def write_gpu_small(df, results_dir):
    path = Path(results_dir) / "gpu_small" / "gpu_small.md"
    r, runs = df.attrs["source"], df.attrs["runs"]
    calls = r.provenance.get("calls", [])
    text = ["# The grid that decides: baseline, plain averaging and GAF on the same microbatches "
            "(experiment `gpu_small`)", "", title_suffix(r.runs), "",
            "Calls: " + "; ".join(f"{c['card']} {c['date']} ({c.get('wall_s', '?')} s, `{c['command']}`)"
                                  for c in calls) + ".", "",
            "best = best validation accuracy, final = at the last validation, fitted = share of the flipped "
            "training labels (memorisation probe) predicted as their noisy label at the end, steps taken = "
            "iterations with an optimizer step, distance = mean micro-gradient cosine distance over the second "
            "half; mean ± std over seeds, finished runs only.", "", *premise_lines(runs), "",
            markdown_table(df), "", "## GAF minus averaging (same seed, same microbatches; points)", "",
            markdown_table(gaf_minus_averaging(runs)), "", "Provenance:", *_provenance_lines([r]), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
    df.to_csv(path.with_suffix(".csv"), index=False)
    return [path, path.with_suffix(".csv")]


TABLES = {"table1": (table1, write_table1), "paper_vs_repro": (paper_vs_repro, write_paper_vs_repro),
          "premise_table": (premise_table, write_premise), "robust_table": (robust_table, write_robust),
          "gpu_small_table": (gpu_small_table, write_gpu_small)}
