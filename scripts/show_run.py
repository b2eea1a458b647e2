"""Look at one run directory, or compare several: what each is, how far it got, its curves.

Prints each run's status (a run whose process died reads "interrupted"), length, best and
final validation accuracy, the share of flipped labels it fits, and the settings in which the
runs differ; draws validation accuracy, the memorisation probe and the micro-gradient
distance over iterations, one colour per run.

    python scripts/show_run.py outputs/single/custom/seed=1
    python scripts/show_run.py RUN_A RUN_B --out compare.png
"""

import argparse
import json
import sys
import textwrap
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's gaf, whichever tree .venv installed
from gaf.report import plot  # noqa: E402  (the figures' style, pinned fonts and helpers)
from gaf.report.collect import flatten, without_effect_keys  # noqa: E402
from gaf.rundir import RunDirError, differences, read_json, run_status  # noqa: E402


TITLE_CHARS = 100  # a line of the title at fontsize 8 within the figure's 7 inches


def read_run(run_dir: Path) -> dict:
    """One run directory's files; an error naming the folder when it is not a run directory."""
    if not (run_dir / "summary.json").is_file():
        raise SystemExit(f"error: {run_dir} holds no summary.json: not a run directory of gaf.train")
    try:
        summary = read_json(run_dir / "summary.json")
    except RunDirError as e:
        raise SystemExit(f"error: {e}") from None
    frames = {}
    for name in ("eval", "metrics"):
        try:
            frames[name] = pd.read_csv(run_dir / f"{name}.csv")
        except (FileNotFoundError, pd.errors.EmptyDataError):
            frames[name] = pd.DataFrame(columns=["iter"])
    return dict(dir=run_dir, summary=summary, config=summary.get("config", {}), status=run_status(run_dir, summary),
                **frames)


def describe(run: dict) -> str:
    s, e = run["summary"], run["eval"]
    fitted = e["mem_flipped_noisy_acc"].iloc[-1] if len(e) and "mem_flipped_noisy_acc" in e else float("nan")
    return (f"{run['dir']}: {run['status']} at iteration {s.get('iterations')} of "
            f"{run['config'].get('train', {}).get('iterations')}; val acc best {s.get('best_val_acc', float('nan')):.4f}"
            f", final {s.get('final_val_acc', float('nan')):.4f}; flipped labels fitted {fitted:.3f}; "
            f"{s.get('images_per_s', 0):.0f} images/s; {s.get('data_note', '')}")


def differing_keys(runs: list[dict]) -> list[str]:
    """The settings in which the runs differ (operational keys aside)."""
    return sorted({k for r in runs[1:] for k, _, _ in differences(runs[0]["config"], r["config"])})


def curve_labels(runs: list[dict]) -> list[str]:
    """Each run's curves named by the settings that differ and apply to it ('run k' where none do)."""
    if len(runs) == 1:
        return ["run"]
    keys, labels = differing_keys(runs), []
    for k, r in enumerate(runs):
        flat = flatten(r["config"])
        unused = without_effect_keys(flat)
        parts = [f"{key}={v if isinstance(v := flat.get(key), str) else json.dumps(v)}"
                 for key in keys if key not in unused]
        labels.append(", ".join(parts) or f"run {k + 1}")
    return labels


def differing(runs: list[dict]) -> list[str]:
    """'key: a | b | c' for every setting in which the runs differ; '-' where it had no effect on a run."""
    keys = differing_keys(runs)
    values = [flatten(r["config"]) for r in runs]
    unused = [without_effect_keys(v) for v in values]
    return [f"{k}: " + " | ".join("-" if k in u else json.dumps(v.get(k)) for v, u in zip(values, unused))
            for k in keys]


def draw(runs: list[dict]):
    fig, ax = plot.new_figure(3, 1, (7.0, 7.6), sharex=True)
    for k, (run, label) in enumerate(zip(runs, curve_labels(runs))):
        color, e, m = f"C{k}", run["eval"], run["metrics"]
        if "val_acc" in e:
            ax[0, 0].plot(e["iter"], 100 * e["val_acc"], color=color, label=label)
        if "mem_flipped_noisy_acc" in e:
            ax[1, 0].plot(e["iter"], 100 * e["mem_flipped_noisy_acc"], color=color, label=label)
        if "d_mean" in m and m["d_mean"].notna().any():
            c = m.assign(d_mean_win=m["d_mean"], stride=1)
            ax[2, 0].plot(m["iter"], plot.rolling_distance(c), color=color, label=label)
    ax[0, 0].set_ylabel("validation accuracy (%)")
    ax[1, 0].set_ylabel("flipped labels fitted (%)")
    ax[2, 0].set(ylabel="cosine distance\n(rolling mean)", xlabel="iteration")
    for a in ax[:, 0]:
        plot.legend(a)
    title = ("; ".join(f"run {k + 1}: {r['dir'].name}" for k, r in enumerate(runs)) if len(runs) > 1
             else str(runs[0]["dir"]))
    fig.suptitle("\n".join(textwrap.wrap(title, TITLE_CHARS)), fontsize=8)  # a folder name runs to 200 bytes
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (each holds summary.json)")
    p.add_argument("--out", type=Path, default=Path("show_run.png"), help="the figure (default: show_run.png)")
    args = p.parse_args(argv)
    runs = [read_run(d) for d in args.runs]
    for k, run in enumerate(runs):
        print(f"run {k + 1}: {describe(run)}")
    if len(runs) > 1:
        lines = differing(runs)
        print("settings that differ:" if lines else "settings: identical")
        for line in lines:
            print(f"  {line}")
    draw(runs).savefig(args.out)
    print(f"curves -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
