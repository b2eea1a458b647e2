"""Images/s of K runs as K processes, as K steppers in one process, and as one fused group, side by side.

    python scripts/bench_fused.py --device cuda                 # ResNet18, K = 1, 3, 9, 18, GAF and baseline
    python scripts/bench_fused.py --device cpu --quick          # tiny model, K = 1, 3: seconds (the suite runs it)

Each member is one run of a sweep: GAF (n = 2 microbatches of 100 images, tau 0.97, the paper's
SGD) or the baseline (one batch of 128), its own initial weights, its own images. Contenders, for
the same timed steps after the same untimed warm-up, on GPU-resident random images (the step
alone: no sampling or augmentation, so the figures compare how the K steps run, not data paths):

  processes  K processes at once, each one ``FastGAFStep`` / ``FastPlainStep`` (graphed on CUDA),
             each timing its own steps: how the sweeps of today share a GPU (time-sliced);
  separate   the K steppers in one process, stepped in turn;
  fused      ``gaf.fused.FusedSteps``: the K members as one program (graphed on CUDA).

Printed as a table with the ratios fused/processes and fused/separate; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a checkout without installing

from gaf.fast import FastGAFStep, FastPlainStep  # noqa: E402
from gaf.fused import FusedSteps  # noqa: E402
from gaf.models import build_model  # noqa: E402
from gaf.optim import build_optimizer  # noqa: E402

SGD = dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-2)  # the paper's
TAU = 0.97
KINDS = {"gaf": (2, 100), "baseline": (1, 128)}  # (n, b): GAF's microbatches, the baseline's batch
QUICK_B = {"gaf": 10, "baseline": 16}  # --quick: b on a CPU


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny model, K = 1, 3, few steps: the CPU dry run")
    p.add_argument("--k", type=int, nargs="+", default=None, help="group sizes (default 1 3 9 18; 1 3 --quick)")
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 100; 4 with --quick)")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SEED"), help=argparse.SUPPRESS)  # one process's run
    a = p.parse_args(argv)
    a.model, a.classes = ("tiny", 10) if a.quick else ("resnet18", 10)
    a.k = a.k or ([1, 3] if a.quick else [1, 3, 9, 18])
    a.steps = (4 if a.quick else 100) if a.steps is None else a.steps  # --steps 0 is refused, not a default
    a.warmup = 4 if a.quick else 10
    a.shapes = {kind: (n, QUICK_B[kind] if a.quick else b) for kind, (n, b) in KINDS.items()}
    if min(a.k) < 1:
        p.error(f"--k takes group sizes >= 1, got {' '.join(map(str, a.k))}")
    if a.steps < 1:
        p.error(f"--steps takes a number of timed steps >= 1, got {a.steps}")
    return a


def members(a, kind: str, k: int, seed: int = 0) -> tuple[list[nn.Module], torch.Tensor, torch.Tensor]:
    """k fresh models (seeds seed..seed+k-1) and their data: xs (steps, k, n, b, 3, 32, 32), ys."""
    n, b = shape(a, kind)
    device = torch.device(a.device)
    models = []
    for s in range(seed, seed + k):
        torch.manual_seed(s)
        models.append(build_model(a.model, a.classes).to(device))
    gen = torch.Generator(device=device).manual_seed(seed)
    total = a.warmup + a.steps
    xs = torch.randn(total, k, n, b, 3, 32, 32, generator=gen, device=device)
    ys = torch.randint(0, a.classes, (total, k, n, b), generator=gen, device=device)
    return models, xs, ys


def shape(a, kind: str) -> tuple[int, int]:
    """(n, b) of a member's step (gpu_evidence times its grid's own shapes through ``a.shapes``)."""
    return a.shapes[kind]


def stepper(a, kind: str, model: nn.Module):
    opt = build_optimizer("sgd", model.parameters(), masked=True, **SGD)
    graph = "graph" if a.device == "cuda" else False
    if kind == "gaf":
        return FastGAFStep(model, opt, nn.CrossEntropyLoss(), TAU, "mean", compile=graph)
    return FastPlainStep(model, opt, nn.CrossEntropyLoss(), compile=graph)


def images_per_s(a, xs: torch.Tensor, seconds: float) -> float:
    """The images of a.steps steps of ``xs`` (steps, k, n, b, 3, 32, 32) per second."""
    return xs[0].numel() // (3 * 32 * 32) * a.steps / seconds


def timed(a, step) -> float:
    """Seconds for a.steps calls of ``step(s)`` after a.warmup untimed ones."""
    for s in range(a.warmup):
        step(s)
    sync(a.device)
    start = time.perf_counter()
    for s in range(a.warmup, a.warmup + a.steps):
        step(s)
    sync(a.device)
    return time.perf_counter() - start


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def separate(a, kind: str, k: int) -> float:
    """Images/s of k steppers stepped in turn in this process."""
    models, xs, ys = members(a, kind, k)
    steppers = [stepper(a, kind, m) for m in models]
    seconds = timed(a, lambda s: [st(xs[s, j], ys[s, j]) for j, st in enumerate(steppers)])
    return images_per_s(a, xs, seconds)


def fused(a, kind: str, k: int) -> float:
    """Images/s of one fused group of k members."""
    models, xs, ys = members(a, kind, k)
    tau = None if kind == "baseline" else TAU
    group = FusedSteps(models, **SGD, tau=tau, merge="mean", compile="graph" if a.device == "cuda" else False)
    seconds = timed(a, lambda s: group(xs[s], ys[s]))
    return images_per_s(a, xs, seconds)


def processes(a, kind: str, k: int) -> float:
    """Images/s summed over k processes started at once, each timing one stepper of its own."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--device", a.device, "--steps", str(a.steps),
            "--worker", kind]
    quick = ["--quick"] if a.quick else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*argv, str(seed), *quick], stdout=subprocess.PIPE, text=True, env=env)
             for seed in range(k)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: exit {[p.returncode for p in procs]}")
    return sum(json.loads(out.strip().splitlines()[-1])["images_per_s"] for out in outs)


