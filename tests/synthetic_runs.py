"""Small synthetic run directories that follow docs/rundir.md, for testing collect/plot.

The numbers are made up but plausible (accuracies rise, GAF beats the baseline under
label noise, distances sit near 1), so the figures drawn from them look like figures.
Nothing here trains anything.

    write_experiment(root, "fig6")   # one Hydra-style multirun: root/<date>/<time>/<job>/
    write_all(root)                  # every experiment the figures need
"""

import datetime as dt
import json
import zlib
from pathlib import Path

import numpy as np

DATA_NOTE = "CIFAR-100 not found under data/; substituted the CIFAR-10 JPEG copy (synthetic test note)"

# Figures 1, 3, 4 and 5 run their baseline as the presets do: plain averaging, GAF at
# tau = 2 with the mean merge (it measures distances). Figures 3 and 4 also hold a GAF run
# (tau 0.97) that plot.py must leave out: a trainer-side "baseline" is not enough.
PLAIN = dict(method="gaf", tau=2.0, merge="mean")

# experiment -> list of sweep points (overrides of the defaults in `run_config`)
SWEEPS = {
    "fig1": [dict(PLAIN, data="cifar100"), dict(PLAIN, data="cifar100n")],
    "fig3": [dict(PLAIN, model="vit_tiny"), dict(method="gaf", model="vit_tiny", merge="mean")],
    "fig4": [dict(PLAIN, per_class=m) for m in (1, 2, 4)] + [dict(method="gaf", per_class=1, merge="mean")],
    "fig5": [dict(PLAIN, data="random", weight_decay=0.0), dict(method="gaf", merge="mean", data="random",
                                                                weight_decay=0.0)],
    "fig6": [dict(method=m, noise=p) for p in (0.0, 0.2, 0.4, 0.6) for m in ("baseline", "gaf")],
    "fig7": [dict(method="baseline", noise=0.4)]
    + [dict(method="gaf", noise=0.4, tau=t) for t in (0.95, 0.97, 0.99, 1.0, 1.05, 2.0)],
    "fig8": [dict(method="baseline", data="cifar100n", batch_size=b) for b in (128, 400)]
    + [dict(method="gaf", data="cifar100n", per_class=m) for m in (1, 2, 4)],
    "fig9": [dict(method="baseline", noise=0.4)] + [dict(method="gaf", noise=0.4, n_micro=n) for n in (2, 4, 10)],
    "table1": [dict(method=m, noise=p) for p in (0.0, 0.4) for m in ("baseline", "gaf")]
    + [dict(method=m, data="cifar100n") for m in ("baseline", "gaf")],
    "premise": [dict(method="gaf", noise=0.4, model="cnn4", width=w, per_class=m, tau=t, merge="mean")
                for w, m in ((4, 1), (16, 1), (16, 2)) for t in (2.0, 0.97)]
    + [dict(method="baseline", noise=0.4, model="cnn4", width=w) for w in (4, 16)],
    "robust": [dict(method="baseline", noise=0.4, loss=loss) for loss in ("ce", "label_smoothing", "gce", "sce")]
    + [dict(method="coteaching", noise=0.4), dict(PLAIN, noise=0.4), dict(method="gaf", noise=0.4),
       dict(method="gaf", noise=0.4, loss="gce")],
    # two optimizer regimes x the three arms, at two noise levels (the baseline's m and merge: RunConfig's)
    "gpu_small": [dict(regime, **arm, noise=p) for p in (0.0, 0.4)
                  for regime in (dict(), dict(lr=0.02, weight_decay=5e-4, schedule="cosine"))
                  for arm in (dict(method="baseline"), dict(PLAIN), dict(method="gaf", merge="mean"))],
}


