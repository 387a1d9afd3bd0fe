"""LoRA, DoRA and PiSSA on the same data and steps: eval loss after N steps, time per step, memory, over seeds.

Reproduce (from the repository root)::

    python bench/bench_lora_variants.py --threads 1           # the figures in bench/results/lora_variants.md
    python bench/bench_lora_variants.py --device cuda          # the same on a GPU

Two models: the shipped models/tiny-bloom (hidden 128, 4 layers) and a wider random BLOOM (hidden 384, 2 layers, the
tiny tokenizer's 4,096 ids; built from a config as bench/make_random_bloom.py does). Neither is a trained language
model, so the question here is only whether the variants learn the same toy task differently, not which is better
on a real model. Every variant trains r=8, alpha=16 adapters on query_key_value with AdamW (lr 3e-4 after a short
warm-up, as train.py), batch 4 x at most 96 tokens of the Alpaca sample, the same examples in the same order for
every variant of a seed; the eval loss is the token-mean loss on 48 held-out examples. A seed sets the
wide model's weights, the adapter's random init and the data order. Time per step is the median over the steps
after the first; memory is the peak resident set of a fresh process that runs a few steps of one variant
(bench/common.peak_memory), so it includes Python and torch (the "before" column).
Writes bench/results/lora_variants.md (atomically) and prints it.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BloomConfig, BloomForCausalLM  # noqa: E402

from bench.common import (add_device_arguments, answer_memory_request, command_line, describe_device,  # noqa: E402
                          device_from_args, memory_of_variants, peak_memory, synchronize)
from lora_model import LoraConfig, LoraModelForCasualLM  # noqa: E402
from prompter import Prompter  # noqa: E402
from support.alpaca_data import PadCollator  # noqa: E402
from support.atomic import write_text_atomically  # noqa: E402

TINY = ROOT / "models" / "tiny-bloom"
SAMPLE = ROOT / "data" / "alpaca_sample.json"
MODELS = ("tiny-bloom", "wide-random")
VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "pissa": {"init_lora_weights": "pissa"}}
WIDE = dict(vocab_size=4096, hidden_size=384, n_layer=2, n_head=6)
EVAL_EXAMPLES, MAX_LENGTH, WARMUP = 48, 96, 5


def examples(tokenizer) -> list[dict]:
    """The Alpaca sample as causal-LM examples (prompt + output + EOS, at most MAX_LENGTH tokens, labels = ids)."""
    prompter = Prompter()
    records = json.loads(SAMPLE.read_text(encoding="utf-8"))
    out = []
    for record in records:
        text = prompter.generate_prompt(record["instruction"], record.get("input"), record["output"])
        ids = tokenizer(text)["input_ids"][: MAX_LENGTH - 1] + [tokenizer.eos_token_id]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def base_model(name: str, seed: int) -> torch.nn.Module:
    if name == "tiny-bloom":
        return AutoModelForCausalLM.from_pretrained(TINY)
    torch.manual_seed(1000 + seed)
    return BloomForCausalLM(BloomConfig(**WIDE))


def lora_model(name: str, variant: str, seed: int, device: torch.device) -> LoraModelForCasualLM:
    base = base_model(name, seed).to(device)
    torch.manual_seed(seed)  # the adapter's init
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query_key_value"],
                        **VARIANTS[variant])
    return LoraModelForCasualLM(base, config)


def batches(data: list[dict], collate, batch_size: int, steps: int, seed: int) -> list[dict]:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    return [collate([data[i] for i in order[k * batch_size:(k + 1) * batch_size]]) for k in range(steps)]


@torch.no_grad()
def eval_loss(model, eval_batches: list[dict], device: torch.device) -> float:
    model.eval()
    total = tokens = 0.0
    for batch in eval_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        count = (batch["labels"][:, 1:] != -100).sum().item()
        total += model(**batch).loss.item() * count
        tokens += count
    model.train()
    return total / tokens


def train(model, train_batches: list[dict], device: torch.device, lr: float) -> list[float]:
    """AdamW with a linear warm-up; returns each step's seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP))
    model.train()
    seconds = []
    for batch in train_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        synchronize(device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def run_one(name, variant, seed, data, collate, args, device) -> dict:
    eval_batches = [collate(data[i:i + args.batch_size]) for i in range(0, EVAL_EXAMPLES, args.batch_size)]
    train_data = data[EVAL_EXAMPLES:]
    model = lora_model(name, variant, seed, device)
    start_loss = eval_loss(model, eval_batches, device)
    seconds = train(model, batches(train_data, collate, args.batch_size, args.steps, seed), device, args.lr)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"start": start_loss, "end": eval_loss(model, eval_batches, device),
            "step": statistics.median(seconds[1:]), "trainable": trainable}


