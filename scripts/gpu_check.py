"""One prepared check that every CUDA path of gaf runs and computes what it should.

    python scripts/gpu_check.py                                # a CUDA machine: minutes
    python scripts/gpu_check.py --jpeg path/to/cifar10-jpeg-q75.tar.gz --compile-resnet
    python scripts/gpu_check.py --device cpu --quick           # the dry run the tests run

Each check prints one line, PASS, FAIL or SKIP, with its figures; performance targets
print as TARGET lines (measured, never asserted). On CUDA it writes
``results/gpu/<date>-<card>.md`` and ``.json`` (``--out-dir`` to change); exit status 1
if any check failed. The checks:

 1. sync-free    the fast step (eager and graphed) and the trainer's data path run
                 steady-state steps under ``torch.cuda.set_sync_debug_mode("error")``;
 2. fp32-equal   graph-captured == eager == ``gaf_step``, full fp32 with TF32 off, over
                 steps that take and skip (a device-tensor tau changed in place):
                 parameters, BatchNorm statistics and optimizer state;
 3. bf16         bf16 autocast + channels_last against the fp32 reference along a real
                 trajectory: distance differences and identical-decision rate;
 4. compile      ``compile=True`` (torch.compile + graph) against eager;
 5. batched      one vmap(grad) pass == sequential passes (fp32), BN running statistics
                 and num_batches_tracked included, eager and graphed;
 6. speed        ResNet18, m = 1, 100 classes, n in {2, 4, 10}: the authors' step_GAF (if
                 importable), gaf_step, fast eager, fast graphed, plain averaging graphed;
 7. trainer      ``gaf.train.run`` (no Hydra) in the CUDA paper setting: its images/s
                 against the wall clock, and the wall time of a small-scale run.

On a CPU (``--device cpu``) the CUDA graph is a stand-in that runs the captured step at
replay, so the script's own code runs end to end; the figures then say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import math
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # a checkout without installing; bench.py beside this

import bench  # noqa: E402
from gaf import gaf_step  # noqa: E402
from gaf import data as gdata  # noqa: E402
from gaf.fast import FastGAFStep, FastPlainStep, StandInGraphs  # noqa: E402
from gaf.fused import FusedSteps  # noqa: E402
from gaf.optim import build_optimizer  # noqa: E402
from gaf.models import build_model  # noqa: E402
from gaf.samplers import ClassBalancedSampler  # noqa: E402

SGD = bench.SGD
TARGETS = {"gaf_n2_images_per_s": 60_000, "fast_over_plain_n2": 1.05, "fast_over_plain_n10": 1.2}
# reproduce.py's export of the gpu_small points, with every scale's loop (scale_loops): read as JSON here
SCALE_LOOPS = ROOT / "configs" / "experiment" / "gpu_small.points.json"


# ----------------------------------------------------------------------------- set-up


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: the dry run (seconds on a CPU)")
    p.add_argument("--jpeg", default=None, help="the CIFAR-10 JPEG tarball, for real-data trajectories "
                   "(default: gaf.data's usual places; random images when absent, and said)")
    p.add_argument("--compile-resnet", action="store_true", help="check 4 on ResNet18 too (compiles for minutes)")
    p.add_argument("--only", nargs="+", default=None, help="run only these checks (names as printed)")
    p.add_argument("--out-dir", default=None, help="where the report goes (default results/gpu on CUDA, "
                   "outputs/gpu_check on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu --quick for the dry run")
    if args.out_dir is None:
        args.out_dir = str(ROOT / ("results/gpu" if args.device == "cuda" else "outputs/gpu_check"))
    return args


def context(args) -> SimpleNamespace:
    """What every check shares: sizes by mode, the device, the real data if any."""
    quick = args.quick
    ctx = SimpleNamespace(
        args=args, device=torch.device(args.device), quick=quick, seed=args.seed, tau=0.97,
        model="tiny" if quick else "resnet18", classes=10 if quick else 100, m=1,
        speed_n=[2] if quick else [2, 4, 10], speed_steps=3 if quick else 50, speed_warmup=1 if quick else 10,
        sync_steps=5, equal_n=3, merge="halving", bf16_steps=6 if quick else 300, pool=500 if quick else 10000,
        graphs=None if args.device == "cuda" else StandInGraphs(),
    )
    ctx.real, ctx.real_note = (None, "random images (--quick without --jpeg)") if quick and not args.jpeg \
        else real_data(args, ctx.device)
    return ctx


def real_data(args, device):
    """The CIFAR-10 JPEG copy on the device (bench.DeviceImages), or None and why not."""
    try:
        ds = gdata.load_cifar10_jpeg(ROOT / "data", jpeg_path=args.jpeg)  # the data sources' usual order
    except gdata.DataError as e:
        return None, f"random images (no CIFAR-10 JPEG copy: {e})"
    images = bench.DeviceImages(ds.train_x, ds.train_y, device, args.seed, ds.mean, ds.std)
    return images, f"CIFAR-10 JPEG copy ({len(ds.train_y)} training images, 10 classes)"


def fresh(ctx, classes=None, model=None) -> nn.Module:
    torch.manual_seed(ctx.seed)
    return build_model(model or ctx.model, classes or ctx.classes).to(ctx.device)


def masked_sgd(model: nn.Module, capturable: bool = True):
    """Masked SGD; ``capturable`` reads lr from its device tensor, as a graphed step does, so
    eager and graphed steppers do the same arithmetic."""
    opt = build_optimizer("sgd", model.parameters(), masked=True, **SGD)
    for group in opt.param_groups:
        group["capturable"] = capturable
    return opt


def graph_mode(ctx, full: bool = False):
    return (True if full else "graph"), ctx.graphs


def random_batches(ctx, steps: int, n: int, b: int, classes: int | None = None, seed: int = 1):
    gen = torch.Generator().manual_seed(ctx.seed + seed)
    xs = torch.randn(steps, n, b, 3, 32, 32, generator=gen)
    ys = torch.randint(0, classes or ctx.classes, (steps, n, b), generator=gen)
    return [(x.to(ctx.device), y.to(ctx.device)) for x, y in zip(xs, ys)]


@contextlib.contextmanager
def strict_fp32():
    """Full fp32 and deterministic cuDNN: differences are bugs or summation order, not TF32."""
    with bench.full_fp32(), torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                                      allow_tf32=False):
        yield


@contextlib.contextmanager
def no_host_sync(device: torch.device):
    """Any host synchronisation inside raises (CUDA); a CPU has none to detect."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def max_diff(a: nn.Module | dict, b: nn.Module | dict) -> float:
    """Largest |difference| over every floating tensor of two state dicts."""
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    diffs = [float((x.double() - sb[k].double()).abs().max()) for k, x in sa.items() if x.is_floating_point()]
    return max(diffs, default=0.0)


