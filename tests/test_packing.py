"""PACKING=true against the unpacked computation, the independent reference.

A packed batch (support/packing.py: best-fit rows, position ids restarting per example, no attention mask) must give
each example the summed loss and the LoRA gradients it gets alone in a padded row: float32, 1e-5 relative, for BLOOM
(fused_bloom's attention, its SDPA and its explicit path), Llama, Qwen2, Mistral and GPT-2 (transformers' own mask from
packed position ids, eager and SDPA attention). With the block-diagonal mask removed (an attention mask of ones,
which turns packing detection off) the same comparison fails by orders of magnitude: the tests are not vacuous.
Also: the packer's rows (every example once, deterministic, within MAX_LENGTH), the collator, the refusal of other
architectures, and fp16 on the SDPA path with fully masked rows (left pads) and packed rows: finite, close to fp32.
"""

import copy
import json
import types

import datasets
import pytest
import torch
from transformers import (
    AutoModelForCausalLM, BloomConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config,
)

from conftest import TINY_BLOOM, one_torch_thread
from lora_model import LoraConfig, LoraModelForCasualLM
from support import fused_bloom
from support.alpaca_data import PadCollator
from support.config import ConfigError, TrainConfig
from support.fused_bloom import use_fused_modules
from support.packing import (
    PackCollator, check_packable, fill, model_inputs, pack_dataset, pack_rows,
)
from support.token_loss import IGNORE_INDEX, next_token_labels

VOCAB = 256
DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
MODELS = {  # name: (config, LoRA targets, the tokenizer's padding side)
    "bloom": (lambda: BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=3, n_head=4, initializer_range=0.2),
              ["query_key_value", "dense"], "left"),
    "llama": (lambda: LlamaConfig(**DECODER), ["q_proj", "v_proj", "o_proj"], "right"),
    "qwen2": (lambda: Qwen2Config(**DECODER), ["q_proj", "v_proj", "o_proj"], "left"),
    "mistral": (lambda: MistralConfig(**DECODER), ["q_proj", "v_proj"], "left"),
    "gpt2": (lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
              ["c_attn", "c_proj"], "right"),
}
MAX_LENGTH = 48
LENGTHS = [17, 5, 30, 2, 11, 23, 9, 40, 3, 14, 26, 7]  # 187 tokens: 4 or 5 rows of 48


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with one_torch_thread():
        yield


def examples(lengths=LENGTHS, seed=0) -> datasets.Dataset:
    """Random token examples; the first few tokens of each carry no label, as a prompt with TRAIN_ON_INPUTS=false."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]
    labels = [[IGNORE_INDEX] * min(2, len(x) - 1) + x[min(2, len(x) - 1):] for x in ids]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "length": list(lengths)})


def lora_model(name: str, attn_implementation: str = "eager") -> LoraModelForCasualLM:
    make_config, targets, _ = MODELS[name]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(make_config(), attn_implementation=attn_implementation)
    model = LoraModelForCasualLM(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  init_lora_weights=False, fan_in_fan_out=name == "gpt2"))
    if name == "bloom":
        assert use_fused_modules(model) == 3
    return model


def summed_losses_and_grads(model, batch: dict, inputs: dict) -> tuple[torch.Tensor, dict]:
    """Each example's summed token loss (from the logits, per segment of a row) and the LoRA gradients of their
    total through train.py's path (model(..., targets=...))."""
    model.train()
    model.zero_grad()
    targets = next_token_labels(batch)
    model(**inputs, use_cache=False, targets=targets).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[:, :-1].double()
    token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                   ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    return token_loss, grads


def per_example_losses_unpacked(model, data: datasets.Dataset, padding_side: str):
    tokenizer = types.SimpleNamespace(pad_token_id=0, padding_side=padding_side, name_or_path="test")
    batch = PadCollator(tokenizer)([data[i] for i in range(len(data))])
    token_loss, grads = summed_losses_and_grads(model, batch, model_inputs(batch))
    return token_loss.sum(1), grads


