"""Result files -> figures 1-9 and the premise, robust and gpu_small figures; then every table.

The command line of gaf.report.regenerate: it reads the collected results (finished runs, at one
scale per experiment: the largest present unless --scale says otherwise). A figure whose experiment
has no results yet is skipped with a note. Figures are redrawn only when what they show may have
changed (their sidecars, figN.inputs.json); --force redraws all.

    python scripts/plot.py                    # results/ -> results/<experiment>/figN.{png,pdf}, results/table1.{md,csv}
    python scripts/plot.py --results R --scale tiny --only fig6 table1
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's gaf, whichever tree .venv installed
from gaf.report.figures import FIGURES  # noqa: E402
from gaf.report.regenerate import regenerate  # noqa: E402
from gaf.report.tables import TABLES  # noqa: E402


def main(argv=None):
    """Draw every figure and write the tables. Returns {name: Figure or DataFrame} of what was made."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="results", help="the folder scripts/collect.py wrote")
    p.add_argument("--scale", default=None, help="plot this scale only (default: the largest one present)")
    p.add_argument("--only", nargs="+", choices=[*FIGURES, *TABLES], default=None)
    p.add_argument("--force", action="store_true", help="redraw every figure, even those whose inputs are unchanged")
    args = p.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        print(f"error: --results {results} is not a folder; give the folder scripts/collect.py wrote", file=sys.stderr)
        sys.exit(2)
    return regenerate(results, args.scale, args.only, args.force)


if __name__ == "__main__":
    main()
