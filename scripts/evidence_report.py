"""The GPU grid's figure and table (scripts/gpu_evidence.py), from its result files alone.

    python scripts/evidence_report.py results/gpu-grid      # redraw gpu-grid.png/.pdf and table.md; print
                                                            # the README's summary table

Figure: one pair of rows per optimizer regime (validation accuracy, solid, and flipped training
labels fitted, dashed, per arm as the mean over seeds with their range shaded; beneath, plain
averaging's micro-gradient distance), one column per noise level. Table: per regime, noise and
arm the mean +- std over seeds of best and final validation accuracy, flipped labels fitted,
steps taken and images seen; then GAF minus averaging per seed pair, mean +- std.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd

import plot
import tables

ARM_LABEL = {"baseline": "baseline (batch 128)", "averaging": "averaging (tau 2)", "gaf": "GAF (tau 0.97)"}
ARM_COLOR = {"baseline": plot.COLOR["baseline"], "averaging": "#2ca02c", "gaf": plot.COLOR["gaf"]}
MEMORISED = 0.5  # R2's premise: the baseline fits at least this share of the flipped labels at 40% noise


def regime_label(changes: dict) -> str:
    if not changes:
        return "the paper's optimizer (lr 0.01, weight decay 1e-2, plateau)"
    return ", ".join(f"{k.replace('_', ' ')} {v:g}" if isinstance(v, float) else f"{v} lr" for k, v in changes.items())


def arm_of(row) -> str:
    """baseline, averaging (GAF's step at tau >= 2 takes every micro-gradient) or gaf."""
    if row["method.name"] == "baseline":
        return "baseline"
    return "averaging" if row["method.tau"] >= 2 else "gaf"


def regime_of(row, regimes: dict) -> str:
    """The regime whose optimizer settings the run has (the most specific first; R1 changes none)."""
    for name, changes in sorted(regimes.items(), key=lambda kv: -len(kv[1])):
        if all(row.get(f"optim.{k}") == v for k, v in changes.items()):
            return name
    raise ValueError(f"run {row['run_id']} matches no regime of {list(regimes)}")


def load(out: Path, regimes: dict):
    """runs (with regime and arm columns), evals and curves of the grid's files."""
    runs = pd.read_csv(out / "runs.csv")
    runs["regime"] = runs.apply(regime_of, axis=1, regimes=regimes)
    runs["arm"] = runs.apply(arm_of, axis=1)
    return runs, pd.read_csv(out / "evals.csv"), pd.read_csv(out / "curves.csv")


def per_run(runs: pd.DataFrame, evals: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """One row per run that validated: its regime, noise, arm, seed and what the table reports."""
    rows = []
    for _, row in runs.iterrows():
        e = evals[evals["run_id"] == row["run_id"]].sort_values("iter")
        c = curves[curves["run_id"] == row["run_id"]].sort_values("iter")
        if e.empty:
            continue
        its = int(c["iter"].max())
        rows.append({"regime": row["regime"], "noise": row["data.noise"], "arm": row["arm"], "seed": row["seed"],
                     "finished": row["status"] == "finished", "iterations": its,
                     "best": 100 * e["val_acc"].max(), "final": 100 * e["val_acc"].iloc[-1],
                     "fitted": 100 * e["mem_flipped_noisy_acc"].iloc[-1] if row["data.noise"] > 0 else math.nan,
                     "taken": 100 * (c["stepped_win"] * c["stride"]).sum() / its,
                     "images": int(c["images_seen"].max()), "distance": tables._phase_mean(c, "d_mean", its / 2)})
    return pd.DataFrame(rows)


def pm(values: pd.Series, digits: int = 1) -> str:
    """mean +- std over seeds ('mean (1 seed)' for one)."""
    v = values.dropna()
    if v.empty:
        return "—"
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def ordered(r: pd.DataFrame, regimes: dict) -> pd.DataFrame:
    """By regime (as ``regimes`` lists them), noise, arm (as ARM_LABEL lists them), seed."""
    key = {"regime": list(regimes).index, "arm": list(ARM_LABEL).index}
    return r.sort_values(["regime", "noise", "arm", "seed"], key=lambda c: c.map(key[c.name]) if c.name in key else c)


def summary_table(r: pd.DataFrame) -> pd.DataFrame:
    """Per regime, noise and arm over the finished runs: mean +- std over seeds."""
    rows = []
    for (regime, noise, arm), g in r[r["finished"]].groupby(["regime", "noise", "arm"], sort=False):
        rows.append({"regime": regime, "noise": f"{noise:.0%}", "arm": ARM_LABEL[arm], "seeds": len(g),
                     "best (%)": pm(g["best"]), "final (%)": pm(g["final"]), "fitted (%)": pm(g["fitted"]),
                     "steps taken (%)": pm(g["taken"], 0), "images seen": f"{int(g['images'].mean()):,}",
                     "distance, 2nd half": pm(g["distance"], 3)})
    return pd.DataFrame(rows)


def gaf_minus_averaging(r: pd.DataFrame) -> pd.DataFrame:
    """GAF minus averaging on the same seed (the same microbatches), mean +- std over seeds."""
    done = r[r["finished"]]
    rows = []
    for (regime, noise), g in done.groupby(["regime", "noise"], sort=False):
        pair = g.pivot_table(index="seed", columns="arm", values=["best", "final"])
        if not {("best", "gaf"), ("best", "averaging")} <= set(pair.columns):
            continue
        pair = pair.dropna()
        rows.append({"regime": regime, "noise": f"{noise:.0%}", "seeds": len(pair),
                     "best: GAF - averaging (points)": pm(pair["best"]["gaf"] - pair["best"]["averaging"]),
                     "final: GAF - averaging (points)": pm(pair["final"]["gaf"] - pair["final"]["averaging"])})
    return pd.DataFrame(rows)


def signed(values: pd.Series) -> str:
    """pm with the mean's sign always shown (a difference)."""
    text = pm(values)
    return text if text.startswith(("-", "—")) else "+" + text


def readme_table(out: Path, regimes: dict) -> str:
    """The README's summary: per regime and noise level run so far, GAF minus averaging (best and
    final, mean +- std over seed pairs) and the flipped labels each arm fitted."""
    runs, evals, curves = load(out, regimes)
    r = ordered(per_run(runs, evals, curves), regimes)
    done = r[r["finished"]]
    lines = ["| regime | noise | seeds | best: GAF - averaging | final: GAF - averaging | "
             "fitted: averaging / GAF / baseline (%) |", "|---|---|---|---|---|---|"]
    for (regime, noise), g in done.groupby(["regime", "noise"], sort=False):
        pair = g.pivot_table(index="seed", columns="arm", values=["best", "final"]).dropna()
        fitted = " / ".join(pm(g.loc[g["arm"] == arm, "fitted"]) for arm in ("averaging", "gaf", "baseline"))
        lines.append(f"| {regime} | {noise:.0%} | {len(pair)} | {signed(pair['best']['gaf'] - pair['best']['averaging'])}"
                     f" | {signed(pair['final']['gaf'] - pair['final']['averaging'])} | {fitted} |")
    return "\n".join(lines)


def premise_lines(r: pd.DataFrame, regimes: dict) -> list[str]:
    """Whether each regime's batch-128 baseline memorised at 40% noise (R2 was chosen for it)."""
    lines = []
    for regime in regimes:
        base = r[(r["regime"] == regime) & (r["noise"] == 0.4) & (r["arm"] == "baseline") & r["finished"]]
        if not base.empty:
            fitted = base["fitted"]
            verdict = "memorised" if fitted.mean() >= 100 * MEMORISED else "did not memorise"
            lines.append(f"- {regime}, {regime_label(regimes[regime])}: the baseline at 40% noise fitted "
                         f"{pm(fitted)}% of the flipped labels by its end: {verdict} (premise: >= "
                         f"{100 * MEMORISED:.0f}%).")
    return lines


def table_markdown(out: Path, experiment: str, regimes: dict) -> str:
    runs, evals, curves = load(out, regimes)
    r = ordered(per_run(runs, evals, curves), regimes)
    calls = json.loads((out / "provenance.json").read_text()).get("calls", [])
    unfinished = r[~r["finished"]] if not r.empty else r
    return "\n".join([
        f"# {experiment}: batch-128 baseline, plain averaging and GAF on the same microbatches", "",
        "ResNet18 (torchvision) on the CIFAR-10 JPEG copy (a stand-in: CIFAR-100 is not available where this "
        "ran), symmetric label noise. "
        + "; ".join(f"{name}: {regime_label(c)}" for name, c in regimes.items()) + ".", "",
        "Calls: " + "; ".join(f"{c['card']} {c['date']} ({c.get('wall_s', '?')} s, `{c['command']}`)"
                              for c in calls) + ".", "",
        "best = best validation accuracy, final = at the last validation, fitted = share of the flipped "
        "training labels (memorisation probe) predicted as their noisy label at the end, steps taken = "
        "iterations with an optimizer step, distance = mean micro-gradient cosine distance over the second "
        "half; mean ± std over seeds, finished runs only.", "",
        *premise_lines(r, regimes), "",
        tables.markdown_table(summary_table(r)), "",
        "## GAF minus averaging (same seed, same microbatches)", "",
        tables.markdown_table(gaf_minus_averaging(r)), "",
        f"Unfinished runs (cut by a call's budget, not in the tables above): {len(unfinished)}"
        + (": " + ", ".join(sorted(runs.loc[runs["status"] != "finished", "run_id"])) if len(unfinished) else "."),
        ""])


def figure(out: Path, experiment: str, regimes: dict) -> list[Path]:
    runs, evals, curves = load(out, regimes)
    present = [g for g in regimes if g in set(runs["regime"])]  # in the order regimes lists them
    noises = sorted(runs["data.noise"].unique())
    fig, ax = plot.new_figure(2 * len(present), len(noises), (3.4 * len(noises) + 0.8, 4.6 * len(present)),
                              sharex="col", gridspec_kw={"height_ratios": [2, 1] * len(present)})
    for i, regime in enumerate(present):
        for j, noise in enumerate(noises):
            top, bottom = ax[2 * i, j], ax[2 * i + 1, j]
            cell = runs[(runs["regime"] == regime) & (runs["data.noise"] == noise)]
            for arm in ARM_LABEL:
                ids = cell.loc[cell["arm"] == arm, "run_id"]
                if ids.empty:
                    continue
                e = evals[evals["run_id"].isin(ids)]
                draw_mean(top, e, "val_acc", arm, f"{ARM_LABEL[arm]} ({len(ids)} seed{'s' * (len(ids) > 1)})")
                if noise > 0:
                    draw_mean(top, e, "mem_flipped_noisy_acc", arm, None, ls="--")
                if arm == "averaging":
                    c = curves[curves["run_id"] == ids.iloc[0]].sort_values("iter")
                    plot.plot_distance(bottom, c, ARM_COLOR[arm], None)
            top.set_title(f"{regime}, {noise:.0%} noise")
            top.set_ylabel("accuracy (%)")
            bottom.set_xlabel("iteration")
    plot.legend(ax[0, 0], loc="best", fontsize=6)  # the arms' colours, once
    fig.suptitle(f"{experiment}: ResNet18 on the CIFAR-10 JPEG copy (stand-in for CIFAR-100). Solid: validation "
                 "accuracy; dashed: flipped training labels fitted; mean over seeds, range shaded; beneath: "
                 "averaging's micro-gradient distance (first seed). "
                 + "; ".join(f"{n}: {regime_label(c)}" for n, c in regimes.items() if n in present), fontsize=9,
                 wrap=True)
    return plot.save(fig, out / experiment)


def draw_mean(ax, e: pd.DataFrame, column: str, arm: str, label, **kw) -> None:
    """The mean over seeds of a per-validation column (in %), the seeds' range shaded."""
    by = e.groupby("iter")[column]
    mean, low, high = (100 * f() for f in (by.mean, by.min, by.max))
    ax.plot(mean.index, mean.values, color=ARM_COLOR[arm], label=label, **kw)
    if (high - low).max() > 0:
        ax.fill_between(mean.index, low.values, high.values, color=ARM_COLOR[arm], alpha=0.15, lw=0)


def draw(out: Path, experiment: str, regimes: dict) -> None:
    """The figure and table.md, in ``out``."""
    figure(out, experiment, regimes)
    (out / "table.md").write_text(table_markdown(out, experiment, regimes))


if __name__ == "__main__":
    from gpu_evidence import EXPERIMENT, REGIMES

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "results" / EXPERIMENT
    draw(out, EXPERIMENT, REGIMES)
    print(readme_table(out, REGIMES))  # the README's summary of the grid
