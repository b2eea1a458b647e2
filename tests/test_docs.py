"""The documentation says what the code does: its example runs, the files it cites exist."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_readmes_library_example_runs_as_it_stands(tmp_path):
    library = README[README.index("## The library"):]
    block = re.search(r"```python\n(.*?)```", library, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    stepped, distances = out.stdout.split(" ", 1)
    assert stepped in ("True", "False") and distances.strip().startswith("[")


def test_every_file_the_docs_and_code_cite_is_in_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    texts = [ROOT / p for p in tracked if p.endswith((".py", ".md", ".yaml", ".ipynb")) and (ROOT / p).is_file()]
    cited = {m for t in texts for m in re.findall(r"\b(?:docs|notes)/[\w-]+\.md\b", t.read_text())}
    assert cited and all((ROOT / c).is_file() for c in cited), sorted(c for c in cited if not (ROOT / c).is_file())
    assert not [t for t in texts if re.search(r"(?<![\w/])PAPER\.md", t.read_text())]  # cite docs/paper.md
