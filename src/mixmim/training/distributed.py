"""torchrun integration: process group from the environment, DDP or FSDP wrapping, small collectives.

``torchrun --nproc_per_node N -m mixmim pretrain ...`` (or ``--nnodes``/``--rdzv-endpoint`` for many
machines) sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_request: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU) and pick the device."""
    info = DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))
    if device_request == "auto":
        device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(device_request)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", info.local_rank)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"config key 'train.device': {device_request!r} asked for CUDA but no GPU is visible")
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _OWNED.append(True)
    return info, device


_OWNED: list[bool] = []  # process groups setup() created: teardown() destroys only those


def teardown() -> None:
    """Leave the process group if :func:`setup` joined it (one a caller created stays, for its next run)."""
    if _OWNED and dist.is_initialized():
        _OWNED.pop()
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, device: torch.device, mode: str = "ddp",
         blocks: list[nn.Module] | None = None, param_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP (every rank holds the model) or FSDP2: ``blocks`` (the task's repeated blocks: the
    encoder's and the decoder's, from the method's or classifier's ``repeated_blocks()``) sharded one by
    one, the rest (patch embeddings, merging, norms, positions, heads) in the root's unit (for L/H).
    ``param_dtype`` (the run's bf16): FSDP gathers parameters in it and reduces gradients in float32
    (torchtitan's policy; without one, both move in float32: twice the traffic of a bf16 run)."""
    if not info.enabled:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # MixedPrecisionPolicy() (no dtypes) is FSDP's default: parameters and gradients as they are.
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for module in blocks or []:  # blocks do not nest, so the order does not matter
            fully_shard(module, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_state_dict(model: nn.Module, mode: str) -> dict:
    """The whole model's weights on the CPU, on every rank (FSDP gathers the shards)."""
    if mode == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def all_mean(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on some rank (ranks must agree before backward)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, mode: str) -> dict:
    """Optimiser state that loads at any world size (FSDP: gathered to full tensors)."""
    if mode == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_states(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                optim_state: dict | None, mode: str) -> None:
    if mode == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=options)
        if optimizer is not None and optim_state is not None:
            set_optimizer_state_dict(model, optimizer, optim_state, options=options)
        return
    unwrap(model).load_state_dict(model_state, strict=True)
    if optimizer is not None and optim_state is not None:
        optimizer.load_state_dict(optim_state)