def counts_equal(a: nn.Module, b: nn.Module) -> bool:
    """Integer buffers (BatchNorm's num_batches_tracked) equal."""
    sb = b.state_dict()
    return all(torch.equal(x, sb[k]) for k, x in a.state_dict().items() if not x.is_floating_point())


def momentum(opt, params) -> dict:
    """Each parameter's momentum buffer by index (zeros where none was made yet)."""
    return {str(i): opt.state.get(p, {}).get("momentum_buffer", torch.zeros_like(p)) for i, p in enumerate(params)}


# ----------------------------------------------------------------------------- checks


def check_sync_free(ctx) -> dict:
    """Steady-state steps with no host synchronisation: eager, graphed, plain graphed, and the
    trainer's data path (sampler -> pinned copy -> augment -> normalize)."""
    from gaf.train import draw_batch

    n, b = 2, ctx.classes * ctx.m
    labels = torch.arange(ctx.pool) % ctx.classes
    ds = gdata.ImageDataset("random", torch.randint(0, 256, (ctx.pool, 3, 32, 32), dtype=torch.uint8), labels,
                            labels.clone(), torch.zeros(1, 3, 32, 32, dtype=torch.uint8), labels[:1],
                            ctx.classes, gdata.CIFAR100_MEAN, gdata.CIFAR100_STD, "random").to(ctx.device)
    sampler = ClassBalancedSampler(labels, ctx.classes, ctx.m, n, ctx.seed)
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    figures = {}
    for label, compile in (("eager", False), ("graph", "graph")):
        for kind in ("gaf", "plain"):
            if kind == "plain" and not compile:
                continue
            model = fresh(ctx)
            opt = masked_sgd(model)
            options = dict(compile=compile, graphs=ctx.graphs if compile else None)
            step = (FastGAFStep(model, opt, nn.CrossEntropyLoss(), ctx.tau, **options) if kind == "gaf"
                    else FastPlainStep(model, opt, nn.CrossEntropyLoss(), **options))
            for _ in range(FastGAFStep.warmup + 2):  # warm-up, capture, one replay
                step(*draw_batch(sampler, ds, gen, ctx.device))
            with no_host_sync(ctx.device):
                for _ in range(ctx.sync_steps):
                    out = step(*draw_batch(sampler, ds, gen, ctx.device))
            figures[f"{kind}_{label}_steps_without_sync"] = ctx.sync_steps
            assert torch.isfinite(out.loss).item()
    return dict(status="PASS", figures=figures,
                detail=f"{ctx.sync_steps} steady-state steps each under set_sync_debug_mode('error')"
                if ctx.device.type == "cuda"
                else "CPU dry run: no host-device synchronisation exists to detect")


