"""Run directories -> results/<experiment>/{runs,curves,evals}.csv + provenance.json.

A run directory is any folder holding both summary.json and config.json (docs/rundir.md),
found anywhere under the run roots (default: multirun/ and outputs/). Runs are grouped by
config.experiment, and results are collected per scale: the runs found for one scale replace
that scale's rows in results/<experiment>/ and leave every other scale's rows as they are, so
a run at another scale never replaces the committed results. Ad-hoc runs (no preset, or
settings that match no scale: scale "custom") only with --ad-hoc. Every run is collected
whatever its status (plots keep the finished ones; a run whose process died says
"interrupted"). When one sweep point appears more than once (a rerun), the newest finished
run is kept and the others are listed in provenance.json. Re-running rewrites the same CSVs.
Its command line: scripts/collect.py. Imports neither matplotlib nor Hydra (a lent GPU collects
with it: scripts/gpu_evidence.py).
"""

import datetime as dt
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from gaf.config import RunConfig, settings, without_effect
from gaf.rundir import run_status
from gaf.sources import REPO

# Columns every runs.csv has, in this order (missing config keys are left empty).
SWEPT = ["data.name", "data.noise", "model.name", "model.width", "method.name", "method.tau", "method.n_micro",
         "method.per_class", "method.merge", "method.batch_size", "seed"]
SUMMARY = ["status", "final_val_acc", "best_val_acc", "iterations", "images_seen", "steps_taken", "wall_time_s",
           "images_per_s", "device", "device_name", "data_note", "data_used", "started_at", "finished_at"]
# data.name is the data that ran (summary.json's data_used); data_asked, what the config asked for (a
# substitute stood in for it where they differ).
ASKED = "data_asked"
CURVE = ["iter", "images_seen", "loss", "acc", "d_mean", "accepted", "stepped", "lr", "tau"]
WINDOW_MEANS = ["d_mean", "loss", "acc", "stepped"]  # kept as <name>_win: honest means over downsampled windows
# Config leaves that say where or how a run ran, not which sweep point it is.
NOT_A_SWEEP_KEY = {"root", "device", "dir", "out_dir", "output_dir", "run_dir", "resume", "checkpoint", "jpeg_path",
                   "download", "num_workers", "wandb", "compile", "log_every", "progress", "stop_after",
                   "eval_batch_size", "hydra"}
MAX_CURVE_ROWS = 2000
AD_HOC = "single"  # config.yaml's experiment when no preset is chosen
CUSTOM = "custom"  # the scale of a run whose settings match no scale's row
COUNTS = ("iter", "images_seen", "accepted")  # integer columns of curves.csv (empty where unknown)


def find_run_dirs(roots):
    """Every directory under `roots` holding summary.json and config.json, each once, sorted."""
    found = set()
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        for summary in root.rglob("summary.json"):
            if (summary.parent / "config.json").is_file():
                found.add(summary.parent.resolve())
    return sorted(found)


