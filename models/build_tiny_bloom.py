"""Build the offline tiny BLOOM model used by the tests and the offline quick start.

The result, ``models/tiny-bloom/``, is a toy: a byte-level BPE tokenizer and a four-layer BLOOM model,
both trained for a few minutes on the 2,000-record Alpaca sample. It exists so that the LoRA pipeline can
be run end to end without downloading ``bigscience/bloom-1b7``; it is not a useful language model.

The tokenizer is trained on the records in the Alpaca template, but the model is pre-trained on them as plain
text (instruction, input and output as paragraphs): like a real base model it knows the words but not the
instruction template, which is what LoRA fine-tuning then has to learn.

Usage::

    python models/build_tiny_bloom.py [--out models/tiny-bloom] [--steps N]

The build is deterministic: the same command on the same machine and library versions gives byte-identical
``tokenizer.json`` and ``model.safetensors``.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Set before tokenizers is imported: a single-threaded BPE trainer keeps the build reproducible and leaves
# the shared CPU cores to the model training.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import BloomConfig, BloomForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "models" / "tiny-bloom"
DEFAULT_DATA = REPO_ROOT / "data" / "alpaca_sample.json"

# BLOOM's special tokens, in BLOOM's order: unk=0, bos=1, eos=2, pad=3.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
UNK, BOS, EOS, PAD = SPECIAL_TOKENS
# BLOOM's own pre-tokenizer split: an optional leading space plus a run of anything that is neither
# whitespace nor one of its punctuation marks. Non-matching text (newlines, punctuation) is kept as its own piece.
BLOOM_SPLIT_REGEX = r" ?[^(\s|[.,!?…。，、।۔،])]+"

VOCAB_SIZE = 4096
HIDDEN_SIZE = 128
N_LAYER = 4
N_HEAD = 4
SEQ_LEN = 256
BATCH_SIZE = 8
DEFAULT_STEPS = 800
PEAK_LR = 3e-3
WARMUP_STEPS = 20
WEIGHT_DECAY = 0.01
SEED = 1234
NUM_THREADS = 2
LOG_EVERY = 25

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

ALPACA_CITATION = """@misc{alpaca,
  author = {Rohan Taori and Ishaan Gulrajani and Tianyi Zhang and Yann Dubois and Xuechen Li and Carlos Guestrin and Percy Liang and Tatsunori B. Hashimoto },
  title = {Stanford Alpaca: An Instruction-following LLaMA model},
  year = {2023},
  publisher = {GitHub},
  journal = {GitHub repository},
  howpublished = {\\url{https://github.com/tatsu-lab/stanford_alpaca}},
}"""


def parse_args(argv=None):
    """Parse the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed ``argparse.Namespace`` (``out``, ``steps``, ``data``).

    Raises:
        SystemExit: If ``--steps`` is not a positive integer.
    """
    parser = argparse.ArgumentParser(
        description="Build the offline tiny BLOOM model (tokenizer + briefly pre-trained weights) "
        "from the Alpaca sample. Deterministic for a given machine and library versions."
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder, replaced atomically (default: models/tiny-bloom)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"pre-training steps of {BATCH_SIZE} x {SEQ_LEN} tokens (default: {DEFAULT_STEPS})")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="Alpaca-format JSON list (default: data/alpaca_sample.json)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be a positive integer, got {args.steps}")
    return args


def alpaca_prompt(instruction, input_text=""):
    """Format one record's prompt in the Stanford Alpaca template.

    Args:
        instruction: The task description.
        input_text: Optional context; an empty string selects the template without an input section.

    Returns:
        The prompt, ending with ``"### Response:\\n"``.
    """
    if input_text:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def load_records(path):
    """Read and check the Alpaca records.

    Args:
        path: JSON file holding a list of ``{"instruction", "input", "output"}`` objects.

    Returns:
        The records, in file order.

    Raises:
        SystemExit: If the file is missing or a record lacks one of the three keys.
    """
    if not path.is_file():
        raise SystemExit(f"Alpaca data file not found: {path}")
    records = json.loads(path.read_text(encoding="utf-8"))
    for i, record in enumerate(records):
        missing = {"instruction", "input", "output"} - set(record)
        if missing:
            raise SystemExit(f"{path}: record #{i} lacks keys {sorted(missing)}")
    return records


def template_text(record):
    """One record as the fine-tuning pipeline sees it: Alpaca prompt followed by the output (no EOS).

    Used for the tokenizer only, so that the template's words ("### Instruction:", "Below is an instruction
    ...") get tokens of their own, as they would in a real base model's vocabulary.
    """
    return alpaca_prompt(record["instruction"], record["input"]) + record["output"]


def plain_text(record):
    """One record as plain text: instruction, input (when present) and output as paragraphs (no EOS).

    This is the pre-training text. It has none of the template's wording or ``###`` markers, so the model
    learns the words of the data but not the instruction format: that is left for LoRA fine-tuning to teach,
    as with a real base model.
    """
    paragraphs = [record["instruction"], record["input"], record["output"]]
    return "\n\n".join(p for p in paragraphs if p)


def train_tokenizer(texts, vocab_size=VOCAB_SIZE):
    """Train a byte-level BPE tokenizer laid out like BLOOM's.

    Args:
        texts: Training strings.
        vocab_size: Target vocabulary size, special tokens and the 256 byte symbols included.

    Returns:
        A ``tokenizers.Tokenizer`` with ``<unk> <s> </s> <pad>`` at ids 0-3.
    """
    tokenizer = Tokenizer(models.BPE())
    # Same pipeline as bigscience/bloom's tokenizer.json: no normalizer (so decoding gives the text back
    # exactly), regex split, then byte-level mapping without a prefix space.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BLOOM_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so any UTF-8 text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    assert ids == [0, 1, 2, 3], f"special token ids {ids}"
    return tokenizer


def save_tokenizer(tokenizer, out_dir):
    """Save the tokenizer as a transformers fast-tokenizer folder that loads with ``AutoTokenizer``.

    Args:
        tokenizer: The trained ``tokenizers.Tokenizer``.
        out_dir: Folder to write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    Returns:
        The ``PreTrainedTokenizerFast`` wrapping ``tokenizer``.
    """
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        padding_side="left", clean_up_tokenization_spaces=False,
    )
    tokenizer.save(str(out_dir / "tokenizer.json"))
    # Written by hand rather than by save_pretrained: transformers 5 records its own class name
    # ("TokenizersBackend"), which transformers 4.x cannot load. "BloomTokenizerFast" is what real BLOOM
    # uses; 4.x maps it to its BLOOM fast tokenizer and 5.x to the tokenizers backend, both reading tokenizer.json.
    config = {
        "tokenizer_class": "BloomTokenizerFast",
        "unk_token": UNK,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "padding_side": "left",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    write_json(out_dir / "tokenizer_config.json", config)
    write_json(out_dir / "special_tokens_map.json",
               {"unk_token": UNK, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD})
    return hf_tokenizer


def write_json(path, obj):
    """Write ``obj`` as indented JSON with a trailing newline."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_config(vocab_size):
    """Return a tiny ``BloomConfig`` with the real BLOOM settings apart from its size.

    Args:
        vocab_size: Tokenizer vocabulary size.

    Returns:
        The configuration (float32, tied embeddings, ALiBi, pre-LayerNorm, no dropout, as bloom-1b7).
    """
    return BloomConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        apply_residual_connection_post_layernorm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # bloom-1b7 says 2, but that only matters with slow_but_exact; 1 is the plain computation.
        pretraining_tp=1,
        slow_but_exact=False,
        tie_word_embeddings=True,
        use_cache=True,
        unk_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        dtype="float32",
    )


def pack_blocks(hf_tokenizer, texts, seq_len=SEQ_LEN):
    """Tokenize texts, end each with EOS, concatenate and cut into full blocks.

    Packing wastes no compute on padding; blocks may start mid-record, which is fine for pre-training.

    Args:
        hf_tokenizer: The fast tokenizer.
        texts: Training strings.
        seq_len: Tokens per block.

    Returns:
        A ``LongTensor`` of shape ``[n_blocks, seq_len]``; the incomplete tail is dropped.
    """
    stream = []
    for ids in hf_tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(hf_tokenizer.eos_token_id)
    n_blocks = len(stream) // seq_len
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def learning_rate(step, total_steps):
    """Linear warm-up to ``PEAK_LR``, then cosine decay to a tenth of it."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS)
    return PEAK_LR * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def pretrain(model, blocks, steps, seed=SEED):
    """Train ``model`` on ``blocks`` with AdamW, printing the loss trajectory.

    Args:
        model: A ``BloomForCausalLM`` in float32 on CPU.
        blocks: ``[n_blocks, seq_len]`` token ids.
        steps: Optimizer steps of ``BATCH_SIZE`` blocks each.
        seed: Seed for the batch order.

    Returns:
        The list of per-step training losses.
    """
    # Weight decay on matrices only, as usual for transformers: biases and LayerNorm gains stay free.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR, betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    losses = []
    model.train()
    for step in range(steps):
        # Walk through shuffled epochs so every block is seen once before any repeats.
        if len(order) < BATCH_SIZE:
            order = torch.cat([order, torch.randperm(len(blocks), generator=generator)])
        batch, order = blocks[order[:BATCH_SIZE]], order[BATCH_SIZE:]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        # labels == input_ids: the model shifts them by one internally.
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % LOG_EVERY == 0 or step == steps - 1:
            window = losses[-LOG_EVERY:]
            print(f"step {step + 1:4d}/{steps}  loss {loss.item():.4f}  "
                  f"(mean of last {len(window)}: {sum(window) / len(window):.4f})  lr {learning_rate(step, steps):.2e}",
                  flush=True)
    model.eval()
    return losses


def write_model_card(out_dir, info):
    """Write ``README.md``, the model card: what the model is, how it was built, and the data attribution.

    Args:
        out_dir: The model folder.
        info: Dict with ``n_params``, ``vocab_size``, ``steps``, ``n_blocks``, ``final_loss``.
    """
    card = f"""# tiny-bloom

A **toy** BLOOM model for testing this repository's LoRA pipeline offline (unit tests, the offline quick
start). It is about {info['n_params'] / 1e6:.1f}M parameters, trained for a few minutes on CPU: it writes
English-looking words, but what it writes is not meaningful. It is **not a useful language model**; use
`bigscience/bloom-1b7` for real fine-tuning.

