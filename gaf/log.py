"""Where a run's metrics go: append-only CSV files in its run directory (one row per iteration,
one per validation) and, when asked for, wandb."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from gaf.config import RunConfig
from gaf.rundir import RunDirError


class CsvLog:
    """Append-only CSV with a fixed header, truncatable to the rows before a checkpoint."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(rows)

    def truncate_after(self, iteration: int) -> None:
        """Drop rows written after ``iteration`` (they are recomputed on resume)."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            try:
                rows = [r for r in reader if int(r["iter"]) <= iteration]
            except (ValueError, KeyError, TypeError, csv.Error) as e:  # a hand-edited or foreign file
                raise RunDirError(f"{self.path} is corrupt (line {reader.line_num}: {type(e).__name__}: {e}); "
                                  f"delete {self.path.parent}'s csv files and checkpoint.pt to restart this run "
                                  "from scratch") from None
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)


class WandbLogger:
    """wandb, when asked for: offline by default, never a login prompt."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.run = None
        if cfg.wandb.mode == "disabled":
            return
        import wandb  # validate() refused a wandb.mode where wandb is not installed

        os.environ.setdefault("WANDB_SILENT", "true")
        run_id = "".join(c if c.isalnum() else "-" for c in str(run_dir.resolve()))[-64:]
        self.run = wandb.init(project=cfg.wandb.project, mode=cfg.wandb.mode, dir=str(run_dir), config=cfg.to_dict(),
                              id=run_id, resume="allow", name=run_dir.name)

    def log(self, row: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(row, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
