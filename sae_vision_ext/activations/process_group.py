"""The process group of a multi-process job: which rank this process is, and starting local jobs.

Shared by the distributed activation cache (``activations.distributed_cache``) and
data-parallel training (``training.distributed``): torchrun's environment variables in, a
:class:`DistributedContext` out; :func:`spawn_local` starts N local processes without torchrun.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["DistributedContext", "current_context", "init_distributed", "destroy_distributed",
           "find_free_port", "spawn_local"]




@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """``cuda:<local_rank>`` under NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def current_context() -> DistributedContext:
    """The context of the initialised default process group, or a single-process context."""
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
            backend=str(dist.get_backend()),
        )
    return DistributedContext()


def init_distributed(backend: str | None = None) -> DistributedContext:
    """Join the job started by ``torchrun`` (env ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).

    Without those variables (a plain ``python`` run) nothing is initialised and a single-process context is
    returned, so the same script runs with and without torchrun. ``backend`` defaults to NCCL when CUDA is
    available and gloo otherwise.
    """
    if dist.is_initialized():
        return current_context()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return current_context()


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _spawned_entry(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, backend: str, args: tuple
) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ and Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback: no dependence on the host's network setup
    context = init_distributed(backend)
    try:
        fn(context, *args)
    finally:
        destroy_distributed()


def spawn_local(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    backend: str = "gloo",
    start_method: str = "spawn",
) -> None:
    """Run ``fn(context, *args)`` in ``world_size`` local processes joined in one process group (loopback).

    The torchrun-free way to start a small job from Python. ``fn`` must be picklable (module level) under the
    ``spawn`` start method; ``fork`` skips re-importing torch and SAELens in every child (CPU only). Results
    travel through files; a failure in any rank raises here.
    """
    port = find_free_port()
    mp.start_processes(
        _spawned_entry,
        args=(fn, world_size, port, backend, tuple(args)),
        nprocs=world_size,
        join=True,
        start_method=start_method,
    )
