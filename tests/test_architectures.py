"""train.py and inference.py, unchanged, on the architectures people fine-tune next: Llama, Qwen2, Mistral, GPT-2.

Each model is a tiny random configuration built here (hidden 64, 2 layers, no download), saved with the shipped tiny
BLOOM's tokenizer: a byte-level BPE any causal LM can use, loaded as a generic fast tokenizer. Llama, Mistral and
GPT-2 get it without a pad token, as their own tokenizers come, so the run pads with EOS; Llama and GPT-2 pad on the
right (as theirs do), Mistral and Qwen2 on the left. Each trains 10 steps through train.run with the default
TARGET_MODULES (the architecture's own: q_proj,v_proj, or GPT-2's c_attn, a Conv1D with (in, out) weights), and its
adapter is checked against PEFT, the independent reference, then answers through generate_inference.
"""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

import inference
import train
from conftest import TINY_BLOOM, metric_rows, one_torch_thread
from support import checkpoint, model_loading
from support.alpaca_data import IGNORE_INDEX, PadCollator
from support.config import ConfigError, TrainConfig

VOCAB = 4096  # the tiny BLOOM tokenizer's
SPECIAL_IDS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, **SPECIAL_IDS)
# name: (configuration, the tokenizer's pad token kept?, padding side, the default targets)
ARCHITECTURES = {
    "llama": (lambda: LlamaConfig(**DECODER), False, "right", "q_proj,v_proj"),
    "qwen2": (lambda: Qwen2Config(**DECODER), True, "left", "q_proj,v_proj"),
    "mistral": (lambda: MistralConfig(**DECODER), False, "left", "q_proj,v_proj"),
    "gpt2": (lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **SPECIAL_IDS), False, "right",
             "c_attn"),
}


def build_tiny_model(folder: Path, name: str) -> Path:
    """A tiny random `name` model and a tokenizer in `folder`, as a downloaded model folder holds them."""
    make_config, keep_pad, padding_side, _ = ARCHITECTURES[name]
    torch.manual_seed(0)
    with model_loading.no_loading_bar():
        AutoModelForCausalLM.from_config(make_config()).save_pretrained(folder)
    shutil.copy(TINY_BLOOM / "tokenizer.json", folder / "tokenizer.json")
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        settings = json.loads((TINY_BLOOM / file).read_text(encoding="utf-8"))
        if not keep_pad:
            del settings["pad_token"]
        if file == "tokenizer_config.json":  # not BloomTokenizerFast: the generic class any model can use
            settings.update(tokenizer_class="PreTrainedTokenizerFast", padding_side=padding_side)
        (folder / file).write_text(json.dumps(settings), encoding="utf-8")
    return folder


@pytest.fixture(autouse=True, scope="module")
def one_thread_and_an_empty_cache_after():
    with one_torch_thread():
        yield
    inference.clear_cache()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_a_tokenizer_without_pad_token_pads_with_eos_and_keeps_the_eos_label(tmp_path, name):
    folder = build_tiny_model(tmp_path / name, name)
    _, keep_pad, padding_side, _ = ARCHITECTURES[name]
    tokenizer = model_loading.load_tokenizer(str(folder))
    assert tokenizer.padding_side == padding_side  # the tokenizer's own side, as train.py uses it
    assert (tokenizer.pad_token == "<pad>") if keep_pad else (tokenizer.pad_token_id == tokenizer.eos_token_id)
    eos = tokenizer.eos_token_id
    short, long = [5, 6, eos], [5, 6, 7, 8, eos]
    batch = PadCollator(tokenizer)([{"input_ids": short, "labels": short}, {"input_ids": long, "labels": long}])
    real = batch["attention_mask"][0].bool()
    assert batch["labels"][0][real].tolist() == short  # the EOS the example ends with keeps its label
    assert batch["labels"][0][~real].tolist() == [IGNORE_INDEX] * 2 and (batch["input_ids"][0][~real] ==
                                                                           tokenizer.pad_token_id).all()
    assert real.tolist() == ([True] * 3 + [False] * 2 if padding_side == "right" else [False] * 2 + [True] * 3)


def test_the_default_targets_resume_a_checkpoint_written_with_bloom_s_old_default():
    """TARGET_MODULES used to default to BLOOM's query_key_value; it now defaults to the architecture's own, which
    for BLOOM is the same, so a checkpoint's run identity (the resume check) is unchanged."""
    default = train.with_default_targets(TrainConfig(model_path=str(TINY_BLOOM)))
    explicit = TrainConfig(model_path=str(TINY_BLOOM), target_modules="query_key_value")
    assert default.target_modules == "query_key_value"
    assert checkpoint.run_identity(default, 1, "data") == checkpoint.run_identity(explicit, 1, "data")
    assert train.with_default_targets(explicit) is explicit  # a setting is kept as it is


