"""Benchmark train.py's precisions: seconds per optimizer step, tokens/s and peak memory of LoRA training.

Reproduce (from the repository root)::

    python bench/bench_precision.py --threads 1                  # CPU, the small BLOOM-shaped model below
    python bench/bench_precision.py --device cuda --real-shape   # a GPU, BLOOM-1b7's shapes

Model: a randomly initialised BLOOM (from a BloomConfig, nothing downloaded). Default hidden 1024, 4 layers,
16 heads and a small vocabulary of 4096: BLOOM's real 250,880-token vocabulary would make the lm_head matmul and the
cross-entropy dominate a small model's step. `--real-shape` uses BLOOM-1b7's config instead (vocab 250880,
hidden 2048, 24 layers, 16 heads; 1.7e9 parameters, for a GPU). LoRA r=8, alpha=16, dropout 0.05 on query_key_value
(lora_model.py, adapters float32), batch 4 x 256 tokens.

Variants, each what train.py runs for some PRECISION / MIX_PREC_TRAIN setting, on transformers' eager BLOOM modules
(train.py's FUSED_MODULES=false; bench/bench_vs_hf_trainer.py times the fused ones):
  fp32            float32 weights, no autocast                            (the default)
  bf16 autocast   float32 weights, bf16 autocast                          (MIX_PREC_TRAIN=true on a CPU until 12/2026)
  bf16 weights    bfloat16 base weights, bf16 autocast                    (MIX_PREC_TRAIN=true on an A100/H100, a CPU)
  fp16 autocast   float32 weights, fp16 autocast, GradScaler              (PRECISION=fp16 on a CPU)
  fp16 weights    float16 base weights, fp16 autocast, GradScaler         (MIX_PREC_TRAIN=true on a T4; GPU only)
  ... + checkpointing   the same with GRADIENT_CHECKPOINTING=true: activations recomputed in the backward pass
The three float32-weight variants share one model (each with its own AdamW and GradScaler); each weight dtype, and
each with checkpointing, is another model, all held at once for the interleaved timing: for BLOOM-1b7's shape on a
GPU 6.9 GB per float32 copy, 3.4 GB per half one, 28 GB for all variants. Where they do not fit together (a 16 GB
T4), each model's variants are timed in turn, and the table says so. bf16 variants are skipped on a GPU without
native bf16.

A step is train.py's optimizer step, with train.py's own autocast_context and loss (support/token_loss.py): forward
under autocast, the summed token loss divided by the token count, scaler.scale(loss).backward(), unscale_,
clipping to norm 1.0, AdamW over the LoRA parameters, scaler.update(), zero_grad.

Timing: warm-up rounds, then `--repeats` rounds, each timing every variant once, in an order that rotates from
round to round, so that drift in a shared machine's load hits all variants alike. Reported: the median (and
min-max) seconds per step, tokens per second from the median, and the speed-up over fp32 as the median over rounds
of the per-round ratio. Before timing, each variant's loss on one batch (dropout off) is compared with fp32's.

Memory: each variant runs again in a fresh process of its own (`--measure-memory NAME`) for two steps (the first
creates AdamW's state); `--memory-jobs N` runs N such processes at a time, which changes no figure (each measures
only itself) and saves their start-up on a big GPU. On a GPU: torch.cuda.max_memory_allocated, reset once the model
is built (weights, activations, gradients, optimizer state; not the caching allocator's reserve). On a CPU: the peak
resident set size, VmHWM from /proc/self/status, reset (via /proc/self/clear_refs) once the model is built, so that
building it does not count; it includes the Python process and the torch libraries (~0.3 GB), so the step's own
share, the peak minus the resident size just before the first step, is given too. Where /proc is missing (not
Linux), resource.getrusage's ru_maxrss since the process started is used instead, and the table says so.

Writes a markdown table to bench/results/precision.md (atomically), with the command at the top, and prints it;
the table is written once the timing is done and again with the memory, so a run stopped during the memory
processes keeps its timing.
"""

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import BloomForCausalLM  # noqa: E402

import train  # noqa: E402
from bench.common import (
    BLOOM_1B7,
    SHAPE_ARGUMENTS,
    add_device_arguments,
    add_model_shape_arguments,
    answer_memory_request,
    bloom_config,
    command_line,
    describe_device,
    device_from_args,
    interleave,  # noqa: E402
    memory_of_variants,
    parse_device,
    peak_memory,
    synchronize,
)
from lora_model import LoraModelForCasualLM  # noqa: E402
from support.alpaca_data import IGNORE_INDEX # noqa: E402
from support.atomic import write_text_atomically # noqa: E402
from support.config import TrainConfig # noqa: E402
from support.token_loss import next_token_labels, sum_token_loss # noqa: E402