def worker(a) -> None:
    kind, seed = a.worker[0], int(a.worker[1])
    models, xs, ys = members(a, kind, 1, seed)
    st = stepper(a, kind, models[0])
    seconds = timed(a, lambda s: st(xs[s, 0], ys[s, 0]))
    print(json.dumps({"images_per_s": images_per_s(a, xs, seconds)}))


def markdown(rows: list[dict], a) -> str:
    card = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    sizes = ", ".join(f"{kind} {' x '.join(map(str, shape(a, kind)))}" for kind in a.kinds)
    lines = [f"K runs of {a.model} (n x b: {sizes}) on {card}, torch {torch.__version__}, {a.steps} timed steps "
             f"after {a.warmup}; images/s summed:", "",
             "| kind | K | processes | separate | fused | fused / processes | fused / separate |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['k']} | {r['processes']:,.0f} | {r['separate']:,.0f} | {r['fused']:,.0f} | "
              f"{r['fused'] / r['processes']:.2f} | {r['fused'] / r['separate']:.2f} |" for r in rows]
    return "\n".join(lines)


def gaf_table_within(timeout_s: float, device: str, quick: bool) -> list[str]:
    """This script's GAF table (K = 1, 3, 9; 1, 3 with ``quick``) from a process of its own given
    ``timeout_s``, as printed; or the one line saying why there is none (scripts/gpu_evidence.py
    spends a call's budget left over on it)."""
    sizes = ["--quick", "--k", "1", "3"] if quick else ["--k", "1", "3", "9", "--steps", "50"]
    argv = [sys.executable, str(Path(__file__).resolve()), "--device", device, "--kinds", "gaf", *sizes]
    try:
        got = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [f"bench_fused did not end within the {timeout_s:.0f} s left"]
    if got.returncode != 0:
        return [f"bench_fused failed (exit {got.returncode}): {got.stderr.strip().splitlines()[-1:]}"]
    out = got.stdout.splitlines()
    return out[next(i for i, line in enumerate(out) if line.startswith("K runs of")):]


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    if a.worker:
        return worker(a)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available; --device cpu --quick is the dry run")
    if a.device == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = []
    for kind in a.kinds:
        for k in a.k:
            row = {"kind": kind, "k": k, "processes": processes(a, kind, k), "separate": separate(a, kind, k),
                   "fused": fused(a, kind, k)}
            rows.append(row)
            print(f"{kind} K={k}: processes {row['processes']:,.0f}, separate {row['separate']:,.0f}, "
                  f"fused {row['fused']:,.0f} images/s", flush=True)
    print(markdown(rows, a))
    return rows


if __name__ == "__main__":
    main()
