"""Distributed data parallel (DDP) set-up, in one place: which process this is, the device it
drives, and the few collective operations train.py uses. torchrun starts one process per GPU (or CPU
process group member) and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `DDP=true`
(or `FSDP=true`, fsdp.py) makes train.py join them.

    DDP=true torchrun --standalone --nproc_per_node=2 train.py
        # 2 GPUs (NCCL), or 2 CPU processes (gloo)
    DDP=true torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from support.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank among world_size processes, and the device it drives.
    `distributed`: in torchrun's process group (DDP=true or FSDP=true), so every collective is real;
    then exactly one of `ddp` (each process holds the whole model) and `fsdp` (the model is sharded
    over the processes)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    ddp: bool = False
    fsdp: bool = False

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> DistEnv:
    """Join torchrun's process group when DDP=true or FSDP=true; otherwise pick the single device.
    FSDP=true with one process (torchrun --nproc_per_node=1) runs, sharding nothing; without
    torchrun it is refused, as DDP=true is.

    Raises:
        ConfigError: DDP=true or FSDP=true without torchrun's environment variables, or torchrun's
            processes without either.
    """
    if not (cfg.ddp or cfg.fsdp):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Each process would train alone on all the data and all would write the same
            # OUTPUT_DIR.
            raise ConfigError("DDP is not true but torchrun started "
                              f"WORLD_SIZE={os.environ['WORLD_SIZE']} processes; set DDP=true or "
                              "FSDP=true (or launch one process with `python train.py`)")
        return DistEnv(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    mode = "FSDP" if cfg.fsdp else "DDP"
    missing = [v for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if v not in os.environ]
    if missing:
        raise ConfigError(f"{mode}=true needs torchrun's variables ({', '.join(missing)} unset); "
                          f"launch with `{mode}=true torchrun --standalone --nproc_per_node=2 "
                          "train.py`")
    rank, local_rank, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                               int(os.environ["WORLD_SIZE"]))
    if torch.cuda.is_available():
        # One GPU per process, chosen by LOCAL_RANK; NCCL moves the gradients between them.
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    # env:// rendezvous (MASTER_ADDR/PORT from torchrun). The timeout bounds how long a rank waits
    # for a peer that hangs; long, because rank 0 alone writes checkpoints and each rank may
    # tokenize for minutes first.
    torch_dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                  timeout=datetime.timedelta(seconds=cfg.ddp_timeout),
                                  device_id=device if device.type == "cuda" else None)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device,
                   distributed=True, ddp=not cfg.fsdp, fsdp=cfg.fsdp)


def ddp_model(model: torch.nn.Module, dist: DistEnv) -> DistributedDataParallel:
    """`model` in DDP, after LoRA's injection, so that only the adapter's gradients are all-reduced
    (DDP reduces the parameters that require grad). One GPU per process; on the CPU, no
    device_ids."""
    device_ids = [dist.local_rank] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync_before_forward())


def gradient_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """The context of one micro-batch's forward and backward pass. DDP and FSDP reduce the gradients
    over ranks in the backward pass; without `sync` (every micro-batch of a step but the last) they
    accumulate on each rank
    instead: DDP's no_sync(), FSDP's set_requires_gradient_sync(False)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    elif isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def note(message: str, dist: DistEnv) -> None:
    """A remark that is not an error, printed once (by rank 0)."""
    if dist.is_master:
        print(f"note: {message}", flush=True)


def all_reduce_sum(value: torch.Tensor, dist: DistEnv) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op for one process)."""
    if dist.distributed:
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
    return value


def broadcast_from_master(value, dist: DistEnv):
    """Rank 0's `value` (any picklable object), on every rank: for decisions all ranks must take
    together."""
    if not dist.distributed:
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value, dist: DistEnv) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not dist.distributed:
        return [value]
    values = [None] * dist.world_size
    torch_dist.all_gather_object(values, value)
    return values


def no_buffer_sync_before_forward() -> dict:
    """DDP's option not to broadcast buffers before every forward (they are the same constants on
    every rank). torch 2.13 renamed it; the old name is the only one a notebook's older torch
    knows."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def shutdown_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        # Free the DDP wrapper (left in an exception's frames) before its process group: a gloo
        # group destroyed under a live DDP reducer can deadlock when the reducer is freed later.
        gc.collect()
        torch_dist.destroy_process_group()