def per_example_losses_packed(model, data: datasets.Dataset, without_mask: bool = False):
    rows = pack_dataset(data, MAX_LENGTH, seed=0)
    batch = PackCollator(pad_token_id=0, pad_to_multiple_of=8)([rows[i] for i in range(len(rows))])
    inputs = model_inputs(batch)
    if without_mask:  # sabotage: a 2-D mask of ones turns off the packed block-diagonal mask (and fused_bloom's)
        inputs["attention_mask"] = torch.ones_like(batch["input_ids"])
    token_loss, grads = summed_losses_and_grads(model, batch, inputs)
    # Each example's share of its row: its tokens, from where its position ids restart.
    losses = torch.zeros(len(data), dtype=token_loss.dtype)
    for r, row in enumerate(rows):
        start = 0
        for index in pack_rows(data["length"], MAX_LENGTH, seed=0)[r]:
            n = data[index]["length"]
            # targets at start-1 .. start+n-2 predict tokens start .. start+n-1; the first is unlabelled
            losses[index] = token_loss[r, max(start - 1, 0):start + n - 1].sum()
            start += n
        assert start == row["length"]
    return losses, grads


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = [("bloom", "sdpa-path"), ("bloom", "explicit-path"), ("bloom", "sdpa-path-whole-rows"),
         ("bloom", "explicit-path-whole-rows"), ("llama", "eager"), ("llama", "sdpa"), ("qwen2", "eager"),
         ("mistral", "sdpa"), ("gpt2", "eager"), ("gpt2", "sdpa")]


def configure(name: str, variant: str, monkeypatch) -> LoraModelForCasualLM:
    if name == "bloom":
        force_bloom_attention(variant, monkeypatch)
        return lora_model(name)
    return lora_model(name, attn_implementation=variant)


def force_bloom_attention(variant: str, monkeypatch) -> None:
    """fused_bloom picks its path by key length on a CPU, and computes packed rows there example by example: force
    each path, and whole rows (what a GPU computes) with "-whole-rows"."""
    monkeypatch.setattr(fused_bloom, "CPU_SDPA_MIN_LENGTH", 0 if variant.startswith("sdpa-path") else 10**9)
    if variant.endswith("-whole-rows"):
        monkeypatch.setattr(fused_bloom, "PER_EXAMPLE_ATTENTION_DEVICES", ())


@pytest.mark.parametrize("name,variant", CASES)
def test_a_packed_batch_gives_each_example_its_unpacked_loss_and_gradients(name, variant, monkeypatch):
    model = configure(name, variant, monkeypatch)
    data = examples()
    unpacked_losses, unpacked_grads = per_example_losses_unpacked(model, data, MODELS[name][2])
    packed_losses, packed_grads = per_example_losses_packed(model, data)
    assert (unpacked_losses > 0).all()
    assert relative_difference(packed_losses, unpacked_losses) <= 1e-5
    for key, grad in unpacked_grads.items():
        assert grad.abs().sum() > 0, key
        assert relative_difference(packed_grads[key], grad) <= 1e-5, key


@pytest.mark.parametrize("name,variant", [("bloom", "sdpa-path"), ("bloom", "explicit-path"),
                                          ("bloom", "sdpa-path-whole-rows"), ("llama", "sdpa"), ("gpt2", "eager")])
def test_without_the_block_diagonal_mask_the_examples_see_each_other(name, variant, monkeypatch):
    """The sabotage control: the same comparison with the mask removed fails by far more than the tolerance."""
    model = configure(name, variant, monkeypatch)
    data = examples()
    unpacked_losses, unpacked_grads = per_example_losses_unpacked(model, data, MODELS[name][2])
    packed_losses, packed_grads = per_example_losses_packed(model, data, without_mask=True)
    assert relative_difference(packed_losses, unpacked_losses) > 1e-3
    assert max(relative_difference(packed_grads[k], g) for k, g in unpacked_grads.items()) > 1e-2


