"""Images/s of GAF implementations side by side, in one run, on the same data.

    python scripts/bench.py --device cuda                      # the paper's ResNet18, n in {2,4,10}, m in {1,2,4}
    python scripts/bench.py --device cuda --n 2 --m 1 --compile full --check-steps 1000
    python scripts/bench.py --device cpu --quick               # tiny model, seconds: what CI runs

Contenders, each from the same initial weights, on the same images and microbatch indices,
for the same number of timed steps after the same number of untimed warm-up steps:
  authors   the authors' ``step_GAF`` used as their example does: each microbatch a
            ``Subset`` of a dataset with PIL transforms (RandomCrop(32, 4), flip,
            ToTensor, Normalize), loaded by a DataLoader; torch.optim.SGD.
  gaf_step  ``gaf.gaf_step`` eager, fp32, on GPU-resident uint8 images augmented on the
            device (``gaf.augment.augment``); torch.optim.SGD.
  fast      ``gaf.fast.FastGAFStep`` (bf16 autocast, channels_last and a CUDA graph on
            CUDA) on the same device-augmented data; masked SGD.
  plain     plain averaging at the same macrobatch in the same machinery
            (``FastPlainStep``: one forward/backward over n*b images, one SGD step).
  fast_batched (with --batched) the fast path computing all micro-gradients in one
            vmap(grad) pass (CUDA graph, no torch.compile).
The device augmentation is inside the timed loop for gaf_step/fast/plain, as the PIL
pipeline is for the authors'. Images are random uint8 shaped like CIFAR (no download).
Optimizer: the paper's SGD (lr 0.01, momentum 0.9, Nesterov, weight decay 1e-2).

It also checks the fast path against ``gaf_step`` on the first (n, m) point, from the same
weights every step (the reference is reloaded from the fast model): the largest |difference|
in distances and the fraction of identical accept decisions (distance <= tau, per
microbatch), once with the fast path in true fp32 like the reference (TF32 off in cuBLAS
and cuDNN: a difference is a bug, not rounding), and once with the timed options (bf16,
channels_last) against the same fp32 reference (their rounding alone).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gaf import gaf_step  # noqa: E402
from gaf.config import COMPILE_MODES  # noqa: E402
from gaf.augment import augment, normalize  # noqa: E402
from gaf.data import CIFAR100_MEAN as MEAN, CIFAR100_STD as STD  # noqa: E402
from gaf.fast import FastGAFStep, FastPlainStep  # noqa: E402
from gaf.optim import build_optimizer  # noqa: E402
from gaf.models import build_model  # noqa: E402

CLASSES = 100
CONTENDERS = ("authors", "gaf_step", "fast", "plain")
SGD = dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps, two points: for CI on a CPU")
    p.add_argument("--model", default=None, help="gaf.models name (default resnet18; tiny with --quick)")
    p.add_argument("--n", type=int, nargs="+", default=None, help="microbatches per step (default 2 4 10)")
    p.add_argument("--m", type=int, nargs="+", default=None, help="images per class per microbatch (default 1 2 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before timing")
    p.add_argument("--tau", type=float, default=0.97)
    p.add_argument("--amp", choices=("bf16", "none"), default=None, help="fast/plain autocast (default bf16 on CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="fast/plain channels_last (default on CUDA)")
    p.add_argument("--compile", choices=tuple(COMPILE_MODES), default=None,
                   help="fast/plain: graph = CUDA graph of the whole step, full = torch.compile + graph "
                        "(default graph on CUDA; full compiles once per shape, minutes)")
    p.add_argument("--batched", action="store_true",
                   help="also time the fast path with batched=True (one vmap(grad) pass for all microbatches)")
    p.add_argument("--check-steps", type=int, default=None, help="steps of the fast-vs-gaf_step check (0: skip)")
    p.add_argument("--pool", type=int, default=None, help="distinct random images to draw from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="optional CSV file (e.g. results/bench.csv)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    defaults = dict(model="tiny" if args.quick else "resnet18", n=[2, 3] if args.quick else [2, 4, 10],
                    m=[1] if args.quick else [1, 2, 4], steps=3 if args.quick else (50 if cuda else 5),
                    warmup=1 if args.quick else (10 if cuda else 2),
                    check_steps=(1000 if cuda and not args.quick else 3), pool=1000 if args.quick else 10000,
                    amp="bf16" if cuda else "none", channels_last=cuda, compile="graph" if cuda else "none")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not cuda and args.compile != "none":
        p.error("--compile needs --device cuda")
    if min(args.n) < 2 or min(args.m) < 1 or args.steps < 1 or args.warmup < 0 or args.check_steps < 0:
        p.error("need n >= 2, m >= 1, steps >= 1, warmup >= 0, check-steps >= 0")
    if args.compile != "none":  # the graphed steppers run eagerly, then capture: all of that is warm-up
        args.warmup = max(args.warmup, FastGAFStep.warmup + 2)
    return args


# ----------------------------------------------------------------------------- data


class PilImages(torch.utils.data.Dataset):
    """The authors' data path: uint8 HWC arrays -> PIL -> torchvision transforms, per image."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        import torchvision.transforms as T

        self.images, self.labels = images, labels
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class DeviceImages:
    """The trainer's data path: uint8 images on the device, augmented and normalised there."""

    def __init__(self, images, labels, device: torch.device, seed: int, mean=MEAN, std=STD):
        """``images``: uint8 (N, H, W, 3) numpy or (N, 3, H, W) tensor; ``labels`` likewise."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2) if isinstance(images, np.ndarray) else images
        self.x = x.contiguous().to(device)  # (N, 3, 32, 32) uint8
        self.y = torch.as_tensor(labels).long().to(device)
        self.device, self.seed, self.mean, self.std = device, seed, mean, std
        self.reset()

    def reset(self):  # every contender sees the same augmentations
        self.gen = torch.Generator(device=self.device).manual_seed(self.seed)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(augment(self.x[idx], generator=self.gen), self.mean, self.std), self.y[idx]


# ----------------------------------------------------------------------------- contenders


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_model(args, device, classes: int = CLASSES) -> nn.Module:
    torch.manual_seed(args.seed)
    return build_model(args.model, classes).to(device)


def fast_kwargs(args) -> dict:
    return dict(amp_dtype=torch.bfloat16 if args.amp == "bf16" else None, channels_last=args.channels_last,
                compile=COMPILE_MODES[args.compile])


def make_contender(name: str, args, device, pil: PilImages, data: DeviceImages, plan: torch.Tensor,
                   options: dict | None = None):
    """A function step(s) doing training step s of contender ``name``; ``options`` replace
    the fast and plain steppers' ``fast_kwargs(args)``."""
    model, loss_fn = fresh_model(args, device), nn.CrossEntropyLoss()
    if name == "authors":
        from torch.utils.data import Subset

        import gradient_agreement_filtering as authors

        opt = torch.optim.SGD(model.parameters(), **SGD)
        plan_cpu = plan.tolist()

        def step(s):
            mbs = [Subset(pil, idx) for idx in plan_cpu[s]]
            authors.step_GAF(model, opt, loss_fn, mbs, wandb=False, verbose=False, cos_distance_thresh=args.tau,
                             device=device)
        return step
    plan = plan.to(device)  # indices on the device: indexing with host tensors would sync every step
    if name == "gaf_step":
        opt = torch.optim.SGD(model.parameters(), **SGD)

        def step(s):
            xs, ys = data.batch(plan[s])
            gaf_step(model, opt, loss_fn, list(zip(xs, ys)), args.tau)
        return step
    opt = build_optimizer("sgd", model.parameters(), masked=True, **SGD)
    kwargs = dict(options if options is not None else fast_kwargs(args))
    if name == "fast":
        stepper = FastGAFStep(model, opt, loss_fn, args.tau, **kwargs)
    elif name == "fast_batched":  # torch.compile is not applied under vmap: graph capture only
        if kwargs["compile"] is True:
            kwargs["compile"] = "graph"
        stepper = FastGAFStep(model, opt, loss_fn, args.tau, batched=True, **kwargs)
    else:
        stepper = FastPlainStep(model, opt, loss_fn, **kwargs)

    def step(s):
        xs, ys = data.batch(plan[s])
        stepper(xs, ys)
    return step


