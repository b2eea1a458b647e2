"""Run directories -> results/<experiment>/{runs,curves,evals}.csv + provenance.json.

The command line of gaf.report.collect: it searches the run roots (default: multirun/ and
outputs/) for run directories (docs/rundir.md) and collects them per scale: the runs found for one
scale replace that scale's rows and leave every other scale's as they are. Ad-hoc runs (no preset,
or scale "custom") only with --ad-hoc.

    python scripts/collect.py                         # multirun/ outputs/ -> results/
    python scripts/collect.py --runs runs/a runs/b --results results
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's gaf, whichever tree .venv installed
from gaf.report.collect import AD_HOC, MAX_CURVE_ROWS, collect  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=None, help="run roots to search (default: multirun outputs)")
    p.add_argument("--results", default="results", help="where results/<experiment>/ files go")
    p.add_argument("--max-curve-rows", type=int, default=MAX_CURVE_ROWS, help="per run, in curves.csv")
    p.add_argument("--command", default=None, help="the command to record as provenance (default: this one)")
    p.add_argument("--scales", nargs="+", default=None,
                   help="collect runs of these scales only (e.g. tiny; custom: preset runs whose settings match no "
                        "scale); default: every scale but custom")
    p.add_argument("--ad-hoc", action="store_true",
                   help=f"also collect ad-hoc runs (no preset: experiment={AD_HOC}), left out by default")
    args = p.parse_args(argv)
    if args.max_curve_rows < 1:
        p.error(f"--max-curve-rows must be >= 1, got {args.max_curve_rows}")
    if missing := [r for r in args.runs or () if not Path(r).is_dir()]:  # the defaults may be absent: no runs yet
        print(f"error: --runs {' '.join(missing)}: not a folder; give folders that hold run directories",
              file=sys.stderr)
        sys.exit(2)
    command = args.command or " ".join(["python scripts/collect.py", *argv])
    return collect(args.runs or ["multirun", "outputs"], args.results, args.max_curve_rows, command=command,
                   ad_hoc=args.ad_hoc, scales=args.scales)


if __name__ == "__main__":
    main()