def test_packed_bloom_with_activation_checkpointing(monkeypatch):
    """GRADIENT_CHECKPOINTING recomputes each block in the backward pass: it must see the packed rows' mask again
    (fused_bloom keeps the forward pass's position ids until the next one)."""
    from support import model_loading

    monkeypatch.setattr(fused_bloom, "CPU_SDPA_MIN_LENGTH", 0)
    model, data = lora_model("bloom"), examples()
    model_loading.enable_activation_checkpointing(model.model, {"use_reentrant": False})
    unpacked_losses, unpacked_grads = per_example_losses_unpacked(model, data, "left")
    packed_losses, packed_grads = per_example_losses_packed(model, data)
    assert relative_difference(packed_losses, unpacked_losses) <= 1e-5
    assert all(relative_difference(packed_grads[k], g) <= 1e-5 for k, g in unpacked_grads.items())


@pytest.mark.slow  # bitsandbytes' 4-bit CPU path: 20 s on a busy 2-core machine
def test_packed_bloom_on_a_4bit_base(monkeypatch):
    """QUANTIZE=4bit: the quantized base, as train.py loads it for an fp32 run, packed as unpacked. It keeps its
    other weights in bf16 (model_loading.quantized_dtypes), so its losses and gradients carry bf16's rounding, which
    depends on the CPU's kernels: on an AMD EPYC with AVX512-BF16 the SDPA path's losses differ by 7.8e-5 example by
    example and 1.2e-4 in whole rows, its gradients by 2.4e-3 (where float32 models give 5e-7, and an AVX2 CPU gave
    losses within 1e-5); with the mask removed the losses differ by 5.4e-2 and the gradients by 0.54."""
    pytest.importorskip("bitsandbytes")
    from support import model_loading

    monkeypatch.setattr(fused_bloom, "CPU_SDPA_MIN_LENGTH", 0)
    torch.manual_seed(0)
    base = model_loading.load_quantized_for_training(str(TINY_BLOOM), torch.device("cpu"), "4bit", None)
    assert use_fused_modules(base) == base.config.n_layer
    model = LoraModelForCasualLM(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"],
                                                  init_lora_weights=False))
    unpacked_losses, unpacked_grads = per_example_losses_unpacked(model, examples(), "left")
    packed_losses, packed_grads = per_example_losses_packed(model, examples())
    assert relative_difference(packed_losses, unpacked_losses) <= 1e-3
    assert all(relative_difference(packed_grads[k], g) <= 1e-2 for k, g in unpacked_grads.items())


def test_packed_bf16_autocast_is_the_unpacked_within_bf16_rounding(monkeypatch):
    """MIX_PREC_TRAIN on a CPU: bf16 autocast, packed and unpacked within bf16's rounding (1 %; the sabotaged
    float32 comparison above is off by far more)."""
    monkeypatch.setattr(fused_bloom, "CPU_SDPA_MIN_LENGTH", 0)
    model, data = lora_model("bloom"), examples()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unpacked_losses, unpacked_grads = per_example_losses_unpacked(model, data, "left")
        packed_losses, packed_grads = per_example_losses_packed(model, data)
    assert relative_difference(packed_losses, unpacked_losses) <= 1e-2
    assert all(relative_difference(packed_grads[k], g) <= 3e-2 for k, g in unpacked_grads.items())


