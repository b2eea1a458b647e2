"""GAF across ranks (gloo on CPU, processes spawned here): a K-rank run is the
single-process run with n = K * n_local microbatches, in both reduction modes."""

import copy
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gaf import agreement_weights, gaf_step, gram_matrix
from gaf.distributed import (
    CommCounter,
    DistributedGAFStep,
    DistributedMeanStep,
    ReplicaDriftError,
    allgather_gradients,
    check_replicas,
    gram_shard_reduce,
    init_from_env,
    local_slice,
    shutdown,
    weighted_aggregate,
)
from gaf.models import build_model

STEPS, BATCH, CLASSES = 6, 8, 10
TAUS = (0.95, 1.05, 2.0)  # distances of the tiny model on random data spread over ~0.6-1.3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, world_size, *args, timeout=120.0):
    """Run ``worker(rank, world_size, port, *args)`` on ``world_size`` gloo ranks.

    A rank that raises fails the test with its traceback; ranks stuck in a collective
    are killed after ``timeout`` seconds (gloo itself would wait 30 minutes).
    """
    context = mp.start_processes(worker, args=(world_size, free_port(), *args), nprocs=world_size,
                                 start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{worker.__name__} on {world_size} ranks did not finish in {timeout:.0f} s (a hung collective?)")


def join(rank, world_size, port):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return init_from_env("gloo")


# --- the model, data and run both sides share --------------------------------------


def make_model(bn_momentum="default"):
    torch.manual_seed(0)
    model = build_model("tiny", CLASSES)
    if bn_momentum != "default":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum
    return model


def make_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)


def global_batches(n, seed):
    """The (STEPS, n, b, ...) inputs every rank draws alike from the shared seed."""
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(STEPS, n, BATCH, 3, 8, 8, generator=gen)
    ys = torch.randint(0, CLASSES, (STEPS, n, BATCH), generator=gen)
    return xs, ys


