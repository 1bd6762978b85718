"""Data parallelism under torchrun: gloo on CPU, NCCL on GPU. A single process needs none of it."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return world()


def local_device(device: str) -> str:
    """Under torchrun with CUDA, 'auto' means this rank's own GPU."""
    if device == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor across ranks in place (identity in a single process). NCCL reduces only CUDA tensors, so a CPU
    tensor travels through this rank's GPU and back."""
    if world()[1] > 1:
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            on_gpu = t.to(f"cuda:{torch.cuda.current_device()}")
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (gloo aborts at exit if it is still up)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
