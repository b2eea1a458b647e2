"""Installing and running a checkout: a quiet install, and every entry point runs the tree it stands in."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_install_says_nothing_about_deprecations(tmp_path):
    """pyproject.toml as setuptools wants it today (no 40 lines about `project.license` as a table); the
    venv's own setuptools, no index needed."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "gaf", tmp_path / "gaf", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation",
                          "--no-index", "-e", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "Would install gaf" in text and "Warning" not in text and "deprecat" not in text.lower(), text[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["experiments/train.py", "scripts/collect.py", "scripts/plot.py",
                                    "scripts/show_run.py", "scripts/regime_check.py", "scripts/reproduce.py"])
def test_a_scripts_gaf_is_the_one_beside_it(tmp_path, script):
    """A second checkout using this one's .venv (whose editable install points here) imports its own gaf."""
    clone = tmp_path / "clone"
    for folder in ("gaf", "experiments", "scripts", "configs"):
        shutil.copytree(ROOT / folder, clone / folder, ignore=shutil.ignore_patterns("__pycache__"))
    with open(clone / "gaf" / "__init__.py", "a") as f:
        f.write("\nimport sys as _sys\n_sys.stderr.write(f'gaf imported from {__file__}\\n')\n")
    out = subprocess.run([sys.executable, str(clone / script), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert f"gaf imported from {clone / 'gaf' / '__init__.py'}" in out.stderr, (out.stdout + out.stderr)[-2000:]