def time_contender(step, args, device) -> float:
    """Seconds for ``args.steps`` steps after ``args.warmup`` untimed ones."""
    for s in range(args.warmup):
        step(s)
    sync(device)
    start = time.perf_counter()
    for s in range(args.warmup, args.warmup + args.steps):
        step(s)
    sync(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def full_fp32():
    """The reference in true fp32 on CUDA: no TF32 in convolutions or matmuls."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=False, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


def fp32_options(args) -> dict:
    """The fast path in true fp32 (no autocast, no layout change): like with like."""
    return {**fast_kwargs(args), "amp_dtype": None, "channels_last": False}


def check_against_reference(args, device, data: DeviceImages, plan: torch.Tensor, options: dict, steps: int,
                            classes: int = CLASSES) -> dict:
    """A fast stepper built with ``options`` vs gaf_step in full fp32, from the same weights
    at every step (the reference is reloaded from the fast model, which follows its own
    trajectory): the largest |distance difference| and the fraction of identical accept
    decisions (distance <= tau, per microbatch). The fast step runs under the same TF32-off
    flags, so fp32 options compare like with like and bf16 shows its rounding alone."""
    model, loss_fn = fresh_model(args, device, classes), nn.CrossEntropyLoss()
    reference = copy.deepcopy(model)
    still = torch.optim.SGD(reference.parameters(), lr=0.0)  # gaf_step needs one; the reference is reloaded anyway
    opt = build_optimizer("sgd", model.parameters(), masked=True, **SGD)
    stepper = FastGAFStep(model, opt, loss_fn, args.tau, **options)
    data.reset()
    plan = plan.to(device)
    worst, same, total, taken = 0.0, 0, 0, 0
    with full_fp32():
        for s in range(steps):
            xs, ys = data.batch(plan[s % len(plan)])
            reference.load_state_dict(model.state_dict())
            ref = gaf_step(reference, still, loss_fn, list(zip(xs, ys)), args.tau)
            out = stepper(xs, ys)
            ours, theirs = out.distances.double().cpu(), torch.tensor(ref["distances"], dtype=torch.float64)
            worst = max(worst, float((ours - theirs).abs().max()))
            same += int(((ours <= args.tau) == (theirs <= args.tau)).sum())
            total += len(theirs)
            taken += int(out.stepped)
    return dict(n=plan.shape[1], steps=steps, max_distance_diff=worst, same_decisions=same / max(total, 1),
                decisions=total, stepped=taken)


def checks(args, device, data: DeviceImages, plan: torch.Tensor) -> dict:
    """fp32 fast vs fp32 reference (a bug shows), and the bench's own options vs fp32 (rounding)."""
    fp32, ours = fp32_options(args), fast_kwargs(args)
    out = {f"check_{k}": v for k, v in check_against_reference(args, device, data, plan, fp32, args.check_steps).items()}
    if ours != fp32:
        out.update({f"check_amp_{k}": v for k, v in
                    check_against_reference(args, device, data, plan, ours, args.check_steps).items()})
    return out


# ----------------------------------------------------------------------------- main


def make_plan(args, n: int, m: int, checked: bool) -> torch.Tensor:
    """Microbatch indices (steps, n, b) for one (n, m) point: the timed steps, and the check's
    steps only where the check runs."""
    steps = args.warmup + args.steps
    gen = torch.Generator().manual_seed(args.seed + 1000 * n + m)
    return torch.randint(0, args.pool, (max(steps, args.check_steps if checked else 0), n, CLASSES * m),
                         generator=gen)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, size=(args.pool, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, size=args.pool).astype(np.int64)
    pil, data = PilImages(images, labels), DeviceImages(images, labels, device, args.seed)
    date = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    rows = []
    for n in args.n:
        for m in args.m:
            b = CLASSES * m
            check_here = not rows and args.check_steps > 0  # only the first point is checked
            plan = make_plan(args, n, m, check_here)
            row = dict(device=device_name(device), torch=torch.__version__, date=date, model=args.model, n=n, m=m,
                       microbatch=b, images_per_step=n * b, steps=args.steps, warmup=args.warmup, tau=args.tau,
                       amp=args.amp, channels_last=args.channels_last, compile=args.compile)
            contenders = CONTENDERS + (("fast_batched",) if args.batched else ())
            for name in contenders:
                data.reset()
                step = make_contender(name, args, device, pil, data, plan)
                row[f"{name}_images_per_s"] = n * b * args.steps / time_contender(step, args, device)
                del step
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            for name in contenders:
                row[f"{name}_vs_authors"] = row[f"{name}_images_per_s"] / row["authors_images_per_s"]
            row["fast_time_over_plain"] = row["plain_images_per_s"] / row["fast_images_per_s"]
            if check_here:
                row.update(checks(args, device, data, plan))
            rows.append(row)
            print(f"n={n} m={m}: " + ", ".join(f"{k} {row[f'{k}_images_per_s']:.0f} img/s" for k in contenders),
                  file=sys.stderr)
    print(markdown(rows, args))
    if args.out:
        write_csv(rows, Path(args.out))
    return rows


def markdown(rows: list[dict], args) -> str:
    r0 = rows[0]
    flags = f"amp={args.amp}, channels_last={args.channels_last}, compile={args.compile}"
    lines = [f"GAF step throughput on **{r0['device']}**, torch {r0['torch']}, {r0['date']}; model {r0['model']}, "
             f"tau {args.tau}, {args.steps} timed steps after {args.warmup} warm-up steps; fast/plain: {flags}.", "",
             "| n | m | images/step | authors step_GAF (img/s) | gaf_step eager | fast | plain averaging "
             "| fast time / plain time |" + (" fast, batched (vmap) |" if args.batched else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if args.batched else "")]
    for r in rows:
        cells = [f"{r['authors_images_per_s']:,.0f}"] + [
            f"{r[f'{k}_images_per_s']:,.0f} ({r[f'{k}_vs_authors']:.2f}x)" for k in ("gaf_step", "fast", "plain")]
        batched = (f" {r['fast_batched_images_per_s']:,.0f} ({r['fast_batched_vs_authors']:.2f}x) |"
                   if args.batched else "")
        lines.append(f"| {r['n']} | {r['m']} | {r['images_per_step']} | " + " | ".join(cells)
                     + f" | {r['fast_time_over_plain']:.2f} |" + batched)
    if "check_steps" in r0:
        lines += ["", f"Fast path vs gaf_step, both full fp32 (TF32 off), from the same weights at each of "
                  f"{r0['check_steps']} steps (n={r0['check_n']}, m={r0['m']}): largest |distance difference| "
                  f"{r0['check_max_distance_diff']:.2e}; identical accept decisions "
                  f"{100 * r0['check_same_decisions']:.2f}% of {r0['check_decisions']} ({r0['check_stepped']} steps "
                  "taken)."]
    if "check_amp_steps" in r0:
        lines += [f"With the timed options ({flags}) against the fp32 reference: largest |distance difference| "
                  f"{r0['check_amp_max_distance_diff']:.2e}; identical decisions "
                  f"{100 * r0['check_amp_same_decisions']:.2f}% of {r0['check_amp_decisions']}."]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