# fp32-equal's bounds. Relative to the size of the step's change of each tensor, beyond one fp32
# rounding of the state: summation order alone gives ~1e-6; a wrong merge weight or a BatchNorm
# statistic not updated gives > 1e-2.
RELATIVE_BOUND = 1e-4
GRAPH_BOUND = 1e-6  # graphed against eager: the same kernels (measured exact on an H200)
DISTANCE_BOUND = 1e-5  # absolute, on cosine distances in [0, 2]
DECISION_MARGIN = 1e-4  # a decision may differ only where a distance is this close to tau
FP32_EPS, FP64_EPS = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
FUSED_BOUND = 1e-9  # fused-equal, in float64: fp64 rounding amplified by BatchNorm's cancellations (~1e5)


def tau_schedule(ctx) -> list[float]:
    """Tau per step: every step taken (2) through the graph's warm-up and capture, then steps
    taken, refused (0) and decided at the sweep's tau (--quick: each once, a refusal before and
    after a step taken)."""
    warm = [2.0] * (FastGAFStep.warmup + 1)
    return warm + ([0.0, 2.0, ctx.tau, 0.0] if ctx.quick else [0.0, 2.0, ctx.tau, 0.0, 2.0, ctx.tau, 0.0, 2.0])


def snapshot(model: nn.Module, opt) -> dict:
    """Copies of what a step changes: parameters, momentum (zeros where none yet), BatchNorm
    running statistics (the floating buffers) and integer buffers (num_batches_tracked)."""
    params = list(model.parameters())
    momentum = [opt.state.get(p, {}).get("momentum_buffer") for p in params]
    return {"params": [p.detach().clone() for p in params],
            "momentum": [torch.zeros_like(p) if m is None else m.detach().clone() for p, m in zip(params, momentum)],
            "batchnorm": [b.detach().clone() for b in model.buffers() if b.is_floating_point()],
            "counts": [int(b) for b in model.buffers() if not b.is_floating_point()]}


@torch.no_grad()
def restore(model: nn.Module, opt, snap: dict) -> None:
    """Copy a snapshot into a model and its (masked) optimizer, in place: a captured graph keeps
    reading the same tensors."""
    for p, v in zip(model.parameters(), snap["params"]):
        p.copy_(v)
    for b, v in zip([b for b in model.buffers() if b.is_floating_point()], snap["batchnorm"]):
        b.copy_(v)
    for b, v in zip([b for b in model.buffers() if not b.is_floating_point()], snap["counts"]):
        b.fill_(v)
    for p, v in zip(model.parameters(), snap["momentum"]):
        state = opt.state[p]
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = v.clone()
        else:
            state["momentum_buffer"].copy_(v)


def relative_change_diff(got: list, want: list, before: list, eps: float = FP32_EPS) -> float:
    """Worst over tensors of |change got - change wanted| / |change wanted| (L2 norms, float64),
    each element's difference less one rounding (``eps``) of the stored value (an update that differs
    in its last bit may round the state either way); where the wanted change is zero, any other
    change counts as infinitely wrong."""
    worst = 0.0
    for g, w, b in zip(got, want, before):
        g, w, b = g.double(), w.double(), b.double()
        beyond_rounding = ((g - w).abs() - eps * torch.maximum(g.abs(), w.abs())).clamp(min=0)
        diff, size = float(beyond_rounding.norm()), float((w - b).norm())
        worst = max(worst, diff / size if size > 0 else (0.0 if diff == 0 else math.inf))
    return worst


def max_abs(got: list, want: list) -> float:
    return max((float((g.double() - w.double()).abs().max()) for g, w in zip(got, want)), default=0.0)