def test_bloom_packed_alibi_equals_the_unpacked_one_example_by_example():
    """ALiBi inside each example: the values transformers' build_alibi_tensor gives the example alone."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    alibi, mask = fused_bloom.packed_alibi_and_mask(positions, 4, torch.float32)
    alone = build_alibi_tensor(torch.ones(1, 4, dtype=torch.long), 4, torch.float32)  # (4, 1, 4)
    assert torch.equal(alibi[:, :, 5:], alone)
    assert torch.equal(alibi[:, :, 3:5], alone[:, :, :2])
    assert mask.shape == (1, 1, 9, 9)
    assert mask[0, 0, 4].tolist() == [False] * 3 + [True, True] + [False] * 4  # its own example, up to itself


# --- the packer and the collator ---

def test_pack_rows_puts_every_example_once_within_max_length_deterministically():
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 257, (500,), generator=g).tolist()
    rows = pack_rows(lengths, 256, seed=7)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    assert rows == pack_rows(lengths, 256, seed=7)
    # Best-fit decreasing needs at most 11/9 OPT + 1 rows; OPT is at least the total over the row size.
    assert len(rows) <= 11 / 9 * sum(lengths) / 256 + 1
    equal = [5] * 6 + [2] * 6  # only ties: the seed decides which examples share a row
    assert pack_rows(equal, 12, seed=0) != pack_rows(equal, 12, seed=1)


def test_pack_rows_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="max_length=4"):
        pack_rows([3, 5], 4, seed=0)


def test_pack_dataset_concatenates_examples_restarts_positions_and_unlabels_first_tokens():
    data = examples([3, 4, 2, 5])
    rows = pack_dataset(data, 7, seed=0)
    assert sum(rows["examples"]) == 4 and sum(rows["length"]) == 14
    assert fill(rows, 7) == 14 / (7 * len(rows))
    seen = []
    for row in rows:
        starts = [t for t, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][t] == IGNORE_INDEX for t in starts)
        bounds = starts + [len(row["input_ids"])]
        seen += [tuple(row["input_ids"][a:b]) for a, b in zip(bounds, bounds[1:])]
        assert row["position_ids"] == [p for a, b in zip(bounds, bounds[1:]) for p in range(b - a)]
    assert sorted(seen) == sorted(tuple(x) for x in data["input_ids"])


def test_pack_collator_pads_on_the_right_as_a_sequence_of_its_own_without_labels():
    rows = pack_dataset(examples([3, 4, 6]), 8, seed=0)
    batch = PackCollator(pad_token_id=1, pad_to_multiple_of=8)([rows[i] for i in range(len(rows))])
    assert batch["input_ids"].shape == (len(rows), 8)
    for i, row in enumerate(rows):
        n = row["length"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (8 - n)
        assert batch["position_ids"][i, n:].tolist() == list(range(8 - n))
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and (batch["input_ids"][i, n:] == 1).all()
    assert model_inputs(batch)["attention_mask"] is None


def test_other_architectures_and_eager_bloom_are_refused_naming_packing():
    check_packable("llama", fused_modules=False)
    with pytest.raises(ConfigError, match="PACKING=true is not supported for model type 'gemma'"):
        check_packable("gemma", fused_modules=True)
    with pytest.raises(ConfigError, match="PACKING=true on BLOOM needs FUSED_MODULES=true"):
        check_packable("bloom", fused_modules=False)


# --- fp16 on the SDPA path ---

@pytest.mark.parametrize("variant", ["sdpa-path", "sdpa-path-whole-rows"])
def test_fp16_sdpa_attention_with_fully_masked_rows_is_finite_and_close_to_float32(variant, monkeypatch):
    """fp32's minimum cast to fp16 is -inf: a left pad's query row, every key masked, would be all -inf in SDPA.
    The bias is clamped to fp16's range; real tokens' logits match float32 to fp16's precision, and LoRA gradients
    are finite (a NaN in a pad row would reach them through the weight gradients). PyTorch's CPU kernels return
    zeros for an all -inf row, where GPU kernels may not: so the bias SDPA receives is checked to be finite too
    (without the clamp it holds -inf). Packed rows on both the CPU's path (example by example) and a GPU's (whole
    rows under the block-diagonal mask, which has fully masked pads too)."""
    force_bloom_attention(variant, monkeypatch)
    model32 = lora_model("bloom")
    model16 = copy.deepcopy(model32).half()
    tokenizer = types.SimpleNamespace(pad_token_id=0, padding_side="left", name_or_path="test")
    data = examples([5, 12, 20])
    left = PadCollator(tokenizer)([data[i] for i in range(3)])
    rows = pack_dataset(data, 24, seed=0)
    packed = PackCollator(0, 8)([rows[i] for i in range(len(rows))])
    biases = []

    def recording_sdpa(*args, attn_mask=None, **kwargs):
        biases.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    for batch in (left, packed):
        real = batch["attention_mask"].bool()
        inputs = model_inputs(batch)
        with torch.no_grad():
            logits32 = model32(**inputs, use_cache=False).logits
            logits16 = model16(**inputs, use_cache=False).logits
        assert torch.isfinite(logits16).all()
        fp16_biases = [b for b in biases if b.dtype == torch.float16]
        assert fp16_biases and all(torch.isfinite(b).all() for b in fp16_biases)
        assert (logits16.float() - logits32)[real].abs().max() <= 2e-2 * logits32[real].abs().max()
        model16.zero_grad()
        model16(**inputs, use_cache=False, targets=next_token_labels(batch)).float().backward()
        assert all(torch.isfinite(p.grad).all() for p in model16.parameters() if p.requires_grad)


# --- train.py end to end (slow) ---

WORDS = ("alpha beta gamma delta river stone cloud seven blue quiet market garden engine paper window light "
         "number simple answer write explain list three reasons because therefore").split()


@pytest.fixture(scope="module")
def unseen_data(tmp_path_factory):
    """Records no test has seen: random sentences of 3 to 90 words, made here with a seed."""
    g = torch.Generator().manual_seed(30)

    def sentence(low: int, high: int) -> str:
        count = int(torch.randint(low, high, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (count,), generator=g))
    records = [{"instruction": sentence(3, 20), "input": sentence(0, 30) if i % 3 == 0 else "",
                "output": sentence(2, 90)} for i in range(72)]
    path = tmp_path_factory.mktemp("unseen") / "records.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name,max_length", [("bloom", 256), ("bloom", 128), ("llama", 256), ("gpt2", 256)])
def test_train_py_final_evaluation_packed_equals_unpacked(tmp_path, unseen_data, name, max_length):
    """LEARNING_RATE=1e-12 (the adapter does not move), float32: the final evaluation of PACKING=true equals that
    of PACKING=false, on the same held-out examples. BLOOM at 256 tokens runs its packed rows through SDPA (200 keys
    or more) and its unpacked batches mostly through the explicit path; at 128 both through the explicit path."""
    from test_architectures import build_tiny_model

    import train

    model = TINY_BLOOM if name == "bloom" else build_tiny_model(tmp_path / name, name)
    losses = {}
    for packing in (False, True):
        cfg = TrainConfig(model_path=str(model), data_path=str(unseen_data), output_dir=str(tmp_path / f"{packing}"),
                          cache_dir=str(tmp_path / "cache"), max_length=max_length, batch_size=4,
                          grad_accum_steps=2, learning_rate=1e-12, lora_dropout=0.0, warmup_steps=0,
                          size_valid_set=24, eval_freq=0, num_epochs=1, max_steps=2, packing=packing)
        losses[packing] = train.run(cfg, train.DistEnv())["eval_loss"]
    assert abs(losses[True] - losses[False]) <= 1e-5 * losses[False]


@pytest.mark.slow
def test_packed_quick_start_runs_reports_its_rows_and_learns(tmp_path):
    """`PACKING=true DEBUG=true MODEL_PATH=models/tiny-bloom python train.py` as a user types it: exit 0, only our
    lines, the banner's rows and fill (>= 0.95 on the sample), the evaluation loss falls."""
    import re

    from conftest import metric_rows
    from test_train import foreign_lines, user_command

    result = user_command(tmp_path, PACKING="true", DEBUG="true", MODEL_PATH="models/tiny-bloom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not foreign_lines(result.stdout + result.stderr)
    found = re.search(r"^packing +1,896 train examples in ([\d,]+) rows \(fill ([\d.]+)\)", result.stdout, re.M)
    assert found and float(found.group(2)) >= 0.95 and int(found.group(1).replace(",", "")) < 1896 / 3
    assert "32 packed rows per optimizer step" in result.stdout
    evals = [row["eval_loss"] for row in metric_rows(tmp_path / "outputs" / "debug") if "eval_loss" in row]
    assert len(evals) >= 2 and evals[-1] < evals[0]
