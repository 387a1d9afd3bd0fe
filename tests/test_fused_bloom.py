"""support/fused_bloom.py against transformers' own eager BLOOM, the reference: the same weights (a deep copy), the same
random adapter, the same batch. Float32 logits and LoRA gradients to 1e-5, with left and right padding (the padding
mask is part of the attention's additive mask) and in training mode; the KV cache of generation; bf16 autocast
losses within 1 %; parameter names (so adapters and checkpoints) unchanged. Eager BLOOM's softmax is float32 even
for a float64 model, so float64 is checked against the attention's formula written out instead (1e-12).
"""

import copy

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from lora_model import LoraConfig, LoraModelForCasualLM
from support import fused_bloom
from support.fused_bloom import SdpaBloomAttention, TanhGelu, use_fused_modules
from support.token_loss import next_token_labels, sum_token_loss


@pytest.fixture(autouse=True, params=["sdpa", "explicit"])
def attention_path(request, monkeypatch):
    """Every test runs both ways the fused attention computes: F.scaled_dot_product_attention, and on a CPU below
    CPU_SDPA_MIN_LENGTH keys the explicit baddbmm / softmax / bmm."""
    monkeypatch.setattr(fused_bloom, "CPU_SDPA_MIN_LENGTH", 0 if request.param == "sdpa" else 10**9)
    return request.param


CONFIG = dict(vocab_size=256, hidden_size=64, n_layer=3, n_head=4,  # head_dim 16: several heads, as BLOOM
              initializer_range=0.2)  # activations of order 1, where the GELU approximations differ


def twins(dtype=torch.float32, lora_dropout=0.0, **overrides):
    """(eager, fused): the same random BLOOM with the same random LoRA adapter on query_key_value and dense."""
    torch.manual_seed(0)
    base = BloomForCausalLM(BloomConfig(**{**CONFIG, **overrides})).to(dtype)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=["query_key_value", "dense"],
                        init_lora_weights=False)
    eager = LoraModelForCasualLM(copy.deepcopy(base), config)
    fused = copy.deepcopy(eager)
    assert use_fused_modules(fused) == CONFIG["n_layer"]
    return eager, fused


def padded_batch(side: str, vocab: int = CONFIG["vocab_size"]) -> dict:
    """Three rows of 10 tokens, two of them padded (3 and 6 pads) on `side`."""
    ids = torch.randint(0, vocab, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, pads in ((1, 3), (2, 6)):
        if side == "left":
            mask[row, :pads] = 0
        else:
            mask[row, -pads:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def loss_and_lora_grads(model, batch, autocast_dtype=None):
    model.train()
    model.zero_grad()
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    loss = sum_token_loss(logits, next_token_labels(batch))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_and_lora_gradients_equal_eager_bloom(side, tolerance=1e-5):
    eager, fused = twins()
    batch = padded_batch(side)
    logits, loss, grads = loss_and_lora_grads(eager, batch)
    fused_logits, fused_loss, fused_grads = loss_and_lora_grads(fused, batch)
    real = batch["attention_mask"].bool()  # a pad position's output is never used (nor is it the same in eager)
    assert (fused_logits - logits)[real].abs().max() <= tolerance
    assert (fused_loss - loss).abs() <= tolerance * loss.abs()
    assert grads.keys() == fused_grads.keys() and len(grads) == 4 * CONFIG["n_layer"]
    for name, grad in grads.items():
        assert (fused_grads[name] - grad).abs().max() <= tolerance * max(1.0, grad.abs().max()), name


def test_float64_attention_is_softmax_of_scores_plus_alibi_plus_mask_times_values():
    _, fused = twins(torch.float64)
    batch = padded_batch("right")
    captured = {}
    attention = fused.model.transformer.h[1].self_attention
    attention.register_forward_hook(  # BloomBlock passes hidden_states and residual by position
        lambda module, args, kwargs, out: captured.update(kwargs, hidden_states=args[0], residual=args[1],
                                                          out=out[0]), with_kwargs=True)
    fused.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden, alibi, mask = captured["hidden_states"], captured["alibi"], captured["attention_mask"]
    heads, (b, t, width) = CONFIG["n_head"], hidden.shape
    with torch.no_grad():
        q, k, v = attention.query_key_value(hidden).view(b, t, heads, 3, width // heads).permute(3, 0, 2, 1, 4)
        scores = q @ k.transpose(-1, -2) / (width // heads) ** 0.5 + alibi.view(b, heads, 1, t) + mask
        expected = captured["residual"] + attention.dense((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))
    real = batch["attention_mask"].bool()
    assert (captured["out"] - expected)[real].abs().max() <= 1e-12


def test_the_swap_keeps_every_parameter_and_its_name():
    eager, fused = twins()
    assert [(n, p.shape) for n, p in eager.named_parameters()] == [(n, p.shape) for n, p in fused.named_parameters()]
    assert eager.state_dict().keys() == fused.state_dict().keys()
    blocks = fused.model.transformer.h
    assert all(isinstance(b.self_attention, SdpaBloomAttention) and isinstance(b.mlp.gelu_impl, TanhGelu)
               for b in blocks)
    # the swapped modules hold the loaded layers themselves, not copies
    model = copy.deepcopy(eager)
    block = model.model.transformer.h[0]
    layers = block.self_attention.query_key_value, block.self_attention.dense
    use_fused_modules(model)
    assert (block.self_attention.query_key_value, block.self_attention.dense) == layers


def test_greedy_generation_with_the_kv_cache_equals_eager():
    eager, fused = twins()
    prompt = padded_batch("left")
    outputs = [model.eval().model.generate(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"],
                                           max_new_tokens=8, do_sample=False, pad_token_id=0)
               for model in (eager, fused)]
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("side", ["left", "right"])  # left: whole rows of masked keys, which must not turn NaN
def test_bf16_autocast_loss_and_gradients_are_finite_and_the_loss_within_one_percent_of_eager(side):
    eager, fused = twins()
    batch = padded_batch(side)
    _, loss, _ = loss_and_lora_grads(eager, batch, torch.bfloat16)
    _, fused_loss, grads = loss_and_lora_grads(fused, batch, torch.bfloat16)
    assert (fused_loss - loss).abs() <= 0.01 * loss.abs()
    assert all(torch.isfinite(grad).all() for grad in grads.values())


def test_a_half_precision_mask_with_minus_inf_rows_gives_finite_attention():
    """FSDP's fp16 policy casts the float32 mask to fp16, where its minimum is -inf; a padding row masked whole must
    still come out finite (0 * NaN in the next matmul would spread NaN to every row)."""
    _, fused = twins()
    attention = fused.model.transformer.h[0].self_attention
    query, key, value = (torch.randn(1, CONFIG["n_head"], 4, 16, dtype=torch.float16) for _ in range(3))
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float16)
    mask[..., 0, :] = -torch.inf
    alibi = torch.zeros(CONFIG["n_head"], 1, 4, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.float16):
        out = attention._eager_attention(query, key, value, alibi, mask, dropout=0.0)
    assert torch.isfinite(out).all()


def test_attention_dropout_is_applied_in_training_only():
    _, fused = twins(attention_dropout=0.5)
    batch = padded_batch("right")
    fused.eval()
    with torch.no_grad():
        first, second = (fused(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                         for _ in range(2))
    assert torch.equal(first, second)
    fused.train()
    with torch.no_grad():
        first, second = (fused(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                         for _ in range(2))
    assert not torch.equal(first, second)


def test_other_architectures_are_left_as_they_are():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    before = [type(m) for m in model.modules()]
    assert use_fused_modules(model) == 0
    assert [type(m) for m in model.modules()] == before
