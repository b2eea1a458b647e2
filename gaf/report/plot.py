"""The figures' matplotlib: their style and pinned fonts, making, titling and saving a figure,
what a figure drew (for its sidecar), and the drawing helpers the figures and scripts/show_run.py
share. The one module of gaf that imports matplotlib.
"""

import textwrap
from pathlib import Path

import matplotlib
import matplotlib.font_manager
import matplotlib.ticker
import numpy as np
from matplotlib.collections import Collection
from matplotlib.figure import Figure  # figures made without pyplot: no global state, any backend
from matplotlib.patches import Rectangle

from gaf.report.data import title_suffix

COLOR = {"gaf": "#1f4fb4", "baseline": "#d62728"}
MARKER = {"gaf": "s", "baseline": "^"}
STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
         "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
         "legend.frameon": False, "lines.linewidth": 1.5, "figure.dpi": 110, "savefig.dpi": 150,
         "font.family": "DejaVu Sans", "mathtext.fontset": "dejavusans"}
matplotlib.rcParams.update(STYLE)


def pin_fonts():
    """Glyphs come from matplotlib's own font files only. A system may hold other versions of the
    same fonts (DejaVu under /usr/share/fonts), and which of two equal matches wins depends on the
    order of a machine's font cache: the drawn bytes would depend on the machine."""
    own = Path(matplotlib.get_data_path(), "fonts", "ttf").resolve()
    manager = matplotlib.font_manager.fontManager
    manager.ttflist = [f for f in manager.ttflist if Path(f.fname).resolve().parent == own]
    manager._findfont_cached.cache_clear()  # nothing may keep a match found before the pin


pin_fonts()


# ---------------------------------------------------------------- drawing and saving


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


def drawn_content(fig):
    """What a figure shows, free of fonts and layout: every line's, bar's and marker's data and every
    text, in drawing order (numbers to 6 significant digits: library versions may move the last bits)."""
    def numbers(values):
        return " ".join(f"{v:.6g}" for v in np.ma.filled(np.ma.asarray(values, dtype=float), np.nan).ravel())

    parts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), *(t.get_text() for t in ax.texts)]
        parts += [f"line {ln.get_label()}: {numbers(ln.get_xydata())}" for ln in ax.get_lines()]
        parts += [f"bar {numbers([p.get_x(), p.get_y(), p.get_width(), p.get_height()])}"
                  for p in ax.patches if isinstance(p, Rectangle)]
        parts += [f"markers {numbers(c.get_offsets())}" for c in ax.collections if isinstance(c, Collection)]
        if ax.get_legend() is not None:
            parts += [f"legend {t.get_text()}" for t in ax.get_legend().get_texts()]
    return "\n".join(parts)


# ---------------------------------------------------------------- small helpers


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


def seed_mean(ax, e, column, color, label, **kw):
    """The mean over seeds of a per-validation column (in %), the seeds' range shaded."""
    by = e.groupby("iter")[column]
    mean, low, high = (100 * f() for f in (by.mean, by.min, by.max))
    ax.plot(mean.index, mean.values, color=color, label=label, **kw)
    if (high - low).max() > 0:
        ax.fill_between(mean.index, low.values, high.values, color=color, alpha=0.15, lw=0)


def shade(k, n):
    """The k-th of n colours along viridis (its palest tenth left out)."""
    return matplotlib.colormaps["viridis"](k / max(1, n - 1) * 0.9)


def integer_ticks(axis):
    """Ticks at whole numbers only (counts)."""
    axis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
