"""BLOOM's attention and GELU on PyTorch's fused kernels, swapped in for transformers' eager
modules.

transformers' BLOOM has only an eager attention: `baddbmm` of the scores with ALiBi, the padding
mask added, a float32 softmax over a materialised batch x heads x seq x seq tensor, a cast back,
then `bmm`; and its GELU is nine elementwise operations forward and backward, each a pass over the
MLP's widest activation. On a CPU those memory-bound passes, not the matrix multiplications, took
most of a training step (bench/bench_vs_hf_trainer.py). Here the attention is one
`F.scaled_dot_product_attention` call with ALiBi and the padding mask as its additive mask, and the
GELU is `F.gelu(approximate="tanh")`, the same formula in one kernel each way.

The swap works like lora_model's injection of LoRA layers: each block's module is replaced by one of
ours holding the same weights under the same names (state dicts, adapters and checkpoints are
unchanged). The numbers are the eager modules' up to rounding: tests/test_fused_bloom.py holds
logits and LoRA gradients to 1e-5 in float32, padding and dropout-free training included.

Packed rows (PACKING=true, packing.py) reach the attention as position ids that restart at 0 for
each example, with no attention mask: BloomModel itself ignores position ids, so a hook on it hands
them to the attention, which then builds ALiBi from each token's position inside its example and a
block-diagonal causal mask (`packed_alibi_and_mask`). On a CPU it goes one step further and computes
each example's attention on its own (`_per_example_attention`): a row's attention under the
block-diagonal mask computes the whole row's square, of which a row of two Alpaca examples uses
about half.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


# Below this many keys a CPU computes the attention as eager BLOOM does: PyTorch's CPU flash kernel
# takes a mask, but for short sequences its backward pass is slower there.
CPU_SDPA_MIN_LENGTH = 200

# Where packed rows' attention is computed example by example (`_per_example_attention`) rather than
# row by row under the block-diagonal mask: the CPU, where it was measured faster (docs/packing.md);
# a GPU keeps one SDPA call per layer (a call per example would be a launch per example per layer).
PER_EXAMPLE_ATTENTION_DEVICES = ("cpu",)


class TanhGelu(nn.Module):
    """BLOOM's GELU, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), as one fused kernel forward
    and backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class SdpaBloomAttention(nn.Module):
    """transformers' BloomAttention computed by `F.scaled_dot_product_attention`, on the loaded
    module's layers.

    Eager BLOOM computes softmax(beta * alibi + q k^T / sqrt(d) + mask) v with beta = 1; SDPA
    computes softmax(q k^T * scale + bias) v, so the bias is alibi + mask, built once per forward
    pass and shared by every layer (all layers receive the same alibi and mask tensors). Attention
    weights are not returned (SDPA never forms them): with `output_attentions=True` the caller gets
    None, as from transformers' own SDPA attentions.
    """

    def __init__(self, eager: nn.Module, bias_cache: dict):
        super().__init__()
        self.num_heads, self.head_dim = eager.num_heads, eager.head_dim
        self.hidden_dropout, self.layer_idx = eager.hidden_dropout, eager.layer_idx
        self.scale = eager.inv_norm_factor
        # The same child names as BloomAttention, so parameter names (and LoRA keys) do not change.
        self.query_key_value, self.dense, self.attention_dropout = (eager.query_key_value,
                                                                    eager.dense,
                                                                    eager.attention_dropout)
        self._bias_cache = bias_cache

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor, alibi: torch.Tensor,
                attention_mask: torch.Tensor | None, layer_past=None, use_cache: bool = False,
                output_attentions: bool = False, **kwargs):
        batch, q_length, _ = hidden_states.shape
        fused_qkv = self.query_key_value(hidden_states).view(batch, q_length, self.num_heads, 3,
                                                             self.head_dim)
        # unbind, not three slices: its backward is one stack instead of three zero-filled copies
        # added together batch x heads x seq x dim
        query, key, value = (t.transpose(1, 2) for t in fused_qkv.unbind(3))
        if layer_past is not None:
            key, value = layer_past.update(key, value, self.layer_idx)
        packed = self._packed_rows(alibi, batch, q_length)
        dropout = self.attention_dropout.p if self.training else 0.0
        if packed is not None and query.device.type in PER_EXAMPLE_ATTENTION_DEVICES:
            context = self._per_example_attention(fused_qkv, packed, dropout)
            return self._output(context.view(batch, q_length, -1), residual), None
        if packed is not None:
            alibi, attention_mask = packed.alibi, packed.mask
        if query.device.type == "cpu" and key.shape[2] < CPU_SDPA_MIN_LENGTH:
            context = self._eager_attention(query, key, value, alibi, attention_mask, dropout)
        else:
            bias = self._attention_bias(alibi, attention_mask, batch, q_length, key.shape[2],
                                        query.dtype)
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias,
                                                     dropout_p=dropout, scale=self.scale)
        return self._output(context.transpose(1, 2).reshape(batch, q_length,
                                                            self.num_heads * self.head_dim),
                            residual), None

    def _output(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The output projection of the heads' contexts (batch x seq x hidden), its dropout and the
        residual."""
        return residual + F.dropout(self.dense(context), p=self.hidden_dropout,
                                    training=self.training)

    def _per_example_attention(self, fused_qkv: torch.Tensor, packed: PackedRows,
                               dropout: float) -> torch.Tensor:
        """Packed rows' attention one example at a time, as the example alone in a row computes it:
        its causal square with ALiBi from its first token, the explicit path below
        CPU_SDPA_MIN_LENGTH tokens, SDPA from there. The rows' tokens are split into their examples
        (`packed.lengths`, the pads after a row's last example one more) and the contexts joined
        again: (batch * seq) x heads x dim."""
        contexts = []
        for example in fused_qkv.flatten(0, 1).split(packed.lengths):
            length = example.shape[0]
            # each heads x length x dim, with a batch of one in front
            query, key, value = (t.transpose(0, 1)[None] for t in example.unbind(2))
            alibi = packed.example_alibi[:, :, :length]
            if length < CPU_SDPA_MIN_LENGTH:
                context = self._eager_attention(query, key, value, alibi, None, dropout)
            else:
                bias = packed.example_biases.get((length, query.dtype))
                if bias is None:
                    bias = attention_bias(alibi.reshape(1, self.num_heads, 1, length), None, length,
                                          length, query.dtype)
                    packed.example_biases[length, query.dtype] = bias
                context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias,
                                                         dropout_p=dropout, scale=self.scale)
            contexts.append(context[0].transpose(0, 1))
        return torch.cat(contexts)

    def _eager_attention(self, query, key, value, alibi, mask, dropout: float) -> torch.Tensor:
        """Eager BLOOM's arithmetic (alibi.baddbmm, the mask added in its own dtype, a float32
        softmax, bmm) on the unbound q, k, v: for short sequences on a CPU, where PyTorch's flash
        kernel with a mask has a slow backward pass. The mask is added after the matmul, as eager
        does: added in bf16, its large negative values would overflow to -inf, and a padding row
            with every key masked would turn NaN."""
        batch, heads, q_length, dim = query.shape
        kv_length = key.shape[2]
        scores = alibi.baddbmm(query.reshape(-1, q_length, dim),
                               key.reshape(-1, kv_length, dim).transpose(1, 2),
                               alpha=self.scale).view(batch, heads, q_length, kv_length)
        if mask is None:
            mask = torch.ones(q_length, kv_length, dtype=torch.bool,
                              device=query.device).tril(kv_length - q_length)
        wide = torch.promote_types(scores.dtype, torch.float32)
        if mask.dtype == torch.bool:
            scores = scores.to(wide).masked_fill(~mask, torch.finfo(wide).min)
        # in `wide` (FSDP's half-precision policy hands the mask over in fp16, where its minimum
        # became -inf)
        else:
            scores = scores + mask.to(wide).clamp_min(torch.finfo(wide).min)
        probs = F.dropout(F.softmax(scores, dim=-1, dtype=wide).to(value.dtype), dropout,
                          self.training)
        return torch.bmm(probs.view(-1, q_length, kv_length),
                         value.reshape(-1, kv_length, dim)).view(
            batch, heads, q_length, dim)

    def _packed_rows(self, alibi: torch.Tensor, batch: int, q_length: int) -> PackedRows | None:
        """For a packed forward pass (position ids recorded by `record_packed_positions`), the
        `PackedRows` of its position ids, built for the first layer and reused by the others (and by
        activation checkpointing's recomputation, which hands back the same alibi); None
        otherwise."""
        positions = self._bias_cache.get("position_ids")
        if positions is None or positions.shape != (batch, q_length):
            return None
        cached = self._bias_cache.get("packed")
        if cached is not None and cached[0] is positions and cached[1] is alibi:
            return cached[2]
        packed = PackedRows(positions, self.num_heads, alibi.dtype)
        self._bias_cache["packed"] = (positions, alibi, packed)
        return packed

    def _attention_bias(self, alibi: torch.Tensor, mask: torch.Tensor | None, batch: int,
                        q_length: int, kv_length: int, dtype: torch.dtype) -> torch.Tensor:
        """`attention_bias` of the batch, computed for the first layer and reused by the
        others."""
        cached = self._bias_cache.get("key")
        if cached is not None and cached[0] is alibi and cached[1] is mask and cached[2] == dtype:
            return self._bias_cache["bias"]
        bias = attention_bias(alibi.view(batch, self.num_heads, 1, kv_length), mask, q_length,
                              kv_length, dtype)
        self._bias_cache.update(key=(alibi, mask, dtype), bias=bias)
        return bias


def attention_bias(alibi: torch.Tensor, mask: torch.Tensor | None, q_length: int, kv_length: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """SDPA's additive mask: alibi (batch x heads x 1 x kv) plus the 4-D mask (additive or boolean;
    None: causal), in `dtype` as eager's autocast baddbmm rounds alibi."""
    bias = alibi.to(dtype).to(torch.promote_types(dtype, torch.float32))
    if mask is None:
        mask = torch.ones(q_length, kv_length, dtype=torch.bool,
                          device=alibi.device).tril(kv_length - q_length)
    if mask.dtype == torch.bool:
        bias = bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
    else:
        bias = bias + mask
    # Clamped before the cast: fp32's minimum is -inf in fp16, and a row with every key masked (a
    # left pad) would turn NaN in SDPA; eager's path clamps in float32 (above) for the same reason.
    return bias.clamp_min(torch.finfo(dtype).min).to(dtype)


class PackedRows:
    """What the attention needs of a packed forward pass's `position_ids` (batch x T, restarting at
    0 for each example), each built on first use: for whole rows (one SDPA call per layer) ALiBi and
    the block-diagonal mask of `packed_alibi_and_mask`; for `_per_example_attention` the examples'
    lengths in the order of the rows' tokens, and ALiBi from position 0 (heads x 1 x T), of which
    an example takes its first tokens."""

    def __init__(self, positions: torch.Tensor, num_heads: int, dtype: torch.dtype):
        self.positions, self.num_heads, self.dtype = positions, num_heads, dtype
        self.example_biases: dict = {}  # SDPA's mask for an example of a length, in a dtype

    @functools.cached_property
    def _whole_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return packed_alibi_and_mask(self.positions, self.num_heads, self.dtype)

    @property
    def alibi(self) -> torch.Tensor:
        return self._whole_rows[0]

    @property
    def mask(self) -> torch.Tensor:
        return self._whole_rows[1]

    @functools.cached_property
    def lengths(self) -> list[int]:
        starts = (self.positions.flatten() == 0).nonzero().squeeze(1)
        ends = torch.cat([starts[1:], starts.new_tensor([self.positions.numel()])])
        return (ends - starts).tolist()

    @functools.cached_property
    def example_alibi(self) -> torch.Tensor:
        from_zero = torch.arange(self.positions.shape[1], device=self.positions.device)
        return alibi_of_positions(from_zero[None], self.num_heads, self.dtype)


def packed_alibi_and_mask(position_ids: torch.Tensor, num_heads: int, dtype: torch.dtype):
    """ALiBi and the causal mask of packed rows: `position_ids` (batch x T) restart at 0 for each
    example.

    transformers' BLOOM computes ALiBi as slope x (the key's position among the row's real tokens),
    in float32, then casts it to the hidden states' dtype; here the position is the key's inside its
    example, so each example gets exactly its unpacked values. The mask (batch x 1 x T x T, boolean)
    lets a query see the keys of its own example up to itself.

    Returns:
        (alibi of shape (batch * heads, 1, T) in `dtype`, mask).
    """
    length = position_ids.shape[1]
    alibi = alibi_of_positions(position_ids, num_heads, dtype)
    sequence = (position_ids == 0).cumsum(-1)
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    mask = (sequence[:, :, None] == sequence[:, None, :]) & causal
    return alibi, mask[:, None]


def alibi_of_positions(position_ids: torch.Tensor, num_heads: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """ALiBi as transformers' BLOOM computes it (slope x position, in float32, then cast to
    `dtype`), from `position_ids` (batch x T): (batch * heads) x 1 x T."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    batch, length = position_ids.shape
    slopes = _get_alibi_slopes(num_heads, position_ids.device)
    return (slopes[None, :, None] * position_ids[:, None, :]).reshape(batch * num_heads, 1,
                                                                      length).to(dtype)


def record_packed_positions(module: nn.Module, args, kwargs) -> None:
    """A forward pre-hook for BloomModel (and BloomForCausalLM, which does not pass position ids on
    to it): packed rows' position ids (passed with no attention mask and no cache, the rule
    transformers' masking_utils uses for other models) go to the attention modules through the
    model's bias cache; otherwise None. The cache is an attribute of the module, not captured by the
    hook, so that a deep copy of the model gets its own."""
    cache = module.fused_bias_cache
    positions = kwargs.get("position_ids")
    if not (positions is not None and kwargs.get("attention_mask") is None
            and kwargs.get("past_key_values") is None):
        positions = None
    if hasattr(module, "transformer"):  # the causal LM around BloomModel: its hook comes next
        cache["outer_position_ids"] = positions
    else:
        outer_positions = cache.pop("outer_position_ids", None)
        cache["position_ids"] = positions if positions is not None else outer_positions


def use_fused_modules(model: nn.Module) -> int:
    """Swap every BLOOM block's attention and GELU in `model` (a base model or one wrapped by LoRA)
    for the fused ones above; returns how many blocks were swapped (0 for other architectures, which
    keep their own)."""
    from transformers.models.bloom.modeling_bloom import (BloomAttention, BloomForCausalLM,
                                                          BloomGelu, BloomModel)

    # one per model: its blocks all see the same alibi and mask in a forward pass
    bias_cache: dict = {}
    swapped = 0
    for module in list(model.modules()):
        if isinstance(module, (BloomModel, BloomForCausalLM)) and not hasattr(module,
                                                                              "fused_bias_cache"):
            module.fused_bias_cache = bias_cache
            module.register_forward_pre_hook(record_packed_positions, with_kwargs=True)
        attention = getattr(module, "self_attention", None)
        if isinstance(attention,
                      BloomAttention) and not (attention.pretraining_tp > 1
                                               and attention.slow_but_exact):
            module.self_attention = SdpaBloomAttention(attention, bias_cache)
            swapped += 1
        mlp = getattr(module, "mlp", None)
        if isinstance(getattr(mlp, "gelu_impl", None), BloomGelu):
            mlp.gelu_impl = TanhGelu()
    return swapped