def run_config(experiment, *, scale="tiny", seed=0, data="cifar100", noise=0.0, model="tiny", width=None, method="gaf",
               tau=0.97, n_micro=2, per_class=1, batch_size=128, merge="halving", lr=0.01, weight_decay=1e-2,
               iterations=60, val_every=20, loss="ce", schedule="plateau"):
    """The nested config.json of one run (docs/rundir.md)."""
    gaf = method == "gaf"
    return {
        "experiment": experiment, "scale": scale, "seed": seed, "device": "cpu",
        "data": {"name": data, "root": "data", "noise": noise, "train_per_class": 20, "test_per_class": 10,
                 "fallback": "cifar10_jpeg"},
        "model": {"name": model, "width": width},
        "method": {"name": method, "tau": tau if gaf else None, "n_micro": n_micro, "per_class": per_class,
                   "merge": merge, "batch_size": None if gaf else batch_size, "adaptive_k": None},
        "loss": {"name": loss},
        "optim": {"name": "sgd", "lr": lr, "momentum": 0.9, "nesterov": True, "weight_decay": weight_decay,
                  "schedule": schedule},
        "train": {"iterations": iterations, "val_every": val_every},
    }


def _final_val_acc(cfg):
    """A made-up but paper-shaped final validation accuracy for a config."""
    m, d = cfg["method"], cfg["data"]
    if d["name"] == "random":
        return 0.01
    p = 0.402 if d["name"] == "cifar100n" else d["noise"]
    base = 0.62 * (1 - p) ** 1.4
    if m["name"] in ("baseline", "coteaching"):
        robust = {"gce": 0.3, "sce": 0.3, "label_smoothing": 0.05}.get(cfg.get("loss", {}).get("name"), 0.0)
        robust += 0.4 if m["name"] == "coteaching" else 0.0
        return base * (1 - 0.05 * np.log2(max(m["batch_size"], 100) / 128) ** 2) + 0.2 * p * robust
    tau_gain = {0.95: 0.7, 0.97: 1.0, 0.99: 0.8, 1.0: 0.6, 1.05: 0.1, 2.0: 0.0}.get(m["tau"], 0.5)
    gain = 0.18 * p * (1 - p) * 2.5 * tau_gain
    return min(0.63, base + gain - 0.01 * (m["per_class"] - 1) + 0.004 * (m["n_micro"] - 2))


def _metrics_and_evals(cfg, rng, with_distances):
    T, every = cfg["train"]["iterations"], cfg["train"]["val_every"]
    m, d = cfg["method"], cfg["data"]
    gaf = m["name"] == "gaf"
    n = m["n_micro"]
    per_step = n * m["per_class"] * 100 if gaf else m["batch_size"]
    t = np.arange(1, T + 1)
    frac = t / T
    final = _final_val_acc(cfg)
    memorises = not gaf or d["name"] != "random"
    train_final = (0.99 if d["name"] == "random" else min(0.99, final + 0.25)) if memorises else 0.05
    acc = np.clip(train_final * (1 - np.exp(-4 * frac)) + rng.normal(0, 0.03, T), 0, 1)
    loss = -np.log(np.clip(acc, 0.01, 0.99)) + 0.2
    level = 0.997 if d["name"] == "random" else 0.85 + 0.2 * frac + 0.3 * d["noise"] - 0.05 * np.log2(per_step / 100)
    dist = np.clip(np.reshape(level, (-1, 1)) + rng.normal(0, 0.04, (T, n - 1)), 0, 2)
    if gaf:
        accepted = (dist <= m["tau"]).sum(1)
        stepped = accepted > 0
    else:
        accepted, stepped = np.full(T, n - 1), np.ones(T, bool)
    cols = {"iter": t, "images_seen": t * per_step, "loss": loss, "acc": acc, "tau": m["tau"] if gaf else 2.0,
            "accepted": accepted, "stepped": stepped, "lr": cfg["optim"]["lr"]}
    if with_distances:
        cols["d_mean"] = dist.mean(1)
        cols.update({f"d{k + 1}": dist[:, k] for k in range(n - 1)})
    cols["time_s"] = t * 0.05
    header = list(cols)
    metrics = [header] + [[_cell(cols[c][i] if np.ndim(cols[c]) else cols[c]) for c in header] for i in range(T)]

    evals = [["iter", "epoch", "images_seen", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
              "mem_clean_acc", "mem_flipped_noisy_acc", "mem_flipped_true_acc", "time_s"]]
    # A baseline memorising noisy labels peaks and then declines (the paper's figure 1), so
    # its best validation accuracy is not its final one: figures drawn from the final one show.
    p = 0.402 if d["name"] == "cifar100n" else d["noise"]
    decline = p if m["name"] == "baseline" else 0.0
    for it in range(every, T + 1, every):
        f = it / T
        val = (final * (1 - np.exp(-4 * f)) / (1 - np.exp(-4)) * (1 - decline * max(0.0, f - 0.6))
               + rng.normal(0, 0.005))
        tr = acc[max(0, it - every):it].mean()
        evals.append([_cell(x) for x in (it, it * per_step / 1000, it * per_step, cfg["optim"]["lr"], loss[it - 1], tr,
                                         -np.log(max(val, 0.01)), val, tr, (0.0 if gaf else 0.6) * f,
                                         0.3 * f, it * 0.05)])
    return metrics, evals