def check_fp32_equal(ctx) -> dict:
    """gaf_step, the eager fast step and the graphed one, one step at a time from the same state.

    Before every step the reference's state (parameters, BatchNorm statistics, momentum) is
    copied into the two fast models, so each step is compared on its own: a network's chaos
    cannot grow a summation-order difference into a large one (free-running ResNet18 runs
    part by 1e-2 within four steps). Each step's change of parameters, momentum and BatchNorm
    statistics is compared with the reference's change, relative to its size; a decision may
    differ only where a distance lies within ``DECISION_MARGIN`` of tau."""
    n, b = ctx.equal_n, ctx.classes * ctx.m
    with strict_fp32():
        ref_model, eager_model, graph_model = fresh(ctx), fresh(ctx), fresh(ctx)
        ref_opt = torch.optim.SGD(ref_model.parameters(), **SGD)
        eager_opt, graph_opt = masked_sgd(eager_model), masked_sgd(graph_model)
        tau = torch.full((), 2.0, device=ctx.device)  # changed in place: the graph reads it by address
        loss = nn.CrossEntropyLoss()
        eager = FastGAFStep(eager_model, eager_opt, loss, tau, ctx.merge)
        compile, graphs = graph_mode(ctx)
        graphed = FastGAFStep(graph_model, graph_opt, loss, tau, ctx.merge, compile=compile, graphs=graphs)
        schedule = tau_schedule(ctx)
        worst = dict(update=0.0, momentum=0.0, batchnorm=0.0, graph_vs_eager=0.0, distance=0.0, skipped_moved=0.0)
        same = near = taken = 0
        counts_ok = True
        for s, (xs, ys) in enumerate(random_batches(ctx, len(schedule), n, b)):
            tau.fill_(schedule[s])
            before = snapshot(ref_model, ref_opt)
            for model, opt in ((eager_model, eager_opt), (graph_model, graph_opt)):
                restore(model, opt, before)
            ref = gaf_step(ref_model, ref_opt, loss, list(zip(xs, ys)), tau, ctx.merge)
            e, g = eager(xs, ys), graphed(xs, ys)
            after = {name: snapshot(m, o) for name, m, o in (("ref", ref_model, ref_opt), ("eager", eager_model,
                     eager_opt), ("graph", graph_model, graph_opt))}
            decisions = {ref["stepped"], bool(e.stepped), bool(g.stepped)}
            theirs = torch.tensor(ref["distances"], dtype=torch.float64)
            worst["distance"] = max(worst["distance"], float((e.distances.double().cpu() - theirs).abs().max()),
                                    float((g.distances.double().cpu() - theirs).abs().max()))
            if len(decisions) > 1:  # allowed only within the margin of tau
                near += bool((theirs - float(tau)).abs().min() <= DECISION_MARGIN)
                continue
            same += 1
            taken += ref["stepped"]
            for part in ("update", "momentum", "batchnorm"):
                key = "params" if part == "update" else part
                for name in ("eager", "graph"):
                    worst[part] = max(worst[part], relative_change_diff(after[name][key], after["ref"][key],
                                                                        before[key]))
            worst["graph_vs_eager"] = max(worst["graph_vs_eager"], *(
                relative_change_diff(after["graph"][k], after["eager"][k], before[k])
                for k in ("params", "momentum", "batchnorm")))
            if not ref["stepped"]:  # a skipped step leaves parameters and momentum bit for bit
                worst["skipped_moved"] = max(worst["skipped_moved"], *(
                    max_abs(after[name][k], before[k]) for name in ("eager", "graph") for k in ("params", "momentum")))
            counts_ok &= after["ref"]["counts"] == after["eager"]["counts"] == after["graph"]["counts"]
    steps = len(schedule)
    figures = dict(steps=steps, taken=taken, identical_decisions=same, differing_within_margin=near,
                   **{f"worst_{k}": v for k, v in worst.items()}, counts_equal=counts_ok)
    ok = (same + near == steps and same >= steps - 1 and 0 < taken < same and counts_ok
          and worst["update"] <= RELATIVE_BOUND and worst["momentum"] <= RELATIVE_BOUND
          and worst["batchnorm"] <= RELATIVE_BOUND and worst["graph_vs_eager"] <= GRAPH_BOUND
          and worst["distance"] <= DISTANCE_BOUND and worst["skipped_moved"] == 0.0)
    return dict(status="PASS" if ok else "FAIL", figures=figures,
                detail=f"{ctx.model}, n={n} x {b} images, merge {ctx.merge}, each step from the reference's state: "
                       f"change of parameters, momentum and BN statistics within {RELATIVE_BOUND:g} of the "
                       f"reference's change (relative), graph vs eager within {GRAPH_BOUND:g}, distances within "
                       f"{DISTANCE_BOUND:g}, skipped steps leave the state bit for bit, decisions identical except "
                       f"within {DECISION_MARGIN:g} of tau, steps both taken and skipped")