def state(model, optimizer):
    out = {k: v.clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        if "momentum_buffer" in optimizer.state.get(p, {}):
            out[f"momentum.{i}"] = optimizer.state[p]["momentum_buffer"].clone()
    return out


def single_process_run(config, n):
    model = make_model(config["bn_momentum"])
    optimizer = make_optimizer(model)
    xs, ys = global_batches(n, config["seed"])
    metrics = []
    for s in range(STEPS):
        r = gaf_step(model, optimizer, nn.CrossEntropyLoss(), [(xs[s, i], ys[s, i]) for i in range(n)],
                     config["tau"], config["merge"])
        metrics.append(r)
    return state(model, optimizer), metrics


def equivalence_worker(rank, world_size, port, configs, outdir):
    join(rank, world_size, port)
    for c in configs:
        n = world_size * c["n_local"]
        model = make_model(c["bn_momentum"])
        optimizer = make_optimizer(model)
        stepper = DistributedGAFStep(model, optimizer, nn.CrossEntropyLoss(), c["tau"], c["merge"], c["mode"])
        xs, ys = global_batches(n, c["seed"])
        metrics = []
        for s in range(STEPS):
            out = stepper(local_slice(xs[s], rank, world_size), local_slice(ys[s], rank, world_size))
            metrics.append({k: v.clone() for k, v in out.tensors().items()})
        torch.save({"state": state(model, optimizer), "metrics": metrics}, f"{outdir}/{c['name']}_rank{rank}.pt")
    shutdown()


def check_equivalence(world_size, configs, tmp_path):
    spawn(equivalence_worker, world_size, configs, str(tmp_path))
    decisions, accepted_counts = set(), set()
    for c in configs:
        n = world_size * c["n_local"]
        ref_state, ref_metrics = single_process_run(c, n)
        runs = [torch.load(tmp_path / f"{c['name']}_rank{r}.pt") for r in range(world_size)]
        for r, run in enumerate(runs):
            assert run["state"].keys() == ref_state.keys()
            for key, ref in ref_state.items():
                got = run["state"][key]
                if key.endswith("num_batches_tracked"):
                    assert int(got) == int(ref) == STEPS * n, (c["name"], r, key)
                else:
                    # replicas are bit-identical; the single process differs only by rounding
                    assert torch.equal(got, runs[0]["state"][key]), (c["name"], r, key)
                    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (c["name"], r, key, (got - ref).abs().max())
        for mine, ref in zip(runs[0]["metrics"], ref_metrics):
            assert bool(mine["stepped"]) == ref["stepped"], c["name"]
            assert int(mine["accepted"]) == ref["accepted"], c["name"]
            assert mine["distances"].shape == (n - 1,)
            assert mine["distances"].tolist() == pytest.approx(ref["distances"], abs=1e-5)
            assert float(mine["loss"]) == pytest.approx(ref["loss"], abs=1e-5)
            assert int(mine["correct"]) == round(ref["accuracy"] * n * BATCH)
            assert float(mine["tau"]) == pytest.approx(c["tau"])
            decisions.add(ref["stepped"])
            accepted_counts.add(ref["accepted"])
    return decisions, accepted_counts


def configs_for(modes, taus, n_local=1, merge="halving", bn_momentum="default", tag=""):
    return [dict(name=f"{mode}_{tau}_{n_local}_{merge}{tag}", mode=mode, tau=tau, n_local=n_local, merge=merge,
                 bn_momentum=bn_momentum, seed=int(100 * tau) + n_local)
            for mode in modes for tau in taus]


def test_two_ranks_equal_one_process_with_two_microbatches(tmp_path):
    configs = configs_for(("gram", "allgather"), TAUS)
    # two microbatches per rank (n=4, BatchNorm merged over 2 local updates) and cumulative BN averaging
    configs += configs_for(("gram",), (1.0,), n_local=2, merge="mean")
    configs += configs_for(("gram",), (1.05,), bn_momentum=None, tag="_cma")
    decisions, _ = check_equivalence(2, configs, tmp_path)
    assert decisions == {True, False}, "the taus must produce both taken and skipped steps"


def test_three_ranks_equal_one_process_with_three_microbatches(tmp_path):
    decisions, accepted = check_equivalence(3, configs_for(("gram", "allgather"), TAUS), tmp_path)
    assert decisions == {True, False}
    assert accepted == {0, 1, 2}, "want steps with none, one and both later micro-gradients accepted"


def make_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def mean_worker(rank, world_size, port, outdir):
    join(rank, world_size, port)
    xs, ys = global_batches(world_size, 5)
    for name, model in (("mlp", make_mlp()), ("batchnorm", make_model())):
        optimizer = make_optimizer(model)
        stepper = DistributedMeanStep(model, optimizer, nn.CrossEntropyLoss())
        losses = [float(stepper(local_slice(xs[s], rank, world_size), local_slice(ys[s], rank, world_size)).loss)
                  for s in range(STEPS)]
        torch.save((state(model, optimizer), losses), f"{outdir}/{name}_rank{rank}.pt")
    shutdown()


@pytest.fixture(scope="module")
def mean_run(tmp_path_factory):
    """Two ranks of the baseline stepper, on an MLP and on the BatchNorm CNN (one spawn)."""
    outdir = tmp_path_factory.mktemp("mean")
    spawn(mean_worker, 2, str(outdir))
    return {name: [torch.load(outdir / f"{name}_rank{r}.pt") for r in range(2)] for name in ("mlp", "batchnorm")}


def test_mean_step_equals_one_process_on_the_whole_batch(mean_run):
    model = make_mlp()
    optimizer = make_optimizer(model)
    xs, ys = global_batches(2, 5)
    losses = []
    for s in range(STEPS):  # the single-process baseline: one step on all n * b samples
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(xs[s].flatten(0, 1)), ys[s].flatten())
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    expected = state(model, optimizer)
    for got, got_losses in mean_run["mlp"]:
        assert got_losses == pytest.approx(losses, abs=1e-5)
        for key, ref in expected.items():
            assert torch.allclose(got[key], ref, atol=1e-5), key


def test_mean_step_batchnorm_is_ddp_the_ranks_running_statistics_averaged(mean_run):
    """DDP, emulated in one process: each rank's replica normalises its own half with its
    own batch statistics; the gradients are averaged, and so (the README's promise) are
    the running statistics the ranks' replicas would hold. A merge that is wrong the same
    way on every rank (rank 0's statistics, their sum, the sequential merge of the GAF
    stepper) keeps the replicas identical, so only this comparison catches it."""
    model = make_model()
    optimizer = make_optimizer(model)
    xs, ys = global_batches(2, 5)
    running = [k for k in model.state_dict() if k.endswith(("running_mean", "running_var"))]
    for s in range(STEPS):
        replicas = [copy.deepcopy(model) for _ in range(2)]
        for k, replica in enumerate(replicas):  # rank k's rows of the global step
            nn.functional.cross_entropy(replica(xs[s, k]), ys[s, k]).backward()
        optimizer.zero_grad()
        for p, *per_rank in zip(model.parameters(), *(r.parameters() for r in replicas)):
            p.grad = sum(q.grad for q in per_rank) / 2
        optimizer.step()
        with torch.no_grad():
            for key in running:
                model.state_dict()[key].copy_(sum(r.state_dict()[key] for r in replicas) / 2)
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.num_batches_tracked += 1
    expected = state(model, optimizer)
    for got, _ in mean_run["batchnorm"]:
        for key, ref in expected.items():
            if key.endswith("num_batches_tracked"):
                assert int(got[key]) == STEPS, key
            else:
                assert torch.allclose(got[key], ref, atol=1e-5, rtol=1e-5), (key, (got[key] - ref).abs().max())
    # not vacuous: the per-rank statistics differ, so averaging them is not the same as taking either
    halves = [copy.deepcopy(make_model()) for _ in range(2)]
    for k, half in enumerate(halves):
        half(xs[0, k])
    assert (halves[0][1].running_var - halves[1][1].running_var).abs().max() > 1e-3