def measure_memory(args) -> dict:
    """In a fresh process (--measure-memory MODEL/VARIANT): the peak memory of building and training 5 steps."""
    name, variant = args.measure_memory.split("/")
    device = device_from_args(args)
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    data, collate = examples(tokenizer), PadCollator(tokenizer)

    def run():
        model = lora_model(name, variant, 0, device)
        train(model, batches(data, collate, args.batch_size, 5, 0), device, args.lr)

    return peak_memory(run, device)


def cpu_line() -> str:
    """The CPU's model and the vector features that matter to these figures, from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU: unknown (no /proc/cpuinfo)"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    missing = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f not in flags]
    return (f"CPU: {model}, {os.cpu_count()} logical CPUs, flags {' '.join(shown) or 'none'}"
            + (f" (no {', '.join(missing)})" if missing else "")
            + f"; load average at the end {os.getloadavg()[0]:.1f} (a machine shared with other jobs)")


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {sd:.4f} [{min(values):.4f}-{max(values):.4f}]"


def table(results: dict, memory: dict, args, device) -> str:
    lines = [
        "# LoRA vs DoRA vs PiSSA (toy models)",
        "",
        f"Reproduce: `{command_line('bench_lora_variants.py')}`",
        "",
        f"- Device: {device.type} ({describe_device(device)}); torch {torch.__version__}.",
        f"- {cpu_line()}." if device.type == "cpu" else None,
        f"- Data: Alpaca sample, batch {args.batch_size} x at most {MAX_LENGTH} tokens, {args.steps} AdamW steps at "
        f"lr {args.lr:g} ({WARMUP} warming up); eval loss = token-mean loss on {EVAL_EXAMPLES} held-out examples.",
        f"- Adapters: r=8, alpha=16, dropout 0.05 on query_key_value. Seeds {', '.join(map(str, args.seeds))}: "
        "mean ± sample standard deviation [min-max] over the seeds.",
        "- Memory: peak resident set of a fresh process building the model and training 5 steps (Python and torch "
        "included: 'before' is the process before the run).",
        "",
        "| model | variant | trainable | eval loss before | eval loss after | drop | s / step (median of seeds) "
        "| peak RSS MiB (before) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines = [line for line in lines if line is not None]
    for name in MODELS:
        for variant in VARIANTS:
            runs = results[name][variant]
            mem = memory[f"{name}/{variant}"]
            lines.append(
                f"| {name} | {variant} | {runs[0]['trainable']:,} | {spread([r['start'] for r in runs])} "
                f"| {spread([r['end'] for r in runs])} | {spread([r['start'] - r['end'] for r in runs])} "
                f"| {statistics.median(r['step'] for r in runs):.3f} "
                f"| {mem['peak'] / 2**20:.0f} ({(mem['before'] or 0) / 2**20:.0f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_arguments(parser)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora_variants.md")
    parser.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if answer_memory_request(measure_memory, args):
        return
    device = device_from_args(args)
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    data, collate = examples(tokenizer), PadCollator(tokenizer)
    results = {name: {variant: [] for variant in VARIANTS} for name in MODELS}
    for name in MODELS:
        for seed in args.seeds:
            for variant in VARIANTS:
                results[name][variant].append(run_one(name, variant, seed, data, collate, args, device))
                print(f"{name} {variant} seed {seed}: {results[name][variant][-1]}", file=sys.stderr, flush=True)
    child_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    memory = memory_of_variants(__file__, child_argv, [f"{n}/{v}" for n in MODELS for v in VARIANTS])
    text = table(results, memory, args, device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
