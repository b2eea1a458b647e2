"""Every figure and table of results/: figures redrawn only where what they show may have changed.

Each figN.png/pdf has a sidecar figN.inputs.json with the hash of the code that draws it (CODE), of
every result file the figure read and of what it drew (each line's data and every text; no font or
layout enters it). When the code and every input are unchanged, the figure is kept as it is: an
unchanged checkout stays unchanged on any machine, whatever its fonts. ``force`` redraws all. The
tables are written every time (text: the same bytes everywhere).
"""

import json
from pathlib import Path

from gaf.report.data import file_hash, input_path, reads_recorded, sha256
from gaf.report.figures import FIGURES
from gaf.report.plot import drawn_content, save
from gaf.report.tables import TABLES

HERE = Path(__file__).resolve().parent
# What a figure is drawn by (and recorded by): a change to any of them redraws every figure.
CODE = [HERE / f"{name}.py" for name in ("data", "tables", "plot", "figures", "regenerate")]


def regenerate(results_dir, scale=None, only=None, force=False):
    """Draw the figures and write the tables named in ``only`` (default: all) from ``results_dir``, at
    ``scale`` (default: each experiment's largest). Returns {name: Figure or DataFrame} of what was made."""
    results = Path(results_dir)
    made = {}
    for name in only or [*FIGURES, *TABLES]:
        if name in FIGURES:
            path = results / name / name
            if not force and is_current(path, results, scale):
                print(f"plot: {name}: this code and its inputs are unchanged; kept {path}.png, .pdf")
                continue
            obj, reads = draw(name, results, scale)
            paths = [*save(obj, path), write_sidecar(obj, path, reads, scale)] if obj is not None else []
        else:
            make, write = TABLES[name]
            obj = make(results, scale)
            paths = write(obj, results) if obj is not None else []
        if obj is None:
            print(f"plot: {name}: no finished runs in {results} yet, skipped")
            continue
        made[name] = obj
        print(f"plot: {name} -> {', '.join(map(str, paths))}")
    return made


def draw(name, results_dir, scale):
    """Draw one figure, recording the files it reads: (Figure or None, {input key: hash})."""
    with reads_recorded() as reads:
        return FIGURES[name](results_dir, scale), dict(reads)


def write_sidecar(fig, path, reads, scale):
    path = sidecar_path(path)
    path.write_text(json.dumps(sidecar(fig, reads, scale), indent=1) + "\n")
    return path


# ---------------------------------------------------------------- sidecars: redraw only what changed


def sidecar_path(path):
    return Path(path).with_suffix(".inputs.json")


def code_hash() -> str:
    return sha256(b"".join(p.read_bytes() for p in CODE))


def sidecar(fig, reads, scale):
    """The record that tells whether a figure must be redrawn: the code, the scale asked for, each
    input's hash, and a hash of what was drawn (the regeneration test compares it on any machine)."""
    return {"code": code_hash(), "scale": scale, "inputs": dict(sorted(reads.items())),
            "drawn": sha256(drawn_content(fig).encode())}


def is_current(path, results_dir, scale):
    """Whether the figure at ``path`` was drawn by this code, at this scale, from the inputs as they are now."""
    try:
        side = json.loads(sidecar_path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (all(path.with_suffix(s).is_file() for s in (".png", ".pdf"))
            and side.get("code") == code_hash() and side.get("scale") == scale
            and all(file_hash(input_path(k, results_dir)) == h for k, h in side.get("inputs", {}).items()))
