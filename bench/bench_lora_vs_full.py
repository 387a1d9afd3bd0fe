"""Does LoRA speed up training? One optimizer step of LoRA against full fine-tuning of the same model.

Reproduce (from the repository root)::

    python bench/bench_lora_vs_full.py --threads 1     # CPU
    python bench/bench_lora_vs_full.py --device cuda   # same script on a GPU

Both variants run the same step on the same BLOOM-shaped model (random weights from a config, default hidden 1024,
4 layers, 16 heads, vocab 4096, batch 4 x 256 tokens, float32): forward, token-mean cross-entropy, backward, AdamW
step, zero_grad. "full" trains every weight; "lora" trains r=8 adapters on query_key_value (our lora_model.py) with
everything else frozen. Rounds alternate the two variants so load drift on a shared machine hits both alike.

Memory is measured on the bench model (bytes of the gradients and of AdamW's state after one step) and, for the
assignment's BLOOM-1.7B, counted from its real shape built on the meta device (no download): gradients and AdamW's
two moments in float32 are 12 bytes per trainable parameter.
Writes bench/results/lora_vs_full.md (atomically) and prints it.
"""

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import BloomConfig, BloomForCausalLM  # noqa: E402

from bench.common import (
    BLOOM_1B7,
    add_device_arguments,
    add_model_shape_arguments,
    bloom_config,
    command_line,
    device_from_args,  # noqa: E402
    interleave,
    synchronize,
)
from lora_model import LoraConfig, LoraModelForCasualLM  # noqa: E402
from support.atomic import write_text_atomically # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_shape_arguments(parser)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=6, help="timed rounds (each times both variants)")
    parser.add_argument("--warmup", type=int, default=1)
    add_device_arguments(parser)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora_vs_full.md")
    return parser.parse_args(argv)


def build_variants(args, device: torch.device) -> dict:
    """{"full": (model, optimizer), "lora": (model, optimizer)} on copies of one random BLOOM."""
    torch.manual_seed(0)
    config = bloom_config(args)
    base = BloomForCausalLM(config)
    full = copy.deepcopy(base).to(device)
    lora = LoraModelForCasualLM(base, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05,
                                                 target_modules=["query_key_value"])).to(device)
    variants = {}
    for name, model in (("full", full), ("lora", lora)):
        params = [p for p in model.parameters() if p.requires_grad]
        variants[name] = (model.train(), torch.optim.AdamW(params, lr=1e-5))
    return variants


def training_step(model, optimizer, input_ids: torch.Tensor) -> None:
    logits = model(input_ids=input_ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_rounds(args, variants: dict, input_ids: torch.Tensor, device: torch.device) -> dict[str, list[float]]:
    """Interleaved timings of one training step (forward, backward, AdamW) of each variant."""
    def timed_step(name: str) -> float:
        synchronize(device)
        start = time.perf_counter()
        training_step(*variants[name], input_ids)
        synchronize(device)
        return time.perf_counter() - start

    steps = {name: (lambda name=name: timed_step(name)) for name in variants}
    return interleave(steps, args.repeats, args.warmup)


def state_bytes(model, optimizer) -> tuple[int, int]:
    """(gradient bytes, AdamW state bytes) as allocated after a step (gradients recreated by one backward)."""
    optimizer_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    gradient_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return gradient_bytes, optimizer_bytes


def bloom_1b7_counts(r: int) -> tuple[int, int]:
    """(all parameters, LoRA trainable parameters) of BLOOM-1.7B's real shape, on the meta device."""
    with torch.device("meta"):
        model = BloomForCausalLM(BloomConfig(**BLOOM_1B7))
        lora = LoraModelForCasualLM(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query_key_value"]))
    trainable, total = lora.get_nb_trainable_parameters()
    return total - trainable, trainable


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f}"


def markdown(args, argv, device, times, memory, counts) -> str:
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = statistics.median(full / lora for full, lora in zip(times["full"], times["lora"]))
    tokens = args.batch * args.seq
    base_params, lora_params = counts
    lines = [
        "# Training step: LoRA vs full fine-tuning",
        "",
        f"Reproduce: `{command_line('bench_lora_vs_full.py', argv)}`",
        "",
        f"- Device: {device.type} ({platform.machine()}, {torch.get_num_threads()} threads); "
        f"torch {torch.__version__}.",
        f"- Model: BLOOM-shaped, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}; "
        f"random weights, float32. Step: forward + backward + AdamW on {args.batch} x {args.seq} tokens.",
        f"- LoRA: r={args.r} on query_key_value. {args.repeats} alternating rounds after {args.warmup} warm-up; "
        "speed-up = median of per-round full/LoRA ratios.",
        "",
        "| variant | s / step median [min-max] | tokens/s | gradients (MiB) | AdamW state (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name in ("full", "lora"):
        grads, adam = memory[name]
        lines.append(f"| {name} | {median[name]:.3f} [{min(times[name]):.3f}-{max(times[name]):.3f}] | "
                     f"{tokens / median[name]:,.0f} | {grads / 2**20:,.1f} | {adam / 2**20:,.1f} |")
    lines += [
        "",
        f"LoRA step is **{ratio:.2f}x** as fast as full fine-tuning here.",
        "",
        f"BLOOM-1.7B (counted on the meta device): {base_params + lora_params:,} parameters; full fine-tuning needs "
        f"float32 gradients + AdamW moments of {gib(12 * (base_params + lora_params))} GiB on top of the weights; "
        f"LoRA r={args.r} on query_key_value trains {lora_params:,} parameters and needs {gib(12 * lora_params)} GiB.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    device = device_from_args(args)
    variants = build_variants(args, device)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    input_ids = input_ids.to(device)
    times = time_rounds(args, variants, input_ids, device)
    memory = {}
    for name, (model, optimizer) in variants.items():
        logits = model(input_ids=input_ids).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()).backward()
        memory[name] = state_bytes(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
    table = markdown(args, argv, device, times, memory, bloom_1b7_counts(args.r))
    write_text_atomically(args.out, table)
    print(table)


if __name__ == "__main__":
    main()