def check_fused_equal(ctx) -> dict:
    """gaf.fused.FusedSteps (graphed on CUDA) against each member's eager FastGAFStep, one step at a
    time from the fused member's state, both in float64: the question is whether the fused program
    computes each member's step. In fp32 the grouped kernels' other summation order has no bound one
    can state: on ResNet18's 1x1 maps of the last stage a ReLU input lies within rounding of 0 now
    and then, and that BatchNorm channel's gradient differs by a finite amount (measured on a CPU:
    one element of 512 off by 20% of its change, every other within 1e-9). In float64 every change
    of parameters, momentum and BatchNorm statistics agrees within FUSED_BOUND of the single step's
    change (relative), distances within DISTANCE_BOUND (reported in fp32), every decision identical,
    a skip moving nothing. Two members with their own weights and data; tau swept in opposite
    orders, so that both take and skip."""
    n, b, k = ctx.equal_n, ctx.classes * ctx.m, 2
    schedule = tau_schedule(ctx)
    models = [fresh_seeded(ctx, ctx.seed + j).double() for j in range(k)]
    _, graphs = graph_mode(ctx)
    group = FusedSteps(models, **SGD, tau=[2.0] * k, merge=ctx.merge, compile="graph", graphs=graphs)
    singles = [copy.deepcopy(m) for m in models]
    opts = [masked_sgd(m) for m in singles]
    steppers = [FastGAFStep(m, o, nn.CrossEntropyLoss(), 2.0, ctx.merge) for m, o in zip(singles, opts)]
    worst, same, taken, steps = 0.0, 0, 0, 0
    for s, (xs, ys) in enumerate(random_batches(ctx, len(schedule), k * n, b)):
        taus = [schedule[s], schedule[-1 - s]]
        xs, ys = xs.double().unflatten(0, (k, n)), ys.unflatten(0, (k, n))
        befores = []
        for j in range(k):
            group.set_tau(j, taus[j])
            steppers[j].tau = taus[j]
            load_member_into(group, j, singles[j], opts[j])
            befores.append(snapshot(singles[j], opts[j]))
        got = group(xs, ys)
        for j in range(k):
            want = steppers[j](xs[j], ys[j])
            ref = snapshot(singles[j], opts[j])
            load_member_into(group, j, singles[j], opts[j])
            fused, before = snapshot(singles[j], opts[j]), befores[j]
            steps += 1
            if bool(got.stepped[j]) != bool(want.stepped):
                continue
            same += 1
            taken += bool(want.stepped)
            compared = ("params", "momentum", "batchnorm") if want.stepped else ("batchnorm",)
            worst = max(worst, (got.distances[j] - want.distances).abs().max().item() / DISTANCE_BOUND, *(
                relative_change_diff(fused[key], ref[key], before[key], FP64_EPS) / FUSED_BOUND for key in compared))
            unmoved = want.stepped or max_abs(fused["params"] + fused["momentum"],
                                              before["params"] + before["momentum"]) == 0.0
            worst = worst if fused["counts"] == ref["counts"] and unmoved else math.inf  # a skip moves nothing
    figures = dict(steps=steps, taken=taken, identical_decisions=same, worst_over_bound=worst)
    ok = same == steps and 0 < taken < same and worst <= 1.0
    return dict(status="PASS" if ok else "FAIL", figures=figures,
                detail=f"{ctx.model}, {k} members, n={n} x {b} images, merge {ctx.merge}, float64, fused "
                       f"{'graphed' if ctx.device.type == 'cuda' else '(stand-in graph)'} against each member's eager "
                       f"fast step from its state: every change within {FUSED_BOUND:g} (relative), distances within "
                       f"{DISTANCE_BOUND:g}, decisions identical")


def fresh_seeded(ctx, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ctx.model, ctx.classes).to(ctx.device)


def load_member_into(group, k: int, model: nn.Module, opt) -> None:
    """A fused member's state into a single run's model and masked optimizer (in place)."""
    model_state, optimizer_state = group.member_state(k)
    model.load_state_dict(model_state)
    if optimizer_state["state"]:
        opt.load_state_dict(optimizer_state)
    else:  # no step yet: no momentum
        opt.state.clear()


def check_bf16(ctx) -> dict:
    """bf16 + channels_last (graphed) against the fp32 reference along the fast model's trajectory."""
    options = dict(amp_dtype=torch.bfloat16, channels_last=True, compile="graph" if ctx.device.type == "cuda" else False)
    data, classes = (ctx.real, 10) if ctx.real is not None else (None, ctx.classes)
    if data is None:
        gen = torch.Generator().manual_seed(ctx.seed)
        images = torch.randint(0, 256, (ctx.pool, 3, 32, 32), dtype=torch.uint8, generator=gen)
        data = bench.DeviceImages(images, torch.arange(ctx.pool) % classes, ctx.device, ctx.seed)
    per_class = 100 // classes if not ctx.quick else 2  # 100-image microbatches, as m = 1 on CIFAR-100
    sampler = ClassBalancedSampler(data.y.cpu(), classes, per_class, 2, ctx.seed)
    plan = torch.stack([sampler.sample() for _ in range(ctx.bf16_steps)])
    args = SimpleNamespace(seed=ctx.seed, model=ctx.model, tau=ctx.tau)
    got = bench.check_against_reference(args, ctx.device, data, plan, options, ctx.bf16_steps, classes=classes)
    figures = {f"bf16_{k}": v for k, v in got.items()} | {"data": ctx.real_note if ctx.real is not None else "random"}
    return dict(status="PASS", figures=figures,
                detail=f"{got['same_decisions']:.2%} identical decisions over {got['decisions']}; the CUDA default "
                       "may turn to bf16 only at >= 99%")


