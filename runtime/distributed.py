"""Data parallel with torch.distributed (e.g. Ray Train workers): who this process is, its shard of a batch,
and the collectives the trainers use. Without an initialised process group every helper is the
single-process identity (rank 0 of 1, the whole batch)."""

from __future__ import annotations

import torch
from torch import nn


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_rank() -> bool:
    return not is_distributed() or torch.distributed.get_rank() == 0


def shard_for_rank(tokens: torch.Tensor, what: str = "train.batch_size") -> torch.Tensor:
    """This worker's equal slice of the global batch (data parallel); the whole batch otherwise. `what` names the
    setting that sets the batch's size, for the error when it does not split evenly."""
    if not is_distributed():
        return tokens
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if tokens.shape[0] % world:
        raise ValueError(f"{what} {tokens.shape[0]} is not divisible by {world} data-parallel workers")
    per = tokens.shape[0] // world
    return tokens[rank * per : (rank + 1) * per]


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce mean of gradients: with equal shards this is exactly the global-batch gradient."""
    world = torch.distributed.get_world_size()
    for param in params:
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad)
            param.grad /= world


def collective_device() -> torch.device:
    """Where collectives take their tensors: NCCL (Ray Train's backend for GPU workers) reduces CUDA tensors only."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_scalars(totals: dict) -> dict:
    """Mean of float statistics and sum of counts over workers, so every rank's statistics agree."""
    keys = sorted(totals)
    values = torch.tensor([float(totals[k]) for k in keys], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(values)
    world = torch.distributed.get_world_size()
    return {k: (int(v) if isinstance(totals[k], int) else v / world) for k, v in zip(keys, values.tolist())}


def true_on_any_rank(flags: torch.Tensor) -> torch.Tensor:
    """Logical OR of a bool tensor over ranks."""
    as_bytes = flags.to(torch.uint8)
    torch.distributed.all_reduce(as_bytes, op=torch.distributed.ReduceOp.MAX)
    return as_bytes.bool()


def broadcast_from_main(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (as DDP does at the start)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        torch.distributed.broadcast(tensor.data, src=0)


def wait_for_all_ranks() -> None:
    """A barrier when data parallel (e.g. until rank 0 has written what the others read); nothing otherwise."""
    if is_distributed():
        torch.distributed.barrier()
