"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`) for train.py, in one
place.

    FSDP=true torchrun --standalone --nproc_per_node=2 train.py
        # 2 GPUs (NCCL), or 2 CPU processes (gloo)

Under DDP every process holds the whole base model; under FSDP each holds 1/N of every parameter,
frozen base and adapter alike, and gathers a block's weights only while that block computes. Each
transformer block and the root are their own `fully_shard` unit. Everything else train.py does is
the same as under DDP: the same batches per rank, the same loss weights (FSDP, like DDP, averages
the gradients over ranks), one gradient reduction per optimizer step.

What differs for the code around the model: the parameters are DTensors (each rank's slice of the
whole tensor). The adapter and its AdamW state are gathered whole for a checkpoint
(`full_adapter_state`, `full_optimizer_state`: every rank takes part, rank 0 writes), so checkpoints
are the same plain tensors, in the same layout, as DDP's and a single process's, and each mode
resumes from the others'; on resume every rank keeps its own slice (`load_adapter_weights`,
`load_optimizer_state`). Every forward pass gathers weights from all ranks, so all ranks must run
the same forward passes: evaluation pads the shorter validation shards (`even_validation_shard`) and
agrees on stopping at every batch (`agreed_stop_signal`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.utils.data import Dataset

from support import faults
from support.alpaca_data import IGNORE_INDEX
from support.config import ConfigError
from support.distributed import DistEnv, all_reduce_sum
from support.model_loading import is_norm


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (BloomBlock, LlamaDecoderLayer, GPT2Block, ...): transformers
    lists their class in `_no_split_modules`, the units it never splits across devices.

    Raises:
        ConfigError: the model lists none, so there is nothing to shard block by block.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ConfigError("FSDP=true: cannot find the transformer blocks of "
                          f"{type(model).__name__} (it lists no _no_split_modules); use DDP=true")
    return blocks


def shard_model(model: nn.Module, dist: DistEnv, compute_dtype: torch.dtype | None) -> nn.Module:
    """Shard `model` (the LoRA model, after injection) over all ranks: each transformer block, then
    the root (the embeddings, the final norm and the tied output layer). The model is changed in
    place and returned.

    `compute_dtype` (bf16/fp16 under MIX_PREC_TRAIN, None for fp32) is FSDP's MixedPrecisionPolicy:
    the gathered weights are cast to it (half the traffic and memory of float32 ones), gradients are
    reduced in float32, and the sharded weights, the adapter's gradients and AdamW's state stay in
    their own dtype (LoRA: float32).
    """
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype,
                                  reduce_dtype=compute_dtype and torch.float32)
    # Float32 norms of a half-precision base (model_loading.keep_residual_stream_float32) are units
    # of their own, gathered as they are: the policy above would cast them, and a float32 input
    # meets a half-precision weight.
    for norm in [m for m in model.modules() if is_norm(m)
                 and m.weight.dtype == torch.float32 != compute_dtype]:
        fully_shard(norm, mesh=mesh, mp_policy=MixedPrecisionPolicy(cast_forward_inputs=False))
    for block in transformer_blocks(model.model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every rank if FSDP shards it (a collective: every rank must
    call it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys, whole (gathered under FSDP; every rank must call
    it)."""
    return {key: full_tensor(value) for key, value in model.adapter_state_dict().items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded tensor (AdamW's moments) gathered whole onto the
    CPU: the layout a DDP or single-process checkpoint has (every rank must call it)."""
    state = optimizer.state_dict()
    whole = {index: {name: full_tensor(value).cpu() if isinstance(value, DTensor) else value
                     for name, value in values.items()} for index, values in state["state"].items()}
    return {**state, "state": whole}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state (whole tensors); under FSDP each rank keeps its slice of
    each."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # AdamW's moments have their parameter's shape and are sharded like it; its step count is a
    # scalar.
    sharded = {index: {name: shard_like(value, params[index]) if value.shape == params[index].shape
                       else value
                       for name, value in values.items()}
                       for index, values in state["state"].items()}
    optimizer.load_state_dict({**state, "state": sharded})


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` (whole, the same on every rank) held as `like` is: this rank's slice if `like` is
    sharded."""
    if not isinstance(like, DTensor):
        return tensor
    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements,
                             src_data_rank=None)


def load_adapter_weights(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    """model.load_adapter_weights (its strict checks included) for whole tensors; under FSDP each
    rank copies in its own slice (a whole tensor counts as replicated on every rank, which every
    rank's is)."""
    with implicit_replication():
        model.load_adapter_weights(tensors, source=source)


class PaddedShard(Dataset):
    """A rank's validation examples and, to even the ranks' counts, copies of its first one with no
    label: they run a forward pass like the others and add nothing to the loss or its token
        count."""

    def __init__(self, dataset, indices: list[int], length: int) -> None:
        self.dataset, self.indices, self.length = dataset, indices, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if i < len(self.indices):
            return self.dataset[self.indices[i]]
        example = self.dataset[self.indices[0] if self.indices else 0]
        return {**example, "labels": [IGNORE_INDEX] * len(example["labels"])}


def even_validation_shard(valid_set, dist: DistEnv) -> PaddedShard:
    """This rank's share of the validation set, every `world_size`-th example. Under FSDP a forward
    pass is a collective, so every rank's share is padded to rank 0's count (the largest), with
    label-less examples."""
    indices = list(range(dist.rank, len(valid_set), dist.world_size))
    length = len(range(0, len(valid_set), dist.world_size)) if dist.fsdp else len(indices)
    return PaddedShard(valid_set, indices, length)


def agreed_stop_signal(stop_signal: Callable[[], int], dist: DistEnv) -> Callable[[], int]:
    """`stop_signal` as every rank sees it at once. Under FSDP a rank must not leave the evaluation
    one batch before the others (they would wait for it in the next batch's weight gathering), so
    the ranks agree at every call."""
    if not dist.fsdp:
        return stop_signal

    def agreed() -> int:
        return faults.agreed_signal(*all_reduce_sum(faults.signal_flags(stop_signal(), dist.device),
                                                    dist).tolist())
    return agreed
