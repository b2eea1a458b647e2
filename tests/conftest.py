"""Shared test set-up: CPU only, one thread (bitwise-repeatable numbers), fixtures on the path."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # cifar_fixtures, synthetic_runs
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)