# --- the reductions themselves ------------------------------------------------------


SHARD_P, SHARD_N_LOCAL = 1001, 2  # P not divisible by K=3


def shard_worker(rank, world_size, port, outdir):
    join(rank, world_size, port)
    gen = torch.Generator().manual_seed(7)
    everything = torch.randn(world_size * SHARD_N_LOCAL, SHARD_P, generator=gen)  # same on every rank
    mine = local_slice(everything, rank, world_size)
    out = {}
    for mode in ("gram", "allgather"):
        counter = CommCounter()
        if mode == "gram":
            gram, shards, cols = gram_shard_reduce(mine, counter=counter)
            weights, accepted, distances = agreement_weights(gram, 2.0)
            aggregate = weighted_aggregate(weights, shards, size=SHARD_P, counter=counter)
            out["shards"], out["cols"] = shards, (cols.start, cols.stop)
        else:
            full = allgather_gradients(mine, counter=counter)
            gram = gram_matrix(full)
            weights, accepted, distances = agreement_weights(gram, 2.0)
            aggregate = weights @ full
        out[mode] = dict(gram=gram, aggregate=aggregate, bytes=dict(counter.bytes))
    torch.save(out, f"{outdir}/rank{rank}.pt")
    shutdown()


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("shards")
    spawn(shard_worker, 3, str(outdir))
    gen = torch.Generator().manual_seed(7)
    everything = torch.randn(3 * SHARD_N_LOCAL, SHARD_P, generator=gen)
    return everything, [torch.load(outdir / f"rank{r}.pt") for r in range(3)]