Like a real base model, it has read the words of the Alpaca data but never the Alpaca instruction template:
it was pre-trained on the records as **plain text** (see below). The template and the response format are
what LoRA fine-tuning teaches it, so the offline quick start's validation loss visibly falls (measured
with this build: 4.70, 4.57, 4.54 at steps 20, 40, 60). An earlier version was pre-trained on the very
records of the quick start in the template itself; fine-tuning then had nothing left to learn and the eval
loss stayed flat to within 0.002 (3.058, 3.057, 3.057).

## How it was built

```
python models/build_tiny_bloom.py --steps {info['steps']}
```

The script is deterministic (fixed seeds, deterministic algorithms, {NUM_THREADS} CPU threads, single-threaded
tokenizer training): the same command on the same machine and library versions gives byte-identical
`tokenizer.json` and `model.safetensors`. Other CPUs or library versions may differ in the last bits.

1. **Tokenizer**: byte-level BPE trained with the `tokenizers` library on the Alpaca sample's full texts
   (prompt in the Alpaca template + output, so that the template's words tokenize as compactly as in a
   real vocabulary; some of its tokens, such as `###` and ` Response:`, never occur in the pre-training
   text, so the model has to learn them in fine-tuning), vocabulary {info['vocab_size']}. Same pipeline as
   BLOOM's tokenizer: no normalizer, BLOOM's regex split, byte-level pre-tokenizer and decoder (any UTF-8 text round-trips), no
   special tokens added when encoding. Special tokens at BLOOM's ids: `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3;
   padding on the left, as BLOOM.