# name: (PRECISION as train.py names it, dtype of the frozen base weights, GRADIENT_CHECKPOINTING)
VARIANTS = {
    "fp32": ("fp32", torch.float32, False),
    "bf16 autocast": ("bf16", torch.float32, False),
    "bf16 weights": ("bf16", torch.bfloat16, False),
    "fp16 autocast": ("fp16", torch.float32, False),
    "fp16 weights": ("fp16", torch.float16, False),
    "fp32 + checkpointing": ("fp32", torch.float32, True),
    "bf16 weights + checkpointing": ("bf16", torch.bfloat16, True),
    "fp16 weights + checkpointing": ("fp16", torch.float16, True),
}
CPU_DEFAULT = ["fp32", "bf16 autocast", "bf16 weights", "fp16 autocast", "fp32 + checkpointing"]
SPEEDUP_TARGET = ("bf16 autocast", 1.6)  # on a CPU with AVX-512 bf16 / AMX


def parse_args(argv=None):
    """The command line (`argv` without the program name; None reads sys.argv), `variants` as a list of names."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_shape_arguments(parser)
    parser.add_argument("--real-shape", action="store_true",
                        help="BLOOM-1b7's shapes: vocab 250880, hidden 2048, 24 layers, 16 heads (overrides those)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, of: {', '.join(VARIANTS)} (default: all on a GPU; on a CPU "
                             f"{', '.join(CPU_DEFAULT)})")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (each times every variant once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    add_device_arguments(parser)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--memory-jobs", type=int, default=1, help="memory processes run at a time")
    parser.add_argument("--measure-memory", metavar="NAME", help=argparse.SUPPRESS)  # internal: one variant
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "precision.md")
    args = parser.parse_args(argv)
    if args.real_shape:
        for argument, field in SHAPE_ARGUMENTS.items():
            setattr(args, argument, BLOOM_1B7[field])
    device = parse_device(args.device)
    if args.variants is None:
        args.variants = list(VARIANTS) if device.type == "cuda" else CPU_DEFAULT
    else:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        parser.error(f"--variants must list some of {list(VARIANTS)}, got {bad or args.variants}")
    if args.repeats < 1 or args.warmup < 0 or args.memory_jobs < 1:
        parser.error("--repeats and --memory-jobs must be >= 1, --warmup >= 0")
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    return args


def unsupported(name: str, device: torch.device) -> str | None:
    """Why `name` cannot run on `device`, or None."""
    precision = VARIANTS[name][0]
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "this GPU has no native bf16"
    if device.type == "cpu" and VARIANTS[name][1] == torch.float16:
        return "train.py keeps float32 base weights for fp16 on a CPU"
    return None


def build_base(args, device: torch.device, dtype: torch.dtype) -> BloomForCausalLM:
    """A randomly initialised BLOOM in `dtype`, built directly on `device` (no 7 GB detour through the CPU)."""
    torch.manual_seed(0)
    config = bloom_config(args)
    with torch.device(device):
        model = BloomForCausalLM(config)
    return model.to(dtype)


def add_lora(model: torch.nn.Module, args, checkpointing: bool = False) -> LoraModelForCasualLM:
    """LoRA as train.py adds it (build_lora_model), with non-zero B values."""
    torch.manual_seed(1)
    settings = TrainConfig(lora_r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules="query_key_value",
                           gradient_checkpointing=checkpointing)
    lora_model = train.build_lora_model(model, settings, "random BLOOM")
    with torch.no_grad():  # B away from zero (its init), so the adapter takes part in the loss check
        for name, param in lora_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    return lora_model.train()


def make_batch(args, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    targets = next_token_labels(batch)
    return {"input_ids": ids.to(device), "attention_mask": batch["attention_mask"].to(device),
            "targets": targets.to(device), "tokens": int((targets != IGNORE_INDEX).sum())}


def step_function(model: LoraModelForCasualLM, precision: str, batch: dict, device: torch.device):
    """train.py's optimizer step for one micro-batch; returns a function that runs it and returns its seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")  # as train.py builds it
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def run_step() -> float:
        synchronize(device)
        start = time.perf_counter()
        with train.autocast_context(precision, device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
        loss = sum_token_loss(logits, batch["targets"], overwrite_logits=True) / batch["tokens"]
        scaler.scale(loss).backward()
        del logits  # as train.py: the gradient went into them, and they are freed at once
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start

    return run_step


def eval_loss(model: LoraModelForCasualLM, precision: str, batch: dict, device: torch.device) -> float:
    """The token-mean loss on `batch` under `precision`'s autocast, in eval mode (no dropout)."""
    model.eval()
    with torch.no_grad(), train.autocast_context(precision, device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train()
    return float(sum_token_loss(logits, batch["targets"])) / batch["tokens"]


def model_groups(names: list[str]) -> list[list[str]]:
    """The variants that share one model (the same base-weight dtype and checkpointing), in the order of `names`."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        groups.setdefault(VARIANTS[name][1:], []).append(name)
    return list(groups.values())


def prepare(args, device: torch.device, names: list[str], batch: dict) -> tuple[dict, dict, dict]:
    """Build the models `names` need, one per group of `model_groups` (with identical adapter values: add_lora
    seeds them); for each variant, its step function, its loss on `batch` and the bytes it saves for backward."""
    steps, losses, saved = {}, {}, {}
    for group in model_groups(names):
        _, dtype, checkpointing = VARIANTS[group[0]]
        model = add_lora(build_base(args, device, dtype), args, checkpointing)
        for name in group:
            precision = VARIANTS[name][0]
            losses[name] = eval_loss(model, precision, batch, device)
            saved[name] = saved_for_backward_bytes(model, precision, batch, device)
            steps[name] = step_function(model, precision, batch, device)
    return steps, losses, saved


def time_variants(args, device: torch.device, names: list[str], batch: dict) -> tuple[dict, dict, dict, bool]:
    """Time every variant, all interleaved round by round. If their models do not fit in memory together
    (BLOOM-1b7's shape on a 16 GB T4: 6.9 GB per float32 copy, 3.4 GB per half one), the variants of each model
    are interleaved instead, one model after another.

    Returns:
        seconds of each round, loss and bytes saved for backward, each by variant; whether all were timed together.
    """
    try:
        return *time_in_turn(args, device, [names], batch), True
    except torch.OutOfMemoryError:
        pass
    # Out of the except block: until it ended, its traceback kept time_in_turn's frame, and so the models, alive.
    release_memory(device)
    print("the variants' models do not fit in memory together: timing them one model at a time", file=sys.stderr)
    return *time_in_turn(args, device, model_groups(names), batch), False


def time_in_turn(args, device: torch.device, parts: list[list[str]], batch: dict) -> tuple[dict, dict, dict]:
    """Each list of variants in `parts` built and timed (interleaved) in turn, its models freed before the next."""
    times, losses, saved = {}, {}, {}
    for part in parts:
        steps, part_losses, part_saved = prepare(args, device, part, batch)
        times |= interleave(steps, args.repeats, args.warmup, progress=True)
        losses |= part_losses
        saved |= part_saved
        steps = None
        release_memory(device)
    return times, losses, saved


def release_memory(device: torch.device) -> None:
    """Free the dropped models now (reference cycles included) and hand their memory back to the GPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- memory ------------------------------------------------------------------------------------------------------

def saved_for_backward_bytes(model: LoraModelForCasualLM, precision: str, batch: dict, device: torch.device) -> int:
    """Bytes of the tensors autograd keeps from the forward pass for the backward pass (activations, and the
    low-precision weight copies autocast makes), each storage counted once; the parameters themselves are not
    counted. Exact and independent of the allocator, unlike a process's peak memory: this is the part that
    gradient checkpointing shrinks (it keeps only each block's input and recomputes the rest)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with train.autocast_context(precision, device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
        sum_token_loss(logits, batch["targets"])
    return sum(kept.values())


def measure_memory(args) -> dict:
    """In this (fresh) process: build one variant, run two steps, return its peak memory in bytes."""
    device, name = torch.device(args.device), args.measure_memory
    _, dtype, checkpointing = VARIANTS[name]
    model = add_lora(build_base(args, device, dtype), args, checkpointing)
    batch = make_batch(args, device)
    step = step_function(model, VARIANTS[name][0], batch, device)
    return peak_memory(lambda: (step(), step()), device)


# --- report --------------------------------------------------------------------------------------------------------

def markdown(args, argv, device, names, skipped, times, loss_diffs, saved, memory, together) -> str:
    tokens = args.batch * args.seq
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    median = {name: statistics.median(times[name]) for name in names}
    has_fp32 = "fp32" in times  # the reference of the speed-up and loss columns
    speedup = {name: statistics.median(f / t for f, t in zip(times["fp32"], times[name])) if has_fp32
               else float("nan") for name in names}
    method = next(iter(memory.values()))["method"] if memory else None
    memory_header = {"cuda": "peak GPU memory GiB (max_memory_allocated)",
                     "vmhwm": "peak RSS GiB (VmHWM) | of which the step GiB",
                     "ru_maxrss": "peak RSS GiB (ru_maxrss, whole process)", None: "peak memory"}[method]
    header = f"| variant | PRECISION | base weights | s / step median [min-max] | tokens/s | speed-up vs fp32 | " \
             f"loss vs fp32 | saved for backward MiB | {memory_header} |"
    lines = [
        "# LoRA training step by precision: time and memory",
        "",
        f"Reproduce: `{command_line('bench_precision.py', argv)}`",
        "",
        f"- Device: {args.device} ({describe_device(device)}); torch {torch.__version__}, "
        f"transformers {transformers.__version__}.",
        f"- Model: BLOOM-shaped, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}"
        + (" (BLOOM-1b7's config)" if args.real_shape else " (small vocabulary on purpose, so lm_head does not "
           "dominate)") + "; random weights.",
        f"- Step: train.py's optimizer step on {args.batch} x {args.seq} tokens (autocast forward, token-mean loss, "
        f"GradScaler where fp16, unscale, clip, AdamW, update); LoRA r={args.r}, alpha={2 * args.r}, dropout 0.05 "
        "on query_key_value, adapters float32.",
        f"- {args.repeats} interleaved rounds after {args.warmup} warm-up round(s); speed-up = median over rounds "
        "of the per-round ratio. Loss vs fp32: the same batch and adapter, eval mode. Saved for backward: what "
        "autograd keeps from the forward pass (activations; see saved_for_backward_bytes)."
        + (" No warm-up round: each variant's first step pays one-off costs (allocation, page faults), so these "
           "times do not compare variants." if args.warmup == 0 else "")
        + ("" if together else " The variants' models did not fit in memory together, so the variants of each "
           "model were interleaved, one model after another: variants with different base weights or "
           "checkpointing were timed in different rounds."),
        "- Memory: each variant in a fresh process of its own, two steps; "
        + {"cuda": "torch.cuda.max_memory_allocated after the model is built (weights + activations + gradients "
                   "+ optimizer state).",
           "vmhwm": "peak resident set size (VmHWM, reset once the model is built; includes ~0.3 GB of Python and "
                    "torch libraries); 'of which the step' is the peak minus the resident size before step 1.",
           "ru_maxrss": "resource.getrusage ru_maxrss of the whole process.",
           None: "not measured (--no-memory)." if args.no_memory else "not measured yet: this table was written "
                 "after the timing, and the run stopped before the memory processes finished."}[method],
        "",
        header,
        "|---" * (header.count("|") - 1) + "|",
    ]
    for name in names:
        precision, dtype, _ = VARIANTS[name]
        t = times[name]
        if method == "vmhwm":
            mem = f"{gib(memory[name]['peak'])} | {gib(memory[name]['peak'] - memory[name]['before'])}"
        elif method:
            mem = gib(memory[name]["peak"])
        else:
            mem = "-"
        versus_fp32 = f"{speedup[name]:.2f}x | {loss_diffs[name]:+.1e}" if has_fp32 else "- | -"
        saved_mib = saved[name] / 2**20
        saved_cell = f"{saved_mib:,.0f}" if saved_mib >= 100 else f"{saved_mib:.3g}"
        lines.append(f"| {name} | {precision} | {str(dtype).removeprefix('torch.')} | {median[name]:.3f} "
                     f"[{min(t):.3f}-{max(t):.3f}] | {tokens / median[name]:,.0f} | {versus_fp32} "
                     f"| {saved_cell} | {mem} |")
    for name, why in skipped.items():
        lines += ["", f"Skipped {name}: {why}."]
    target_name, target = SPEEDUP_TARGET
    if device.type == "cpu" and target_name in speedup and "fp32" in speedup:
        verdict = "holds" if speedup[target_name] >= target else "does NOT hold"
        lines += ["", f"Target (CPU): {target_name} >= {target}x faster than fp32: {verdict} "
                      f"({speedup[target_name]:.2f}x)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = device_from_args(args)
    if answer_memory_request(measure_memory, args):
        return
    skipped = {name: why for name in args.variants if (why := unsupported(name, device))}
    names = [name for name in args.variants if name not in skipped]
    if not names:
        raise SystemExit(f"error: none of --variants can run on {args.device}: "
                         + "; ".join(f"{name}: {why}" for name, why in skipped.items()))
    batch = make_batch(args, device)
    try:
        times, losses, saved, together = time_variants(args, device, names, batch)
    except torch.OutOfMemoryError:
        raise SystemExit(f"error: out of memory on {args.device} even with one model at a time, at batch "
                         f"{args.batch} x {args.seq}: try a smaller --batch or --seq") from None
    reference = losses.get("fp32", losses[names[0]])
    loss_diffs = {name: loss / reference - 1 for name, loss in losses.items()}
    table = markdown(args, argv, device, names, skipped, times, loss_diffs, saved, {}, together)
    write_text_atomically(args.out, table)  # the timing is kept even if the memory processes do not finish
    if not args.no_memory:
        memory = memory_of_variants(__file__, argv, names, args.memory_jobs)
        table = markdown(args, argv, device, names, skipped, times, loss_diffs, saved, memory, together)
        write_text_atomically(args.out, table)
    print(table)


if __name__ == "__main__":
    main()
