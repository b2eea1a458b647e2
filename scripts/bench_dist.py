"""Bytes and time of one GAF reduction across ranks: Gram-shard vs. all-gather vs. all-reduce.

    python scripts/bench_dist.py                 # P = 11.2M (ResNet18), K = 2 and 4, gloo on CPU
    python scripts/bench_dist.py --quick         # P = 200k, seconds
    python scripts/bench_dist.py --model tiny    # also the full step with a model

Spawns K processes per world size (gloo on CPU; nccl as well where the machine has
>= K GPUs) and times, side by side in one run, with one flat fp32 micro-gradient of P
elements per rank:
  (a) gram:      all-to-all of shards, partial Gram, all-reduce of the K x K Gram,
                 agreement_weights, shard of the aggregate, all-gather (gaf.distributed);
  (b) allgather: every rank receives every full gradient, filters locally (the authors'
                 multi-GPU script);
  (c) allreduce: dist.all_reduce of the flat gradient and a division (plain averaging).
Time = median over repeats of the slowest rank, communication + reduction only (the
full step with --model). "bytes/rank" is what a ring algorithm sends (the counter in
gaf.distributed); "lo bytes/rank" is measured on the loopback interface (gloo only;
TCP headers and any other traffic on the machine included).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gaf.distributed import (  # noqa: E402
    CommCounter,
    DistributedGAFStep,
    DistributedMeanStep,
    _all_reduce,
    distributed_filter,
)

METHODS = ("gram", "allgather", "allreduce")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_bytes() -> int | None:
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])  # transmitted bytes
    except OSError:
        pass
    return None


def reduce_once(method: str, grads: torch.Tensor, counter: CommCounter) -> torch.Tensor:
    if method == "allreduce":
        flat = grads[0].clone()
        _all_reduce(flat, None, counter, "gradients")  # counted as gaf.distributed counts it
        return flat / dist.get_world_size()
    aggregate, *_ = distributed_filter(grads, 2.0, "halving", method, counter=counter)
    return aggregate


def timed(fn, repeats: int, device: torch.device, warmup: int = 2) -> tuple[float, float | None]:
    """(median seconds of the slowest rank, loopback bytes sent per rank per call)."""
    for _ in range(warmup):
        fn()
    times, k = [], dist.get_world_size()
    dist.barrier()
    lo0 = loopback_bytes()
    for _ in range(repeats):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    dist.barrier()
    lo1 = loopback_bytes()
    slowest = torch.tensor(times, dtype=torch.float64)
    if device.type == "cuda":
        slowest = slowest.to(device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    lo = (lo1 - lo0) / (repeats * k) if (lo0 is not None and lo1 is not None and device.type == "cpu") else None
    return statistics.median(slowest.tolist()), lo


def worker(rank: int, world_size: int, port: int, backend: str, args, out_path: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            device_id=device if backend == "nccl" else None)
    rows = []
    grads = torch.randn(1, args.params, generator=torch.Generator().manual_seed(rank)).to(device)
    for method in METHODS:
        counter = CommCounter()
        reduce_once(method, grads, counter)
        sent = counter.bytes["gradients"] + counter.bytes["gram"]
        seconds, lo = timed(lambda: reduce_once(method, grads, CommCounter()), args.repeats, device)
        rows.append(dict(what="reduction", backend=backend, K=world_size, method=method, P=args.params,
                         bytes=sent, lo_bytes=lo, seconds=seconds))
    if args.model:
        from gaf.models import build_model

        torch.manual_seed(0)
        model = build_model(args.model, 100).to(device)
        p = sum(q.numel() for q in model.parameters())
        gen = torch.Generator().manual_seed(rank)
        xs = torch.randn(1, args.batch, 3, 32, 32, generator=gen).to(device)
        ys = torch.randint(0, 100, (1, args.batch), generator=gen).to(device)
        for method in METHODS:
            opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
            if method == "allreduce":
                step = DistributedMeanStep(model, opt, nn.CrossEntropyLoss())
            else:
                step = DistributedGAFStep(model, opt, nn.CrossEntropyLoss(), 2.0, mode=method)
            step(xs, ys)
            sent = (step.counter.bytes["gradients"] + step.counter.bytes["gram"]) / step.counter.steps
            seconds, lo = timed(lambda: step(xs, ys), max(3, args.repeats // 2), device, warmup=1)
            rows.append(dict(what=f"step {args.model} b={args.batch}", backend=backend, K=world_size,
                             method=method, P=p, bytes=sent, lo_bytes=lo, seconds=seconds))
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    dist.destroy_process_group()


def markdown(rows: list[dict]) -> str:
    lines = ["| what | backend | K | P | method | bytes/rank/step (ring) | lo bytes/rank (measured) "
             "| time (ms) | bytes vs all-reduce | time vs all-reduce |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["method"] == "allreduce" and
                    (b["what"], b["backend"], b["K"]) == (r["what"], r["backend"], r["K"]))
        lo = f"{r['lo_bytes'] / 1e6:.2f} MB" if r["lo_bytes"] is not None else "-"
        lines.append(f"| {r['what']} | {r['backend']} | {r['K']} | {r['P'] / 1e6:.3f}M | {r['method']} "
                     f"| {r['bytes'] / 1e6:.2f} MB | {lo} | {1e3 * r['seconds']:.1f} "
                     f"| {r['bytes'] / base['bytes']:.2f} | {r['seconds'] / base['seconds']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=int, default=11_227_812, help="gradient size P (default: ResNet18, 100 classes)")
    ap.add_argument("--quick", action="store_true", help="P = 200k and 5 repeats: seconds")
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                    help="auto: gloo on CPU, plus nccl for each K <= the GPU count")
    ap.add_argument("--model", default=None, help="also time the full step with this gaf.models network")
    ap.add_argument("--batch", type=int, default=100, help="microbatch size per rank for --model")
    args = ap.parse_args()
    if args.quick:
        args.params, args.repeats = 200_000, 5
    if args.params < 1 or args.repeats < 1 or min(args.world_sizes) < 2:
        raise SystemExit("--params and --repeats must be >= 1 and every world size >= 2")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    runs = []
    for k in args.world_sizes:
        if args.backend in ("auto", "gloo"):
            runs.append(("gloo", k))
        if args.backend in ("auto", "nccl") and k <= gpus:
            runs.append(("nccl", k))
        elif args.backend == "nccl":
            print(f"skipping nccl K={k}: {gpus} GPU(s)", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend, k in runs:
            out = f"{tmp}/{backend}{k}.json"
            mp.start_processes(worker, args=(k, free_port(), backend, args, out), nprocs=k, start_method="spawn")
            rows += json.loads(Path(out).read_text())
    cpu = os.cpu_count()
    print(f"torch {torch.__version__}, {cpu} CPU cores, {gpus} GPU(s); fp32 gradients; "
          f"median of {args.repeats} repeats; tau=2 (every step taken)\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