2. **Model**: `BloomForCausalLM` (ALiBi positions, pre-LayerNorm, embedding LayerNorm, GELU MLP with 4x width,
   tied input/output embeddings, no dropout), float32, initialised from seed {SEED}.
3. **Pre-training**: {info['steps']} AdamW steps (peak lr {PEAK_LR}, {WARMUP_STEPS} warm-up steps, cosine decay, weight decay
   {WEIGHT_DECAY}, gradient clipping 1.0), batches of {BATCH_SIZE} x {SEQ_LEN} tokens packed from the {info['n_blocks']} blocks of the
   Alpaca sample as plain text: each record is its instruction, input (when there is one) and output as
   paragraphs separated by a blank line, then `</s>`, with none of the template's wording ("Below is an
   instruction ...") or its `### Instruction:` / `### Input:` / `### Response:` markers. Final training loss
   (mean of the last {LOG_EVERY} steps): {info['final_loss']:.3f}.

   Nothing is held out: the model has seen the words of the quick start's validation records. That is
   intended: what fine-tuning learns here is the format, which the model has not seen for any record.

## Architecture

| setting | value |
| --- | --- |
| `model_type` | bloom |
| `vocab_size` | {info['vocab_size']} |
| `hidden_size` | {HIDDEN_SIZE} |
| `n_layer` | {N_LAYER} |
| `n_head` | {N_HEAD} |
| parameters | {info['n_params']:,} |
| dtype | float32 |