def test_an_architecture_without_default_targets_names_its_layers(tmp_path):
    from transformers import GPTNeoConfig

    folder = tmp_path / "gpt-neo"
    GPTNeoConfig(hidden_size=32, num_layers=1, attention_types=[[["global"], 1]], num_heads=2,
                 vocab_size=VOCAB).save_pretrained(folder)
    cfg = train.with_default_targets(TrainConfig(model_path=str(folder)))
    assert cfg.target_modules == ""  # none to fill in
    model = AutoModelForCausalLM.from_config(GPTNeoConfig.from_pretrained(folder))
    with pytest.raises(ConfigError, match=r"TARGET_MODULES: no default target_modules for model type 'gpt_neo'.*"
                                          r"q_proj"):
        train.build_lora_model(model, cfg, str(folder))


@pytest.mark.slow  # a whole training run per architecture
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_trains_matches_peft_and_answers(tmp_path, small_data, capsys, name):
    """10 steps through train.run with the defaults (the loss falls); the adapter gives PEFT's logits (max abs
    difference <= 1e-5) and changed them (> 1e-4); generate_inference answers with it, finding its base in it, and
    a batch of prompts of different lengths gets the answers each prompt gets alone."""
    from peft import PeftModel

    folder = build_tiny_model(tmp_path / name, name)
    out = tmp_path / "out"
    cfg = TrainConfig(model_path=str(folder), data_path=str(small_data), output_dir=str(out),
                      cache_dir=str(tmp_path / "cache"), max_length=64, batch_size=4, grad_accum_steps=1,
                      learning_rate=1e-2, lora_dropout=0.0, warmup_steps=0, size_valid_set=8, eval_freq=0,
                      num_epochs=1, max_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a Conv1D layer correcting fan_in_fan_out
        metrics = train.run(cfg, train.DistEnv())
    targets = ARCHITECTURES[name][3]
    assert f"targets={targets};" in capsys.readouterr().out
    losses = [row["loss"] for row in metric_rows(out) if "loss" in row]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3]), losses
    assert metrics["eval_loss"] < losses[0]
    saved = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert saved["target_modules"] == targets.split(",") and saved["fan_in_fan_out"] == (name == "gpt2")

    ids = torch.tensor([[1, 100, 200, 300, 400, 2000]])
    with torch.no_grad(), model_loading.no_loading_bar():
        base = AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), out).eval()
        ours = train.LoraModelForCasualLM.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), out)
        expected = reference(input_ids=ids).logits
        assert (ours(input_ids=ids).logits - expected).abs().max() <= 1e-5
        assert (expected - base).abs().max() > 1e-4  # the adapter did something

    instructions = ["Give three tips for staying healthy.", "Hi"]
    alone = [inference.generate_inference(i, None, None, out, max_new_tokens=8, device="cpu") for i in instructions]
    assert all(isinstance(answer, str) for answer in alone)
    # One left-padded batch (padded with EOS where the tokenizer has no pad token) answers as each prompt alone.
    assert inference.generate_inference(instructions, None, None, out, max_new_tokens=8, device="cpu") == alone


@pytest.mark.parametrize("name", ["bloom", *ARCHITECTURES])
def test_the_loss_forward_never_runs_the_output_layer_and_equals_the_logits_loss(tmp_path, name):
    """LoraModelForCasualLM(..., targets=) as train.py calls it: on these architectures (BLOOM with its fused
    modules, as train.py loads it) the output layer never runs whole (token_loss.sum_linear_token_loss), and the
    float32 loss and every adapter gradient equal those of the logits path to 1e-5; padding and skipped labels in."""
    from lora_model import LoraConfig, LoraModelForCasualLM
    from support.token_loss import next_token_labels, sum_token_loss

    folder = TINY_BLOOM if name == "bloom" else build_tiny_model(tmp_path / name, name)
    with model_loading.no_loading_bar():
        base = AutoModelForCausalLM.from_pretrained(folder)
    targets = ARCHITECTURES[name][3].split(",") if name in ARCHITECTURES else None  # None: BLOOM's default
    model = LoraModelForCasualLM(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                  fan_in_fan_out=name == "gpt2"))
    if name == "bloom":
        assert train.use_fused_modules(model) > 0
    torch.manual_seed(1)
    for param in model.parameters():
        if param.requires_grad:  # LoRA B starts at zero: random, so that every adapter tensor gets a gradient
            param.data.normal_(0, 0.05)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a right-padded row
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, :3] = IGNORE_INDEX  # prompt tokens with TRAIN_ON_INPUTS=false
    targets = next_token_labels({"labels": labels, "attention_mask": mask})
    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))

    results = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        if fused:
            loss = model(input_ids=ids, attention_mask=mask, targets=targets)
            assert not head_calls
        else:
            loss = sum_token_loss(model(input_ids=ids, attention_mask=mask).logits, targets)
        (loss * 0.37).backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (fused_loss, fused_grads), (loss, grads) = results
    assert abs(fused_loss - loss) <= 1e-5 * loss
    assert grads and all((f - g).abs().max() <= 1e-5 * g.abs().max() and g.abs().max() > 0
                         for f, g in zip(fused_grads, grads))
