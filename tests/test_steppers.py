"""The stepper contract: every stepper returns ``StepStats``; the one micro-gradient loop; the
one BatchNorm merge. (That the loop and the merge compute what each path computed before is
what the equality tests show: test_step's gaf_step against the authors' package,
test_fast's fast step against gaf_step and its batched step, test_distributed's ranks
against one process.)"""

import copy
import socket

import pytest
import torch
from torch import nn

from gaf.batchnorm import sequential_average, sequential_cumulative_average, tracked_batchnorms
from gaf.distributed import DistributedGAFStep, DistributedMeanStep
from gaf.fast import FastGAFStep, FastPlainStep, StandInGraphs
from gaf.optim import build_optimizer
from gaf.step import PlainStep, ReferenceGAFStep, StepStats, micrograds, param_views, trainable_parameters
from gaf.torchrun import init_from_env, shutdown

N, B, CLASSES = 3, 4, 5


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, CLASSES))


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, B, 3, 8, 8, generator=gen), torch.randint(0, CLASSES, (N, B), generator=gen)


@pytest.fixture
def one_rank_group(monkeypatch):
    """A one-rank gloo process group in this process, for the distributed steppers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(var, value)
    init_from_env("gloo")
    yield
    shutdown()


def every_cpu_stepper():
    """(name, stepper, filtered) for each stepper the trainer or a script can build on a CPU."""
    def masked(model):
        return build_optimizer("sgd", model.parameters(), lr=0.05, masked=True)

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    loss = nn.CrossEntropyLoss()
    made = [("plain", lambda m: PlainStep(m, sgd(m), loss), False),
            ("reference", lambda m: ReferenceGAFStep(m, sgd(m), loss, 0.97), True),
            ("fast", lambda m: FastGAFStep(m, masked(m), loss, 0.97), True),
            ("fast batched", lambda m: FastGAFStep(m, masked(m), loss, 0.97, batched=True), True),
            ("fast graphed", lambda m: FastGAFStep(m, masked(m), loss, 0.97, compile="graph",
                                                   graphs=StandInGraphs()), True),
            ("fast plain", lambda m: FastPlainStep(m, masked(m), loss), False),
            ("distributed", lambda m: DistributedGAFStep(m, sgd(m), loss, 0.97), True),
            ("distributed mean", lambda m: DistributedMeanStep(m, sgd(m), loss), False)]
    return [(name, make(small_cnn()), filtered) for name, make, filtered in made]


def test_every_stepper_returns_step_stats(one_rank_group):
    xs, ys = batch()
    for name, stepper, filtered in every_cpu_stepper():
        for _ in range(FastGAFStep.warmup + 2):  # a graphed one warms up, captures, replays
            out = stepper(xs, ys)
        assert isinstance(out, StepStats), name
        assert out.samples == N * B, name
        kinds = {"loss": torch.float32, "correct": torch.long, "accepted": torch.long, "stepped": torch.bool,
                 "tau": torch.float32}
        for field, dtype in kinds.items():
            value = getattr(out, field)
            assert value.shape == () and value.dtype == dtype and value.device == xs.device, (name, field)
        assert out.distances.dtype == torch.float32 and out.distances.shape == ((N - 1,) if filtered else (0,)), name
        assert 0 < float(out.loss) and 0 <= int(out.correct) <= N * B, name
        if filtered:
            assert float(out.tau) == pytest.approx(0.97) and 0 <= int(out.accepted) <= N - 1, name
            assert bool(out.stepped) == (int(out.accepted) > 0), name
        else:
            assert torch.isnan(out.tau) and int(out.accepted) == 0 and bool(out.stepped), name


def test_step_stats_clone_and_copy_keep_results_apart():
    first = StepStats.unfiltered(torch.tensor(1.0), torch.tensor(3), 8)
    kept = first.clone()
    first.copy_(StepStats.unfiltered(torch.tensor(2.0), torch.tensor(5), 8))
    assert (float(kept.loss), int(kept.correct)) == (1.0, 3) and (float(first.loss), int(first.correct)) == (2.0, 5)
    assert set(kept.tensors()) == {"loss", "correct", "distances", "accepted", "stepped", "tau"}


@pytest.mark.parametrize("channels_last", [False, True])
def test_micrograds_rows_are_the_backward_gradients(channels_last):
    """autograd.grad into row views equals .backward() per microbatch, bit for bit, in any layout."""
    model, twin = small_cnn(), small_cnn()
    if channels_last:
        model.to(memory_format=torch.channels_last)
        twin.to(memory_format=torch.channels_last)
    xs, ys = batch()
    params = trainable_parameters(model)
    grads = torch.empty(N, sum(p.numel() for p in params))
    out = micrograds(model, nn.CrossEntropyLoss(), params, [param_views(row, params) for row in grads], zip(xs, ys))
    assert all(p.grad is None for p in params)
    for i in range(N):
        twin.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(twin(xs[i]), ys[i])
        loss.backward()
        for view, p in zip(param_views(grads[i], params), twin.parameters()):
            assert torch.equal(view, p.grad)
        assert torch.equal(out.losses[i], loss.detach())
    assert out.classified and out.correct.shape == (N,)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_runs_apart_merge_to_the_sequential_statistics(momentum):
    """K runs of m batches from one start, merged, equal the K * m batches in sequence."""
    k, m = 3, 2
    layer = nn.BatchNorm1d(4, momentum=momentum).double()
    gen = torch.Generator().manual_seed(0)
    layer.running_mean.normal_(generator=gen)
    layer.running_var.uniform_(0.5, 2.0, generator=gen)
    layer.num_batches_tracked.fill_(5)
    batches = torch.randn(k, m, 8, 4, generator=gen, dtype=torch.float64) * 3 + 1
    sequential, runs = copy.deepcopy(layer), []
    for x in batches.flatten(0, 1):
        sequential(x)
    for j in range(k):
        run = copy.deepcopy(layer)
        for x in batches[j]:
            run(x)
        runs.append(run)
    for name in ("running_mean", "running_var"):
        r0, ends = getattr(layer, name), torch.stack([getattr(r, name) for r in runs])
        if momentum is None:
            merged = sequential_cumulative_average(r0, ends, torch.tensor(5.0, dtype=torch.float64),
                                                   torch.tensor(float(m), dtype=torch.float64))
        else:
            merged = sequential_average(r0, ends, torch.tensor((1 - momentum) ** m, dtype=torch.float64))
        torch.testing.assert_close(merged, getattr(sequential, name), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(ends[0], getattr(sequential, name))  # not vacuous: a run alone differs


def test_tracked_batchnorms_are_the_layers_with_running_statistics():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False),
                                                           nn.BatchNorm1d(2)), nn.Linear(2, 2))
    assert [(name, type(m).__name__) for name, m in tracked_batchnorms(model)] == [("0", "BatchNorm2d"),
                                                                                 ("1.1", "BatchNorm1d")]