def flatten(d, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and dicts below become JSON strings."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def run_id(run_dir, roots):
    """A stable id: the run's path relative to the folder above its run root (e.g. multirun/<date>/<time>/3)."""
    for root in map(lambda r: Path(r).resolve(), roots):
        if root in run_dir.parents:
            return (Path(root.name) / run_dir.relative_to(root)).as_posix()
    return run_dir.as_posix()


def _read_json(path):
    """A JSON object, or None (said in one line) where the file is unreadable or holds something else."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = f"unreadable {path.name} ({type(e).__name__})"
    else:
        if isinstance(obj, dict):
            return obj
        reason = f"{path.name} holds a {type(obj).__name__}, not a JSON object"
    print(f"collect: skipping {path.parent}: {reason}", file=sys.stderr)
    return None


def _read_csv(path):
    """A CSV the trainer may still be writing: a missing, empty or torn file reads as an empty frame."""
    try:
        return pd.read_csv(path, on_bad_lines="skip")
    except (FileNotFoundError, UnicodeDecodeError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return pd.DataFrame()


def _as_float(s):
    """Numbers, booleans and 'True'/'False' strings -> float (anything else -> NaN)."""
    if s.dtype == bool:
        return s.astype(float)
    if not pd.api.types.is_numeric_dtype(s):
        s = s.astype(str).str.strip().replace({"True": "1", "False": "0", "true": "1", "false": "0"})
    return pd.to_numeric(s, errors="coerce").astype(float)


def _timestamp(summary, run_dir):
    """When the run ended (or started): for choosing the newest of duplicate runs."""
    for key in ("finished_at", "started_at"):
        t = pd.to_datetime(summary.get(key), errors="coerce", utc=True)
        if not pd.isna(t):
            return t.timestamp()
    return (run_dir / "summary.json").stat().st_mtime


def read_run(run_dir, roots):
    """One run directory -> (runs.csv row as a dict, its metrics frame, its eval frame), or None."""
    summary, config = _read_json(run_dir / "summary.json"), _read_json(run_dir / "config.json")
    if summary is None or config is None:
        return None
    rid = run_id(run_dir, roots)
    flat = flatten({k: v for k, v in config.items() if k not in ("experiment", "scale")})
    row = {"run_id": rid,
           "experiment": config.get("experiment") or summary.get("experiment") or "unknown",
           "scale": config.get("scale") or summary.get("scale") or "unknown"}
    row.update({k: flat.get(k) for k in SWEPT})
    row.update({k: summary.get(k) for k in SUMMARY})
    row["status"] = run_status(run_dir, summary)
    row["data_note"] = row["data_note"] or ""
    row.update({k: v for k, v in flat.items() if k not in row and k.split(".")[-1] not in NOT_A_SWEEP_KEY
                and k.split(".")[0] in ("data", "model", "method", "loss", "optim", "train")})
    row.update({k: None for k in without_effect_keys(flat) if k in row})  # what did not apply is empty
    row[ASKED], row["data.name"] = flat.get("data.name"), summary.get("data_used") or flat.get("data.name")
    # the sweep point: every config value except where/how the run ran
    point = {k: v for k, v in flat.items() if not set(k.split(".")) & NOT_A_SWEEP_KEY}
    row["_point"] = json.dumps([row["experiment"], row["scale"], sorted(point.items())], default=str)
    row["_time"] = _timestamp(summary, run_dir)
    return row, _read_csv(run_dir / "metrics.csv"), _read_csv(run_dir / "eval.csv")


def without_effect_keys(values: dict) -> set[str]:
    """The settings that had no effect on a run (GAF's tau for the baseline), from its settings as
    'section.key' -> value (a config, or a runs.csv row: empty cells are NaN); none where they do
    not make a config."""
    nested = {}
    for key, _, _ in settings(RunConfig):
        value = values.get(key)
        if key in values and not (isinstance(value, float) and math.isnan(value)):
            section, _, name = key.rpartition(".")
            (nested.setdefault(section, {}) if section else nested)[name] = value
    try:
        return {key for key, _, _, _ in without_effect(RunConfig.from_dict(nested))}
    except (ValueError, TypeError):
        return set()


def as_collected_now(runs):
    """Rows of a runs.csv written before settings without effect were left empty and data.name named
    the data that ran, as read_run writes them now."""
    runs = runs.astype(object)
    if ASKED not in runs:
        runs[ASKED] = None
    for i in runs.index[runs[ASKED].isna()]:
        row = runs.loc[i].to_dict()
        for key in without_effect_keys(row) & set(runs.columns):
            runs.at[i, key] = None
        used = row.get("data_used")
        runs.at[i, ASKED] = row["data.name"]
        runs.at[i, "data.name"] = used if isinstance(used, str) and used else row["data.name"]
    return runs.infer_objects()


def finished_settings(out_dir, configs: list[dict]) -> list[bool]:
    """Whether a finished run in out_dir/runs.csv has each config's settings (every one runs.csv
    records, but the labels experiment and scale, how a run ran, and those without effect on it)."""
    try:
        runs = pd.read_csv(Path(out_dir) / "runs.csv")
    except FileNotFoundError:
        return [False] * len(configs)
    runs = runs[runs["status"] == "finished"]
    found = []
    for config in configs:
        flat = flatten(config)
        keys = [k for k in set(flat) - without_effect_keys(flat) - {"experiment", "scale"}
                if k in runs.columns and k.rsplit(".", 1)[-1] not in NOT_A_SWEEP_KEY]
        found.append(any(all(_same(row[k], flat[k]) for k in keys) for _, row in runs.iterrows()))
    return found


def _same(recorded, setting) -> bool:
    """A runs.csv cell against a setting (an empty cell is None; CSV reads floats back inexactly)."""
    if pd.isna(recorded) or setting is None:
        return pd.isna(recorded) and setting is None
    if isinstance(setting, bool) or isinstance(recorded, str):
        return str(recorded).lower() == str(setting).lower()
    return isinstance(setting, (int, float)) and math.isclose(recorded, setting, rel_tol=1e-9)


def downsample_curve(metrics, max_rows=MAX_CURVE_ROWS):
    """Per-iteration metrics -> at most `max_rows` rows.

    Keeps the last row of every window of k = ceil(len / max_rows) consecutive iterations
    (so the final iteration is always there) and, beside the sampled values, each
    window's mean of d_mean, loss, acc and stepped (`*_win`), so rolling averages over
    the downsampled rows equal rolling averages over every iteration. `stride` = rows per window.
    """
    if metrics.empty or "iter" not in metrics:
        return pd.DataFrame(columns=CURVE + [f"{c}_win" for c in WINDOW_MEANS] + ["stride"])
    m = pd.DataFrame({c: _as_float(metrics[c]) if c in metrics else np.nan for c in CURVE})
    d_cols = [c for c in metrics if c[:1] == "d" and c[1:].isdigit()]
    if m["d_mean"].isna().all() and d_cols:  # the mean distance, if only d1..d{n-1} were written
        m["d_mean"] = metrics[d_cols].apply(_as_float).mean(axis=1)
    m = m.dropna(subset=["iter"]).sort_values("iter", kind="stable").reset_index(drop=True)
    k = max(1, math.ceil(len(m) / max_rows))
    window = m.index // k
    groups = m.groupby(window)
    out = groups.tail(1).reset_index(drop=True)  # the last row of each window
    means = groups[WINDOW_MEANS].mean().reset_index(drop=True)
    for c in WINDOW_MEANS:
        out[f"{c}_win"] = means[c]
    out["stride"] = groups.size().reset_index(drop=True)
    for c in COUNTS:  # counts stay integers (empty where unknown)
        out[c] = out[c].round().astype("Int64")
    return out


def dedupe(runs):
    """Keep one run per sweep point: the newest finished one (else the newest). Returns (kept, dropped)."""
    runs = runs.assign(_finished=runs["status"].eq("finished"))
    runs = runs.sort_values(["_point", "_finished", "_time", "run_id"], ascending=[True, False, False, True])
    first = ~runs.duplicated("_point", keep="first")
    kept = runs[first]
    kept_id = dict(zip(kept["_point"], kept["run_id"]))
    dropped = [{"dropped": rid, "status": status, "kept": kept_id[point]}
               for rid, status, point in zip(runs.loc[~first, "run_id"], runs.loc[~first, "status"],
                                             runs.loc[~first, "_point"])]
    return kept.drop(columns="_finished"), dropped


def is_try_out(row, scales=None):
    """No preset, or a preset run whose settings match no scale (unless ``scales`` asks for custom)."""
    return row["experiment"] == AD_HOC or (row["scale"] == CUSTOM and CUSTOM not in (scales or ()))


def collect(run_roots=("multirun", "outputs"), results_dir="results", max_curve_rows=MAX_CURVE_ROWS, command=None,
            ad_hoc=False, scales=None, add=False):
    """Collect every run under `run_roots` into `results_dir`, scale by scale. Returns {experiment: runs
    DataFrame}. Ad-hoc runs (no preset, or scale "custom") only when `ad_hoc`: a try-out is not a result.
    `scales`: collect runs of these scales only ("custom" among them collects custom-scale preset runs).
    `add`: the runs found join what results/<experiment>/ holds (a run of the same id replaced) instead
    of replacing their scales' rows (a grid continued call after call: scripts/gpu_evidence.py)."""
    if not (isinstance(max_curve_rows, int) and max_curve_rows >= 1):
        raise ValueError(f"max_curve_rows must be an integer >= 1, got {max_curve_rows!r}")
    run_roots, results_dir = list(run_roots), Path(results_dir)
    rows, curves, evals, skipped = [], {}, {}, 0
    for run_dir in find_run_dirs(run_roots):
        got = read_run(run_dir, run_roots)
        if got is None:
            continue
        row, metrics, ev = got
        if scales is not None and row["scale"] not in scales:
            continue
        if is_try_out(row, scales) and not ad_hoc:
            skipped += 1
            continue
        if row["run_id"] in curves:  # two roots with the same name: fall back to the full path
            row["run_id"] = run_dir.as_posix()
        rows.append(row)
        curves[row["run_id"]] = downsample_curve(metrics, max_curve_rows)
        evals[row["run_id"]] = ev
    if skipped:
        print(f"collect: {skipped} ad-hoc run(s) (experiment={AD_HOC} or scale={CUSTOM}) left out; "
              "--ad-hoc collects them")
    if not rows:
        print(f"collect: no run directories (summary.json + config.json) under {', '.join(map(str, run_roots))}")
        return {}
    command = command or "collect(run_roots=%r, results_dir=%r)" % (run_roots, str(results_dir))
    out = {}
    for experiment in sorted({row["experiment"] for row in rows}):
        runs, dropped = dedupe(experiment_runs(rows, experiment))
        runs = runs.drop(columns=["_point", "_time"])
        other = other_scales(results_dir / experiment, set(runs["scale"]), set(runs["run_id"]) if add else None)
        if other is not None:
            runs = pd.concat([runs, other.runs], ignore_index=True)
            dropped += other.dropped
            for frames, old in ((curves, other.curves), (evals, other.evals)):
                frames.update({rid: old.get(rid, pd.DataFrame()) for rid in other.runs["run_id"]})
        runs = runs.sort_values("run_id").dropna(axis=1, how="all")
        runs = runs.astype({key: "Int64" for key in CONDITIONAL_INTS if key in runs})
        runs = runs.reindex(columns=list(dict.fromkeys(["run_id", "experiment", "scale", *SWEPT, *SUMMARY, ASKED,
                                                        *runs.columns])))
        _write_experiment(results_dir / experiment, runs, curves, evals, dropped, command, run_roots)
        out[experiment] = runs
        n_unfinished = int((runs["status"] != "finished").sum())
        print(f"collect: {experiment}: {len(runs)} runs ({n_unfinished} unfinished, {len(dropped)} duplicates "
              f"dropped) -> {results_dir / experiment}")
    return out


def other_scales(out_dir, scales, found=None):
    """What results/<experiment>/ already holds at scales other than ``scales`` (or, given the ids
    ``found``, of runs other than those): its runs, their curves and evals by run id, and their
    dropped duplicates; None when there is nothing to keep."""
    try:
        old = pd.read_csv(out_dir / "runs.csv")
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return None
    old = old[~old["scale"].isin(scales) if found is None else ~old["run_id"].isin(found)]
    if old.empty:
        return None
    old = as_collected_now(old)
    ids = set(old["run_id"])
    frames = {}
    for name in ("curves", "evals"):
        f = _read_csv(out_dir / f"{name}.csv")
        f = f[f["run_id"].isin(ids)] if "run_id" in f else pd.DataFrame(columns=["run_id"])
        for c in COUNTS if name == "curves" else ():
            if c in f:
                f[c] = f[c].round().astype("Int64")
        frames[name] = {rid: g.drop(columns="run_id").reset_index(drop=True)
                        for rid, g in f.groupby("run_id")}
    provenance = (_read_json(out_dir / "provenance.json") if (out_dir / "provenance.json").is_file() else None) or {}
    dropped = [d for d in provenance.get("duplicates_dropped", []) if d.get("kept") in ids]
    return SimpleNamespace(runs=old, curves=frames["curves"], evals=frames["evals"], dropped=dropped)


def _stack(frames, run_ids):
    parts = [f.assign(run_id=rid) for rid in run_ids if not (f := frames[rid]).empty]
    if not parts:
        return pd.DataFrame(columns=["run_id"])
    df = pd.concat(parts, ignore_index=True)
    return df[["run_id"] + [c for c in df.columns if c != "run_id"]]


# Numeric settings that may be null (a model's width, a data subset) are floats in every runs.csv,
# whether or not one of its runs has them null: a file does not depend on what is collected beside it.
NULLABLE_NUMBERS = [key for key, f, _ in settings(RunConfig)
                    if f.metadata["rule"].optional and f.metadata["rule"].kind in ("int", "float")]
# Integer settings that do not apply to every run (left empty there) stay integers.
CONDITIONAL_INTS = [key for key, f, _ in settings(RunConfig)
                    if f.metadata["rule"].kind == "int" and f.metadata["rule"].applies and not f.metadata["rule"].optional]


def experiment_runs(rows, experiment):
    """One experiment's rows as a frame of its own (its columns' types are its runs' alone)."""
    runs = pd.DataFrame([row for row in rows if row["experiment"] == experiment])
    return runs.astype({key: float for key in NULLABLE_NUMBERS if key in runs})


# Provenance that says when and how collect ran, not what was collected.
WHEN_AND_HOW = ("collected_at", "command", "run_roots")


def portable_root(root) -> str:
    """A run root as provenance records it: relative to the repository where it lies in it, else as given
    (an absolute path of one machine means nothing on another)."""
    path = Path(root).resolve()
    return path.relative_to(REPO).as_posix() if REPO in path.parents else str(root)


def record_call(out_dir: Path, call: dict, run_roots: list[str]) -> None:
    """provenance.json's "calls" with ``call`` added, or replacing the entry of its date: what each call of
    a grid continued call after call ran (scripts/gpu_evidence.py); ``run_roots`` as it names them."""
    path = Path(out_dir) / "provenance.json"
    provenance = _read_json(path) if path.is_file() else {}
    calls = [c for c in provenance.get("calls", []) if c.get("date") != call["date"]] + [call]
    path.write_text(json.dumps({**provenance, "calls": calls, "run_roots": run_roots}, indent=2, default=str) + "\n")


def _write_experiment(out_dir, runs, curves, evals, dropped, command, run_roots):
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = list(runs["run_id"])
    tables = {"runs.csv": runs.to_csv(index=False), "curves.csv": _stack(curves, ids).to_csv(index=False),
              "evals.csv": _stack(evals, ids).to_csv(index=False)}
    status = runs["status"].fillna("unknown").value_counts().sort_index()
    provenance = {
        "experiment": runs["experiment"].iloc[0],
        "scales": sorted(runs["scale"].dropna().unique().tolist()),
        "devices": sorted({f"{d} ({n})" if n and n != d else str(d) for d, n in
                           zip(runs["device"].fillna(""), runs["device_name"].fillna(""))}),
        "collected_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "run_roots": [portable_root(r) for r in run_roots],
        "n_runs": len(runs),
        "n_finished": int(status.get("finished", 0)),
        "n_unfinished": int(len(runs) - status.get("finished", 0)),
        "status_counts": {k: int(v) for k, v in status.items()},
        "unfinished_runs": runs.loc[runs["status"] != "finished", "run_id"].tolist(),
        "data_notes": sorted(n for n in runs["data_note"].dropna().unique() if n),
        "duplicates_dropped": dropped,
        "note": "Plots use finished runs only. Where one sweep point was run more than once, "
                "the newest finished run is kept; the others are listed in duplicates_dropped.",
    }
    old = _read_json(out_dir / "provenance.json") if (out_dir / "provenance.json").is_file() else None
    provenance = {**(old or {}), **provenance}  # what others recorded there (a GPU call's record) stays
    unchanged = (old is not None and all((out_dir / name).is_file() and (out_dir / name).read_text() == text
                                         for name, text in tables.items())
                 and {k: v for k, v in old.items() if k not in WHEN_AND_HOW}
                 == {k: v for k, v in provenance.items() if k not in WHEN_AND_HOW})
    if unchanged:  # the same results: leave the files, and when and how they were made, as they are
        return
    for name, text in tables.items():
        (out_dir / name).write_text(text)
    (out_dir / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")