## Training data

Stanford Alpaca, records #0–#1999 of `alpaca_data.json` (`data/alpaca_sample.json` in this repository; see
`data/README.md`). Generated with OpenAI `text-davinci-003` by Rohan Taori, Ishaan Gulrajani, Tianyi Zhang,
Yann Dubois, Xuechen Li, Carlos Guestrin, Percy Liang and Tatsunori B. Hashimoto (2023),
<https://github.com/tatsu-lab/stanford_alpaca>. The data is licensed **CC BY-NC 4.0**
(Attribution-NonCommercial 4.0 International): this model, trained on it, is for research and other
non-commercial use only.

```
{ALPACA_CITATION}
```
"""
    (out_dir / "README.md").write_text(card, encoding="utf-8")


def make_readable(folder):
    """Give ``folder`` and its files the usual permissions for the current umask.

    mkdtemp makes the folder private (0700) and safetensors writes its file as 0600; the published model
    should be readable like any other checkout file.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def replace_dir(tmp_dir, target):
    """Move ``tmp_dir`` to ``target``, replacing any existing folder there.

    A directory cannot be renamed over a non-empty one, so the old folder is first renamed aside; a reader
    never sees a half-written model, only (briefly) no folder at all.
    """
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / target.name)
    os.rename(tmp_dir, target)
    if old is not None:
        shutil.rmtree(old)


def build(out_dir, steps, data_path):
    """Build tokenizer and model into ``out_dir`` (an existing, empty folder).

    Args:
        out_dir: Destination folder.
        steps: Pre-training steps.
        data_path: Alpaca JSON file.
    """
    # The loss trajectory is the progress report; the "Writing model shards" bar would only add noise.
    hf_logging.disable_progress_bar()
    torch.manual_seed(SEED)
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)

    records = load_records(data_path)
    t0 = time.perf_counter()
    tokenizer = train_tokenizer([template_text(record) for record in records])
    hf_tokenizer = save_tokenizer(tokenizer, out_dir)
    vocab_size = tokenizer.get_vocab_size()
    print(f"tokenizer: {vocab_size} tokens, trained in {time.perf_counter() - t0:.1f}s", flush=True)

    blocks = pack_blocks(hf_tokenizer, [plain_text(record) for record in records])
    print(f"data: {len(records)} records as plain text -> {blocks.numel():,} tokens in {len(blocks)} blocks "
          f"of {SEQ_LEN}", flush=True)

    model = BloomForCausalLM(build_config(vocab_size))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    t0 = time.perf_counter()
    losses = pretrain(model, blocks, steps)
    print(f"pre-training: {steps} steps in {time.perf_counter() - t0:.1f}s", flush=True)

    model.save_pretrained(out_dir, safe_serialization=True)
    tail = losses[-LOG_EVERY:]
    write_model_card(out_dir, {"n_params": n_params, "vocab_size": vocab_size, "steps": steps,
                               "n_blocks": len(blocks), "final_loss": sum(tail) / len(tail)})


def main(argv=None):
    """Command-line entry point: build into a temp folder beside ``--out``, then swap it in."""
    args = parse_args(argv)
    start = time.perf_counter()
    target = args.out.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target so the final rename stays on one file system.
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp_dir, args.steps, args.data)
        make_readable(tmp_dir)
        replace_dir(tmp_dir, target)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    print(f"wrote {target} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
