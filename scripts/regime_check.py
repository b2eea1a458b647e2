"""Is the tiny scale in the paper's regime? Reads the collected figure-6 results and prints, for each
condition, whether it holds, with the numbers:

  1. with clean labels the baseline's best validation accuracy is at least 45%;
  2. at 40% noise the baseline memorises: by the end it fits at least 50% of the flipped training
     samples to their noisy labels (mem_flipped_noisy_acc at the last validation);
  3. at 40% noise its final validation accuracy is at least 5 points below its best;
  4. the paper's optimizer (SGD, Nesterov momentum 0.9, lr 0.01, weight decay 1e-2), GAF n = 2, tau = 0.97.

Every seed is checked. Reads only results/fig6/{runs,evals}.csv (gaf.report.collect).

Exit status 0 when every condition holds, 1 when one fails or there are no runs to check.

    python scripts/regime_check.py                    # results/, the largest scale present
    python scripts/regime_check.py --results R --scale tiny
"""

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's gaf, whichever tree .venv installed
from gaf.report.data import load  # noqa: E402  (the same finished-runs-at-one-scale rule as the figures)

CLEAN_BEST, MEMORISED, DROP, NOISE = 0.45, 0.50, 0.05, 0.4
OPTIMIZER = {"optim.name": "sgd", "optim.nesterov": True, "optim.momentum": 0.9, "optim.lr": 0.01,
             "optim.weight_decay": 0.01}
GAF = {"method.n_micro": 2, "method.tau": 0.97}


def last_eval(evals, run_id):
    return evals[evals["run_id"] == run_id].sort_values("iter").iloc[-1]


def as_written(value) -> str:
    """A setting as its config writes it: 2, not the 2.0 of a CSV column that has empty cells."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def conditions(r):
    """[(holds, text)] for every condition and seed of one experiment's results."""
    runs, out = r.runs, []
    base = runs[runs["method.name"] == "baseline"]
    clean, noisy = base[base["data.noise"].fillna(0) == 0], base[(base["data.noise"] - NOISE).abs() < 1e-9]
    if clean.empty or noisy.empty:
        out.append((False, f"baseline runs at 0% and {NOISE:.0%} noise: found {len(clean)} and {len(noisy)}"))
    for _, b in clean.iterrows():
        out.append((b["best_val_acc"] >= CLEAN_BEST, f"clean labels, seed {b['seed']}: baseline best val acc "
                    f"{100 * b['best_val_acc']:.1f}% (needs >= {100 * CLEAN_BEST:.0f}%)"))
    for _, b in noisy.iterrows():
        mem = last_eval(r.evals, b["run_id"])["mem_flipped_noisy_acc"]
        out.append((mem >= MEMORISED, f"{NOISE:.0%} noise, seed {b['seed']}: baseline fits {100 * mem:.1f}% of the "
                    f"flipped samples to their noisy labels at the end (needs >= {100 * MEMORISED:.0f}%)"))
        drop = b["best_val_acc"] - b["final_val_acc"]
        out.append((drop >= DROP - 1e-9, f"{NOISE:.0%} noise, seed {b['seed']}: baseline val acc best "
                    f"{100 * b['best_val_acc']:.1f}% -> final {100 * b['final_val_acc']:.1f}%, down "
                    f"{100 * drop:.1f} points (needs >= {100 * DROP:.0f})"))
    for name, want, rows in (("optimizer", OPTIMIZER, runs), ("GAF", GAF, runs[runs["method.name"] == "gaf"])):
        seen = {k: sorted(rows[k].dropna().unique().tolist()) if k in rows else [] for k in want}
        ok = bool(len(rows)) and all(v == [want[k]] for k, v in seen.items())
        out.append((ok, f"{name}: " + ", ".join(f"{k.split('.')[1]}={'/'.join(map(as_written, v)) or '?'}"
                                                for k, v in seen.items())
                    + f" (needs {', '.join(f'{k.split(chr(46))[1]}={as_written(v)}' for k, v in want.items())})"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="results")
    p.add_argument("--scale", default=None, help="check this scale (default: the largest one present)")
    args = p.parse_args(argv)
    r = load(args.results, "fig6", args.scale)
    if r is None:
        print(f"regime check: no finished figure-6 runs in {args.results}")
        return 1
    checks = conditions(r)
    print(f"Regime check, {args.results}/fig6 at scale {r.scale} ({len(r.runs)} finished runs):")
    for ok, text in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    held = all(ok for ok, _ in checks)
    print(f"  => {'in the paper regime: every condition holds' if held else 'NOT in the regime: see FAIL above'}")
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