def _cell(x):
    if isinstance(x, (bool, np.bool_)):
        return "True" if x else "False"
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.6g}"
    return str(x)


def _write_csv(path, rows):
    path.write_text("".join(",".join(r) + "\n" for r in rows))


def write_run(run_dir, cfg, *, status="finished", started_at=None, seed_offset=0, with_distances=True,
              data_note=DATA_NOTE, val_acc_shift=0.0):
    """Write one run directory for `cfg`. Returns its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(json.dumps(cfg, sort_keys=True).encode()) + seed_offset)
    metrics, evals = _metrics_and_evals(cfg, rng, with_distances)
    if val_acc_shift:
        i = evals[0].index("val_acc")
        for row in evals[1:]:
            row[i] = _cell(float(row[i]) + val_acc_shift)
    if status != "finished":  # a run cut off half way
        metrics, evals = metrics[: len(metrics) // 2 + 1], evals[: len(evals) // 2 + 1]
    _write_csv(run_dir / "metrics.csv", metrics)
    _write_csv(run_dir / "eval.csv", evals)
    val = [float(r[evals[0].index("val_acc")]) for r in evals[1:]] or [float("nan")]
    last = dict(zip(metrics[0], metrics[-1])) if len(metrics) > 1 else {"iter": "0", "images_seen": "0"}
    started = started_at or dt.datetime(2025, 1, 1, 12, 0, 0)
    wall = 0.05 * int(last["iter"])
    summary = {
        "status": status, "final_val_acc": val[-1], "best_val_acc": max(val), "iterations": int(last["iter"]),
        "images_seen": int(last["images_seen"]), "wall_time_s": wall,
        "images_per_s": int(last["images_seen"]) / wall if wall else 0.0,
        "steps_taken": int(sum(r[metrics[0].index("stepped")] == "True" for r in metrics[1:])),
        "device": "cpu", "device_name": "synthetic CPU", "versions": {"torch": "synthetic"},
        "data_note": data_note, "scale": cfg["scale"], "experiment": cfg["experiment"],
        "started_at": started.isoformat(),
        "finished_at": (started + dt.timedelta(seconds=wall)).isoformat() if status == "finished" else None,
        "config": cfg,
    }
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return run_dir


def write_experiment(root, experiment, *, scale="tiny", iterations=60, val_every=20, seeds=(0,),
                     started_at=None, **overrides):
    """One Hydra-style multirun of `experiment`'s sweep under root/<date>/<time>/<job>/. Returns the run dirs."""
    started = started_at or dt.datetime(2025, 1, 1, 12, 0, 0)
    sweep_dir = Path(root) / started.strftime("%Y-%m-%d") / started.strftime("%H-%M-%S")
    points = [dict(p, seed=s) for s in seeds for p in SWEEPS[experiment]]
    dirs = []
    for job, point in enumerate(points):
        cfg = run_config(experiment, scale=scale, iterations=iterations, val_every=val_every, **{**point, **overrides})
        # plain fig6 baselines measure no distances (their d* columns are absent)
        with_d = not (experiment == "fig6" and point["method"] == "baseline")
        dirs.append(write_run(sweep_dir / str(job), cfg, started_at=started + dt.timedelta(minutes=job),
                              with_distances=with_d))
    return dirs


def write_all(root, experiments=tuple(SWEEPS), **kwargs):
    """Every experiment's synthetic multirun under `root` (e.g. tmp/"multirun"). Returns {experiment: dirs}."""
    out = {}
    for i, exp in enumerate(experiments):
        when = dt.datetime(2025, 1, 1, 12, 0, 0) + dt.timedelta(hours=i)
        out[exp] = write_experiment(root, exp, started_at=when, **kwargs)
    return out
