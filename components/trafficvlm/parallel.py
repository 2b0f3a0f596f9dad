"""Process group, FSDP2 sharding and activation checkpointing. Knows no model family: the caller names
the block classes to wrap (for Hugging Face models, `model._no_split_modules`).

One code path for every launch: a single process (a CPU or one GPU) still gets a one-rank process group,
so sharding, checkpoint and export code never branch on "distributed or not".

    dist_info = init_distributed()                     # torchrun env, or a one-rank group
    shard_model(model, dist_info, block_classes=["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"],
                checkpointing=True, compile=False)

The wrap order is DESIGN.md's: activation checkpointing, then compile, then `fully_shard` per block,
then the root. On GPU the mixed-precision policy keeps fp32 master weights and optimizer state, computes
in bf16 and reduces gradients in fp32; on CPU everything stays fp32 (gloo has no bf16 reductions worth
having and CPU bf16 matmuls are slow).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto", timeout_s: float = 1800) -> DistInfo:
    """Join torchrun's process group (RANK/WORLD_SIZE in the environment) or make a one-rank group.

    nccl on CUDA, gloo on CPU. `device="auto"` picks CUDA when available."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA device is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kw: dict = dict(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                        device_id=dev if use_cuda else None)
        if "RANK" not in os.environ:  # plain `trafficvlm train`: a group of one on a private port
            kw.update(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        dist.init_process_group(**kw)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def find_blocks(model: nn.Module, class_names: Iterable[str]) -> list[nn.Module]:
    """Every submodule whose class name is in `class_names`, in module order."""
    names = set(class_names)
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: nn.Module, info: DistInfo, *, block_classes: Iterable[str], checkpointing: bool = True,
                compile: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """Checkpoint, compile, then fully_shard each block and the root (in place; returns `model`)."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = find_blocks(model, block_classes)
    if not blocks:
        raise ValueError(f"no submodule of class {sorted(block_classes)} in {type(model).__name__}")
    # The composable checkpoint keeps parameter names unchanged (a wrapper module would rename them and
    # with them every checkpoint key); non-reentrant, so frozen inputs need no requires_grad tricks.
    for block in blocks:
        if checkpointing:
            checkpoint(block)
        if compile:
            block.compile()
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if info.device.type == "cuda" else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root keeps the embeddings, the merger and lm_head; no reshard after forward: backward needs them first.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def all_reduce_sum(value: float | int, info: DistInfo) -> float:
    """Sum a Python number over ranks (on the rank's device: nccl reduces only CUDA tensors)."""
    t = torch.tensor(float(value), dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's Python object on every rank."""
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
