"""Checks on the shipped offline toy model ``models/tiny-bloom/`` (built by ``models/build_tiny_bloom.py``).

Every other test and the offline quick start load this folder instead of ``bigscience/bloom-1b7``, so it has to
load without the network and behave like BLOOM where the pipeline depends on it: special token ids, padding
side, architecture and module names, and a tokenizer that gives the text back.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BloomForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO_ROOT / "models" / "tiny-bloom"
DATA_PATH = REPO_ROOT / "data" / "alpaca_sample.json"

# Written out here rather than imported, so that the test checks the folder against BLOOM's convention
# independently of the script that built it.
BLOOM_SPECIAL_TOKENS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    """The shipped tokenizer; ``local_files_only`` makes any attempt to reach the hub an error."""
    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    """The shipped model, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True).eval()


@pytest.fixture(scope="module")
def records():
    """The Alpaca sample the tokenizer was trained on."""
    return json.loads(DATA_PATH.read_text(encoding="utf-8"))


def test_folder_has_the_expected_files():
    names = {p.name for p in MODEL_DIR.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "README.md"}
    assert expected <= names, f"missing: {sorted(expected - names)}"
    # A few MB, so it can live in git.
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 20 * 2**20


def test_tokenizer_config_loads_on_transformers_4_and_5():
    # transformers 5 saves its own class name ("TokenizersBackend"), which 4.x cannot resolve; the BLOOM name
    # is understood by both.
    config = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BloomTokenizerFast"


def test_special_tokens_have_bloom_ids(tokenizer, model):
    for token, token_id in BLOOM_SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
    ids = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert ids == (0, 1, 2, 3)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 3)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (2, 3)
    # Like BLOOM: pad on the left (so generation continues right after the prompt) and add no special tokens.
    assert tokenizer.padding_side == "left"
    assert tokenizer("Hello world")["input_ids"] == tokenizer.encode("Hello world", add_special_tokens=False)
    batch = tokenizer(["a b c d", "a"], padding=True)
    assert batch["input_ids"][1][0] == 3 and batch["attention_mask"][1][0] == 0


def test_model_has_bloom_architecture(tokenizer, model):
    assert isinstance(model, BloomForCausalLM)
    config = model.config
    assert config.model_type == "bloom"
    assert config.vocab_size == len(tokenizer)
    assert config.hidden_size % config.n_head == 0
    assert config.apply_residual_connection_post_layernorm is False
    assert model.dtype == torch.float32
    # Tied input/output embeddings, as in BLOOM: one tensor, not a copy.
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    # The module names LoRA targets in BLOOM, once per layer.
    names = [name for name, _ in model.named_modules()]
    for suffix in ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
        assert sum(name.endswith(suffix) for name in names) == config.n_layer, suffix
    assert hasattr(model.transformer, "word_embeddings_layernorm")


def test_tokenizer_round_trips_alpaca_text(tokenizer, records):
    # Each record as the pipeline feeds it: prompt (with the input section, so every field is covered) + output.
    texts = [ALPACA_PROMPT_WITH_INPUT.format(**record) + record["output"] for record in records]
    # Whitespace runs, leading/trailing spaces and non-ASCII text must survive too.
    texts += [" leading space", "  two leading spaces", "trailing space ", "tabs\tand\n\n\nnewlines",
              "caf\u00e9 \u2019quoted\u2019 \u65e5\u672c \U0001f999"]
    ids = tokenizer(texts)["input_ids"]
    decoded = tokenizer.batch_decode(ids)
    mismatches = [(text, out) for text, out in zip(texts, decoded) if text != out]
    assert not mismatches, f"{len(mismatches)} texts do not round-trip, first: {mismatches[0]!r}"
    assert 0 not in {i for seq in ids for i in seq}, "byte-level BPE should never need <unk>"


def plain_text(record):
    """A record as the model was pre-trained on it: instruction, input and output as paragraphs, no template."""
    return "\n\n".join(part for part in (record["instruction"], record["input"], record["output"]) if part)


def template_text(record):
    """A record as the fine-tuning pipeline feeds it: Alpaca prompt + output."""
    prompt = ALPACA_PROMPT_WITH_INPUT if record["input"] else ALPACA_PROMPT
    return prompt.format(**record) + record["output"]


def mean_loss(tokenizer, model, texts):
    """Mean over ``texts`` of the per-token next-token loss of ``text + "</s>"``."""
    losses = []
    for text in texts:
        batch = tokenizer(text + tokenizer.eos_token, return_tensors="pt")
        with torch.no_grad():
            losses.append(model(**batch, labels=batch["input_ids"]).loss.item())
    return sum(losses) / len(losses)


def test_model_was_pretrained(tokenizer, model, records):
    # A random model scores about ln(vocab) = 8.3 nats per token; the shipped one has been trained on the Alpaca
    # text (measured: 3.76 on these records).
    loss = mean_loss(tokenizer, model, [plain_text(record) for record in records[:20]])
    assert loss < 0.6 * math.log(len(tokenizer)), f"loss {loss:.2f}"


def test_model_was_not_pretrained_on_the_template(tokenizer, model, records):
    # The Alpaca template is left for LoRA fine-tuning to teach (that is what makes the quick start's eval loss
    # fall), so the same records cost clearly more in the template than as plain text. Measured: 4.98 vs 3.76;
    # the earlier model, pre-trained in the template, scored them the other way round (2.69 vs 4.09).
    sample = records[:20]
    templated = mean_loss(tokenizer, model, [template_text(record) for record in sample])
    plain = mean_loss(tokenizer, model, [plain_text(record) for record in sample])
    assert templated > plain + 0.3, f"template {templated:.2f}, plain text {plain:.2f}"


def test_greedy_generation_runs(tokenizer, model):
    prompt = ALPACA_PROMPT.format(instruction="Give three tips for staying healthy.")
    batch = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    new_tokens = out[0, batch["input_ids"].shape[1]:]
    assert 0 < len(new_tokens) <= 8
    assert tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
