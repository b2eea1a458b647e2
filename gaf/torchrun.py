"""torchrun's side of a distributed run: join the process group its environment describes (or a
submitit SLURM job's), say which rank writes, leave, and take this rank's rows of a step.

``gaf.distributed`` re-exports these names; the GAF reductions and steppers live there.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _export_submitit_env() -> bool:
    """Inside a job of the submitit launcher (SLURM), let submitit set torchrun's variables."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return False
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return False
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def init_from_env(backend: str | None = None) -> tuple[int, int, int, torch.device]:
    """Join the process group that ``torchrun`` (or a submitit SLURM job) describes.

    Returns ``(rank, world_size, local_rank, device)``. ``backend`` None picks nccl when
    CUDA is available, else gloo. With nccl the device is ``cuda:LOCAL_RANK`` (or
    ``cuda:0`` where each process sees one GPU) and is made current; with gloo it is
    the CPU. Under the submitit launcher (``hydra/launcher=slurm``) the variables come
    from ``submitit.helpers.TorchDistributedEnvironment``.
    """
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing and _export_submitit_env():
        missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ValueError(
            f"distributed=true needs torchrun's environment, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set. Launch with e.g. "
            "`torchrun --nproc_per_node=2 experiments/train.py distributed=true ...` "
            "(or the submitit launcher on SLURM), or set distributed=false."
        )
    try:
        rank, world_size, local_rank = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        got = {v: os.environ[v] for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        raise ValueError(f"torchrun's RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {got}") from None
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA, which is not available; use backend 'gloo' on CPU")
        count = torch.cuda.device_count()
        if local_rank >= count and count != 1:
            raise ValueError(f"LOCAL_RANK={local_rank} but this process sees {count} GPUs: "
                             "use --nproc_per_node <= the GPU count")
        device = torch.device("cuda", local_rank if local_rank < count else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                device_id=device if backend == "nccl" else None)
    return rank, world_size, local_rank, device


def is_main() -> bool:
    """True on rank 0 (or without a process group): the rank that writes metrics and checkpoints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shutdown() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_slice(global_indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of the global (n, b) microbatch index tensor every rank drew alike.

    Rows [rank * n_local, (rank + 1) * n_local) with n_local = n / world_size, so rank
    order is microbatch order and K ranks see what one process with n microbatches sees.
    """
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    n = len(global_indices)
    if n % world_size:
        raise ValueError(f"the number of microbatches n={n} must be divisible by the world size {world_size}")
    n_local = n // world_size
    return global_indices[rank * n_local : (rank + 1) * n_local]