def check_compile(ctx) -> dict:
    """compile=True (torch.compile + graph) against the eager step, tiny model then ResNet18."""
    models = ["tiny"] + (["resnet18"] if ctx.args.compile_resnet and not ctx.quick else [])
    figures = {}
    ok = True
    # the CPU dry run traces with dynamo but skips inductor's minutes of C++ builds
    # (tests/test_fast.py compiles with inductor on a CPU)
    backend = "inductor" if ctx.device.type == "cuda" else "eager"
    for name in models:
        start = time.perf_counter()
        n, b = 2, ctx.classes * ctx.m
        compiled_model, eager_model = fresh(ctx, model=name), fresh(ctx, model=name)
        compile, graphs = graph_mode(ctx, full=True)
        with compile_backend(backend):
            compiled = FastGAFStep(compiled_model, masked_sgd(compiled_model), nn.CrossEntropyLoss(), 2.0,
                                   compile=compile, graphs=graphs)
        eager = FastGAFStep(eager_model, masked_sgd(eager_model), nn.CrossEntropyLoss(), 2.0)
        worst = 0.0
        for xs, ys in random_batches(ctx, FastGAFStep.warmup + 3, n, b):
            c, e = compiled(xs, ys), eager(xs, ys)
            worst = max(worst, float((c.distances - e.distances).abs().max()))
        figures[f"{name}_max_distance_diff"] = worst
        figures[f"{name}_state_diff"] = max_diff(compiled_model, eager_model)
        figures[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        ok &= worst <= 1e-3 and figures[f"{name}_state_diff"] <= 1e-3
    return dict(status="PASS" if ok else "FAIL", figures=figures,
                detail=f"{', '.join(models)}, torch.compile backend {backend}; bounds 1e-3 (inductor reorders "
                       "fp32 sums)")


@contextlib.contextmanager
def compile_backend(backend: str):
    """torch.compile with ``backend`` while a stepper is built (it calls torch.compile once)."""
    original = torch.compile
    torch.compile = lambda model, **kw: original(model, backend=backend, **kw)
    try:
        yield
    finally:
        torch.compile = original


def check_batched(ctx) -> dict:
    """One vmap(grad) pass against n sequential passes, fp32, eager and graphed."""
    n, b = 3, ctx.classes * ctx.m
    figures, ok = {}, True
    with strict_fp32():
        for label, (compile, graphs) in (("eager", (False, None)), ("graph", graph_mode(ctx))):
            seq_model, vmap_model = fresh(ctx), fresh(ctx)
            seq = FastGAFStep(seq_model, masked_sgd(seq_model), nn.CrossEntropyLoss(), ctx.tau)
            vm = FastGAFStep(vmap_model, masked_sgd(vmap_model), nn.CrossEntropyLoss(), ctx.tau, batched=True,
                             compile=compile, graphs=graphs)
            same = 0
            batches = random_batches(ctx, FastGAFStep.warmup + 3, n, b)
            for xs, ys in batches:
                s, v = seq(xs, ys), vm(xs, ys)
                same += bool(torch.equal(s.accepted, v.accepted))
            figures[f"{label}_state_diff"] = max_diff(vmap_model, seq_model)
            figures[f"{label}_counts_equal"] = counts_equal(vmap_model, seq_model)
            figures[f"{label}_identical_decisions"] = f"{same}/{len(batches)}"
            ok &= figures[f"{label}_state_diff"] <= 1e-4 and figures[f"{label}_counts_equal"] and same == len(batches)
    return dict(status="PASS" if ok else "FAIL", figures=figures,
                detail="parameters and BN running statistics within 1e-4, num_batches_tracked equal")


def check_speed(ctx) -> dict:
    """Images/s side by side on the same images and microbatch indices (bench.py's contenders)."""
    import numpy as np

    try:
        import gradient_agreement_filtering  # noqa: F401
        has_authors = True
    except ImportError:
        has_authors = False
    cuda = ctx.device.type == "cuda"
    args = SimpleNamespace(seed=ctx.seed, model=ctx.model, tau=ctx.tau, steps=ctx.speed_steps,
                           warmup=max(ctx.speed_warmup, FastGAFStep.warmup + 2) if cuda else ctx.speed_warmup,
                           amp="none", channels_last=False, compile="none")
    rng = np.random.default_rng(ctx.seed)
    images = rng.integers(0, 256, size=(ctx.pool, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, ctx.classes, size=ctx.pool).astype(np.int64)
    pil, data = bench.PilImages(images, labels), bench.DeviceImages(images, labels, ctx.device, ctx.seed)
    graph = "graph" if ctx.device.type == "cuda" else False  # the stand-in would time nothing real
    fp32 = dict(amp_dtype=None, channels_last=False, compile=graph)
    bf16 = dict(amp_dtype=torch.bfloat16, channels_last=True, compile=graph)
    contenders = ([("authors", "authors", None)] if has_authors else []) + [
        ("gaf_step", "gaf_step", None), ("fast_eager", "fast", {**fp32, "compile": False}),
        ("fast_graph", "fast", fp32), ("plain_graph", "plain", fp32),
        ("fast_graph_bf16", "fast", bf16), ("plain_graph_bf16", "plain", bf16)]
    rows = []
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = ctx.device.type == "cuda"
    try:
        for n in ctx.speed_n:
            b = ctx.classes * ctx.m
            gen = torch.Generator().manual_seed(ctx.seed + n)
            plan = torch.randint(0, ctx.pool, (args.warmup + args.steps, n, b), generator=gen)
            row = {"n": n, "m": ctx.m, "images_per_step": n * b}
            for label, name, options in contenders:
                data.reset()
                step = bench.make_contender(name, args, ctx.device, pil, data, plan, options)
                row[label] = n * b * args.steps / bench.time_contender(step, args, ctx.device)
                del step
            row["fast_over_plain"] = row["plain_graph"] / row["fast_graph"]
            row["fast_over_plain_bf16"] = row["plain_graph_bf16"] / row["fast_graph_bf16"]
            rows.append(row)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    return dict(status="PASS", figures={"rows": rows, "authors": has_authors},
                detail=f"{ctx.model}, {ctx.classes} classes, m={ctx.m}, {args.steps} timed steps after "
                       f"{args.warmup}; random images; authors' step_GAF "
                       + ("included" if has_authors else "not importable here (skipped)"))


def check_trainer(ctx) -> dict:
    """gaf.train.run in the CUDA paper setting: its images/s against wall-clock differences
    of two runs that differ only in length (set-up, warm-up and capture cancel), and the
    wall time of a small-scale run (2,000 iterations, validating every 250)."""
    from gaf.config import RunConfig
    from gaf.train import run

    short, long = (10, 40) if ctx.quick else (100, 700)
    base = {"data": {"name": "random", "num_classes": ctx.classes, "random_train": 50 * ctx.classes if ctx.quick
                     else 50000, "random_test": 200 if ctx.quick else 1000},
            "model": {"name": ctx.model}, "method": {"name": "gaf", "per_class": ctx.m, "n_micro": 2},
            "train": {"memorisation_samples": 100 if ctx.quick else 1000, "progress": False,
                      "compile": "graph" if ctx.device.type == "cuda" else "none"},
            "device": ctx.args.device, "seed": ctx.seed}
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        walls, summaries = {}, {}
        for its in (short, long):
            cfg = RunConfig.from_dict(merge(base, {"train": {"iterations": its, "val_every": its}}))
            start = time.perf_counter()
            summaries[its] = run(cfg, Path(tmp) / f"run{its}")
            walls[its] = time.perf_counter() - start
        images = summaries[long]["images_seen"] - summaries[short]["images_seen"]
        wall_rate = images / (walls[long] - walls[short])
        loop_rate = images / (summaries[long]["train_time_s"] - summaries[short]["train_time_s"])
        figures.update(images_per_s=summaries[long]["images_per_s"], loop_rate_from_difference=loop_rate,
                       wall_rate_from_difference=wall_rate, agreement=loop_rate / wall_rate,
                       whole_run_images_per_s=summaries[long]["images_seen"] / walls[long])
        small = small_scale_config(ctx, base)
        start = time.perf_counter()
        summary = run(RunConfig.from_dict(small), Path(tmp) / "small")
        figures.update(small_scale_wall_s=round(time.perf_counter() - start, 1),
                       small_scale_iterations=small["train"]["iterations"],
                       small_scale_best_val_acc=summary["best_val_acc"], small_scale_data=small["data"]["name"])
    ok = ctx.device.type != "cuda" or abs(figures["agreement"] - 1) <= 0.05
    return dict(status="PASS" if ok else "FAIL", figures=figures,
                detail="loop images/s from summary.json vs the wall clock, over the iterations the two runs differ "
                       "by (bound 5% on CUDA; not asserted on a CPU)")


def small_scale_config(ctx, base: dict) -> dict:
    """The small scale's loop (configs/scale/small.yaml's, as exported beside the gpu_small points: no
    YAML here) on the real data if any; --quick: 40 iterations."""
    small = json.loads(SCALE_LOOPS.read_text())["scale_loops"]["small"]
    loop = {"iterations": 40, "val_every": 20, "memorisation_samples": 100} if ctx.quick else \
        {k: small[k] for k in ("iterations", "val_every", "memorisation_samples")}
    data = {"name": "cifar10_jpeg", "jpeg_path": ctx.args.jpeg} if ctx.real is not None else base["data"]
    if ctx.quick and ctx.real is not None:
        data |= {"train_per_class": 20, "test_per_class": 10}
    return merge(base, {"data": data, "train": loop})


def merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "data" else v
    return out


CHECKS = {"sync-free": check_sync_free, "fp32-equal": check_fp32_equal, "fused-equal": check_fused_equal,
          "bf16": check_bf16,
          "compile": check_compile, "batched": check_batched, "speed": check_speed, "trainer": check_trainer}


# ----------------------------------------------------------------------------- report


def run_checks(ctx, names) -> dict:
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            result = CHECKS[name](ctx)
        except Exception as e:  # one failing check must not hide the others
            traceback.print_exc(file=sys.stderr)
            result = dict(status="FAIL", figures={}, detail=f"{type(e).__name__}: {e}".splitlines()[0][:300])
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        result["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = result
        print(f"{result['status']} {name} ({result['seconds']} s): {result['detail']}; "
              f"{json.dumps(result['figures'], default=str)[:600]}", flush=True)
    return results


def targets(results: dict) -> list[str]:
    rows = {r["n"]: r for r in results.get("speed", {}).get("figures", {}).get("rows", [])}
    lines = []
    for n, bound in ((2, TARGETS["fast_over_plain_n2"]), (10, TARGETS["fast_over_plain_n10"])):
        if n in rows:
            for key in ("fast_over_plain", "fast_over_plain_bf16"):
                got = rows[n][key]
                lines.append(f"TARGET {'met' if got <= bound else 'missed'}: {key} at n={n} {got:.2f} (<= {bound})")
    if 2 in rows:
        best = max(rows[2]["fast_graph"], rows[2]["fast_graph_bf16"])
        lines.append(f"TARGET {'met' if best >= TARGETS['gaf_n2_images_per_s'] else 'missed'}: GAF n=2 m=1 "
                     f"{best:,.0f} images/s (>= {TARGETS['gaf_n2_images_per_s']:,})")
    return lines


def environment(ctx) -> dict:
    cuda = ctx.device.type == "cuda"
    return {"card": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None, "python": sys.version.split()[0],
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "quick": ctx.quick,
            "data": ctx.real_note, "command": " ".join(["python", "scripts/gpu_check.py", *sys.argv[1:]])}


def markdown(env: dict, results: dict, target_lines: list[str]) -> str:
    lines = [f"# GPU check on {env['card']}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}, {env['date']}; "
             f"real-data checks on: {env['data']}.", f"Command: `{env['command']}`", "",
             "| check | result | seconds | detail |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['status']} | {r['seconds']} | {r['detail']} |")
    speed = results.get("speed", {}).get("figures", {}).get("rows")
    if speed:
        cols = [c for c in ("authors", "gaf_step", "fast_eager", "fast_graph", "plain_graph", "fast_graph_bf16",
                            "plain_graph_bf16") if c in speed[0]]
        lines += ["", "Images/s (ResNet18, m = 1, 100 classes; fp32 unless bf16):", "",
                  "| n | images/step | " + " | ".join(cols) + " | fast/plain fp32 | fast/plain bf16 |",
                  "|---|---|" + "---|" * (len(cols) + 2)]
        for r in speed:
            lines.append(f"| {r['n']} | {r['images_per_step']} | " + " | ".join(f"{r[c]:,.0f}" for c in cols)
                         + f" | {r['fast_over_plain']:.2f} | {r['fast_over_plain_bf16']:.2f} |")
    lines += ["", *target_lines, "", "Figures of every check:", ""]
    for name, r in results.items():
        if name != "speed":
            lines.append(f"- {name}: " + ", ".join(f"{k} = {fmt(v)}" for k, v in r["figures"].items()))
    return "\n".join(lines) + "\n"


def fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = args.only or list(CHECKS)
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        raise SystemExit(f"error: unknown check(s) {unknown}; choose from {list(CHECKS)}")
    ctx = context(args)
    env = environment(ctx)
    print(f"gpu_check on {env['card']}, torch {env['torch']}; data: {ctx.real_note}", flush=True)
    results = run_checks(ctx, names)
    target_lines = targets(results) if ctx.device.type == "cuda" else []
    print("\n".join(target_lines))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{env['date'][:10]}-{re.sub(r'[^A-Za-z0-9]+', '-', env['card']).strip('-').lower()}"
    (out / f"{stem}.md").write_text(markdown(env, results, target_lines))
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "checks": results}, indent=1, default=str))
    print(f"wrote {out / stem}.md and .json")
    if any(r["status"] == "FAIL" for r in results.values()):
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