def test_gram_from_shards_equals_gram_of_stacked_gradients(shard_run):
    everything, runs = shard_run
    expected = gram_matrix(everything)
    weights, _, _ = agreement_weights(expected, 2.0)
    shard = -(-SHARD_P // 3)  # 334: the last shard holds 333 columns and one zero of padding
    padded = nn.functional.pad(everything, (0, 3 * shard - SHARD_P))
    for r, run in enumerate(runs):
        assert run["cols"] == (r * shard, (r + 1) * shard)
        assert torch.equal(run["shards"], padded[:, r * shard : (r + 1) * shard])
        for mode in ("gram", "allgather"):
            assert torch.allclose(run[mode]["gram"], expected, rtol=1e-5, atol=1e-3), mode
            assert torch.equal(run[mode]["gram"], runs[0][mode]["gram"])  # identical on every rank
            assert run[mode]["aggregate"].shape == (SHARD_P,)
            assert torch.allclose(run[mode]["aggregate"], weights @ everything, atol=1e-5), mode


def test_bytes_per_rank(shard_run):
    _, runs = shard_run
    k, p, n_local = 3, SHARD_P, SHARD_N_LOCAL
    gram_bytes = runs[0]["gram"]["bytes"]
    allgather_bytes = runs[0]["allgather"]["bytes"]
    # Gram-shard: all-to-all of n_local gradients + all-gather of one aggregate ~ one ring all-reduce
    ring = (k - 1) / k * p * 4 * (n_local + 1)
    assert gram_bytes["gradients"] == pytest.approx(ring, rel=0.01)
    assert gram_bytes["gram"] == pytest.approx(2 * (k - 1) / k * (k * n_local) ** 2 * 4, rel=0.01)
    # all-gather: every full gradient goes to every other rank
    assert allgather_bytes == {"gradients": (k - 1) * n_local * p * 4}
    assert gram_bytes["gradients"] < 0.6 * allgather_bytes["gradients"]


def stepper_bytes_worker(rank, world_size, port, outdir):
    join(rank, world_size, port)
    model = make_model()
    stepper = DistributedGAFStep(model, make_optimizer(model), nn.CrossEntropyLoss(), 2.0)  # every step taken
    xs, ys = global_batches(world_size, 3)
    for s in range(2):
        stepper(local_slice(xs[s], rank, world_size), local_slice(ys[s], rank, world_size))
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    torch.save((stepper.counter.steps, dict(stepper.counter.bytes), stepper.size, bn_channels), f"{outdir}/rank{rank}.pt")
    shutdown()


@pytest.mark.parametrize("world_size", [2, 4])
def test_stepper_sends_about_one_all_reduce_per_step(world_size, tmp_path):
    spawn(stepper_bytes_worker, world_size, str(tmp_path))
    steps, counted, p, bn_channels = torch.load(tmp_path / "rank0.pt")
    k = world_size
    assert steps == 2
    assert counted["gradients"] / steps == pytest.approx(2 * (k - 1) / k * p * 4, rel=0.01)
    # the rest is small and independent of P: the k x k Gram and two metrics (ring
    # all-reduces) and every rank's running mean and var (all-gather, fp32)
    assert counted["gram"] / steps == pytest.approx(2 * (k - 1) / k * k * k * 4, abs=1)
    assert counted["metrics"] / steps == pytest.approx(2 * (k - 1) / k * 2 * 4, abs=1)
    assert counted["batchnorm"] / steps == (k - 1) * 2 * bn_channels * 4


# --- drift, environment, sampling -----------------------------------------------------


def drift_worker(rank, world_size, port, outdir):
    join(rank, world_size, port)
    model = make_model()
    check_replicas(model)  # identical replicas pass
    for bad, tensor in ((2, model[0].weight), (0, model[1].running_var)):  # a parameter, then a buffer
        with torch.no_grad():
            if rank == bad:
                tensor[0] += 1e-3
        try:
            check_replicas(model)
            message = None
        except ReplicaDriftError as e:
            message = str(e)
        with open(f"{outdir}/rank{rank}_bad{bad}.txt", "w") as f:
            f.write(repr(message))
        model.load_state_dict(make_model().state_dict())
    check_replicas(model)  # healed
    shutdown()


def test_drift_on_a_perturbed_rank_is_detected_and_named(tmp_path):
    spawn(drift_worker, 3, str(tmp_path))
    for r in range(3):  # every rank raises, so none hangs in the next collective
        message = (tmp_path / f"rank{r}_bad2.txt").read_text()
        assert "rank(s) [2] differ from rank(s) [0, 1]" in message, message
        assert "'0.weight'" in message
        message = (tmp_path / f"rank{r}_bad0.txt").read_text()  # the majority is the reference
        assert "rank(s) [0] differ from rank(s) [1, 2]" in message, message
        assert "'1.running_var'" in message


def test_init_from_env_without_torchrun_says_how_to_launch(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        init_from_env()
    assert not dist.is_initialized()


def test_init_from_env_takes_the_submitit_environment_on_slurm(monkeypatch):
    """Under the submitit launcher, submitit's TorchDistributedEnvironment supplies the variables."""
    import sys
    import types

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    port = free_port()

    class FakeTorchDistributedEnvironment:  # what submitit.helpers exports, for one task
        def export(self, set_cuda_visible_devices=True):
            assert not set_cuda_visible_devices  # we pick the GPU by LOCAL_RANK ourselves
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            return self

    helpers = types.ModuleType("submitit.helpers")
    helpers.TorchDistributedEnvironment = FakeTorchDistributedEnvironment
    monkeypatch.setitem(sys.modules, "submitit", types.ModuleType("submitit"))
    monkeypatch.setitem(sys.modules, "submitit.helpers", helpers)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    try:
        assert init_from_env("gloo") == (0, 1, 0, torch.device("cpu"))
        assert dist.get_world_size() == 1
    finally:
        shutdown()
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(var, None)


def test_local_slice_takes_rank_rows_and_rejects_uneven_n():
    indices = torch.arange(24).view(6, 4)
    parts = [local_slice(indices, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), indices)  # rank order is microbatch order
    assert torch.equal(parts[1], indices[2:4])
    with pytest.raises(ValueError, match="n=6.*world size 4"):
        local_slice(indices, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        local_slice(indices, 3, 3)


def test_init_from_env_names_non_integer_ranks(monkeypatch):
    for var, value in {"RANK": "zero", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29511"}.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match="must be integers.*'RANK': 'zero'"):
        init_from_env()
    assert not dist.is_initialized()
