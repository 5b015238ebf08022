"""Data parallelism applied from outside the model, as torchtitan's parallelize step does.

Under `torchrun` (RANK/WORLD_SIZE in the environment) ``init_distributed`` joins the process group (NCCL on CUDA,
gloo on CPU) and ``parallelize`` wraps the model in DistributedDataParallel or shards it with FSDP2
(``fully_shard`` per decoder layer, then the root). Without torchrun every function here is a no-op on a world of
one, so the trainer has a single code path.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn




@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def process_rank() -> int:
    """This process's rank as torchrun announced it, readable before the process group exists."""
    return int(os.environ.get("RANK", 0))


def init_distributed(device: torch.device, timeout_seconds: float = 300.0) -> World:
    """Join torchrun's process group; a world of one without torchrun.

    The timeout bounds every collective, so a rank that dies leaves the others failing instead of hanging.
    """
    if not launched_by_torchrun():
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_seconds))
    return world


def local_device(device: torch.device, world: World) -> torch.device:
    """Each process of a multi-GPU machine drives its own GPU."""
    return torch.device("cuda", world.local_rank) if device.type == "cuda" and world.is_distributed else device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, strategy: str, world: World, device: torch.device) -> nn.Module:
    """Wrap the model for data-parallel training; the model itself is unchanged and reachable as ``unwrap(m)``."""
    if not world.is_distributed:
        return model
    if strategy == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    # Shard block by block, then the root (embedding, final norm, head), so each block's parameters are gathered
    # only while that block runs.
    for block in decoder_blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    from tinyseek.modeling import DecoderLayer

    return [module for module in model.modules() if isinstance(module, DecoderLayer)]


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with nullcontext() if enabled else model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2-sharded module
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def sum_across_ranks(tensors: list[torch.Tensor], world: World) -> None:
    """In-place sum over ranks (the MoE expert counts, so every rank makes the same bias update)."""
    if world.is_distributed:
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def mean_across_ranks(value: float, world: World, device: torch.device) -> float:
    return reduce_scalar(value, dist.ReduceOp.SUM, world, device) / world.size


def max_across_ranks(value: int, world: World, device: torch.device) -> int:
    return int(reduce_scalar(value, dist.ReduceOp.MAX, world, device))


def reduce_scalar(value: float, op, world: World, device: torch.device) -> float:
    if not world.is_distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return float(tensor)


def barrier(world: World) -> None:
    if world.is_distributed:
        dist.barrier()


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, in single-process names, on every rank (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(unwrap(model), options=options)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter names, gathered whole: one format for 1 process, DDP and FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(unwrap(model), optimizer, options=options)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load whole (unsharded) state, as ``full_*_state_dict`` return it, into a plain, DDP or FSDP2 model; under
    FSDP each rank keeps its own shard of it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # A process group is needed to shard a full state; a single process loads it as it is.
    options = StateDictOptions(full_state_dict=dist.is_initialized())
    set_model_state_dict(unwrap(model), model_state, options=options)
    set_optimizer_state_dict(unwrap(model), optimizer, optimizer_state, options=options)
