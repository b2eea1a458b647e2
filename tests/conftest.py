"""Shared test set-up: CPU only, one thread (bitwise-repeatable numbers), fixtures on the path,
and no test reaches the internet."""

import os
import socket
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # cifar_fixtures, synthetic_runs
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)
# The processes tests start, one thread each too: two xdist workers whose children each spin a
# thread per core oversubscribe a 2-core machine many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nobody listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every download (data.download is on by default) goes to a loopback port nobody listens
# on, so it fails at once, the same with or without a network; subprocesses inherit this.
# Tests of the download path start their own server (tests/test_sources.py).
os.environ["GAF_DATA_MIRROR"] = f"http://127.0.0.1:{_closed_port()}"
