"""Benchmark the training loss at BLOOM's vocabulary: token_loss.sum_token_loss against the usual way.

Reproduce (from the repository root)::

    python bench/bench_loss.py --threads 1          # CPU
    python bench/bench_loss.py --device cuda        # a GPU (add --seq 512 for the assignment's MAX_LENGTH)

The usual way is `F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, reduction="sum")` (what
transformers' ForCausalLMLoss does, and train.py did before support/token_loss.py): a shifted copy of the logits, a
float32 copy, a float32 log-softmax kept for backward. Ours computes the same loss from the logits as they are, in
float32 blocks, keeping one float per token; "ours-in-place" (what train.py's step uses) also writes the gradient
into the logits' memory instead of a new tensor (the logits are restored before each step, outside the timing).

Input: logits of `--batch` x `--seq` x `--vocab` (default 4 x 256 x 250,880: BLOOM's vocabulary, the default
BATCH_SIZE, about twice the mean Alpaca example), requiring grad, in float32 (PRECISION=fp32) or bfloat16 (what
lm_head gives under bf16 autocast; fp16 costs the same bytes); random targets, 10 % of them skipped (-100).
A step is the loss's forward and backward; the gradient of the logits is made either way.

Timing: warm-up rounds, then `--repeats` interleaved rounds (the order rotating, so drift in the machine's load
hits every variant alike); ratio = median over rounds of usual / ours. Before timing, the two losses and gradients
are compared. Memory: each variant in a fresh process of its own (`--memory-jobs N`: N at a time), one step; the
peak above the memory in use once the logits exist (on a CPU the peak resident set size, VmHWM; on a GPU
max_memory_allocated), given also in units of the logits' own size.

Writes a markdown table to bench/results/loss.md (atomically) once the timing is done, again with the memory,
and prints it.
"""

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import (
    add_device_arguments,
    answer_memory_request,
    command_line,
    describe_device,
    device_from_args,
    interleave,  # noqa: E402
    memory_of_variants,
    peak_memory,
    synchronize,
)
from support.alpaca_data import IGNORE_INDEX # noqa: E402
from support.atomic import write_text_atomically # noqa: E402
from support.token_loss import sum_token_loss # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def usual_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


LOSSES = {"usual": usual_loss, "ours": sum_token_loss,
          "ours-in-place": functools.partial(sum_token_loss, overwrite_logits=True)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=250880)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, of: fp32, bf16")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (each times every variant once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    add_device_arguments(parser)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--memory-jobs", type=int, default=1, help="memory processes run at a time")
    parser.add_argument("--measure-memory", metavar="VARIANT", help=argparse.SUPPRESS)  # internal: "ours bf16"
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "loss.md")
    args = parser.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not args.dtypes or any(d not in DTYPES for d in args.dtypes):
        parser.error(f"--dtypes must list some of {list(DTYPES)}, got {args.dtypes}")
    if args.repeats < 1 or args.warmup < 0 or min(args.batch, args.seq - 1, args.vocab, args.memory_jobs) < 1:
        parser.error("--repeats, --batch, --vocab, --memory-jobs must be >= 1, --seq >= 2, --warmup >= 0")
    return args


def make_inputs(args, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq - 1), generator=generator)
    targets[torch.rand(targets.shape, generator=generator) < 0.1] = IGNORE_INDEX
    with torch.device(device):  # drawn on the device: no CPU copy of the logits left behind
        torch.manual_seed(1)
        logits = (torch.randn(args.batch, args.seq, args.vocab) * 2).to(dtype).requires_grad_()
    return logits, targets.to(device)


def step_function(loss_fn, logits: torch.Tensor, pristine: torch.Tensor, targets: torch.Tensor,
                  device: torch.device):
    """One forward and backward of `loss_fn`, timed; the logits are first set back to `pristine` (untimed), since
    the in-place variant leaves its gradient in them."""
    def run_step() -> float:
        logits.grad = None
        with torch.no_grad():
            logits.copy_(pristine)
        synchronize(device)
        start = time.perf_counter()
        loss_fn(logits, targets).backward()
        synchronize(device)
        return time.perf_counter() - start

    return run_step


def compare(logits: torch.Tensor, pristine: torch.Tensor, targets: torch.Tensor) -> dict[str, tuple[float, float]]:
    """For each of our variants: (relative loss difference, largest gradient difference relative to the largest
    gradient) against the usual way."""
    results = {}
    for name, loss_fn in LOSSES.items():
        logits.grad = None
        with torch.no_grad():
            logits.copy_(pristine)
        loss = loss_fn(logits, targets)
        loss.backward()
        results[name] = (loss.item(), logits.grad.float())
    logits.grad = None
    usual, usual_grad = results.pop("usual")
    return {name: (abs(ours / usual - 1), ((grad - usual_grad).abs().max() / usual_grad.abs().max()).item())
            for name, (ours, grad) in results.items()}


def measure_memory(args) -> dict:
    """In this (fresh) process: one step of one variant ("ours bf16"); its peak memory in bytes."""
    device = torch.device(args.device)
    name, dtype_name = args.measure_memory.split()
    logits, targets = make_inputs(args, DTYPES[dtype_name], device)
    pristine = logits.detach().clone()  # in use before the step, so not counted in its peak
    result = peak_memory(step_function(LOSSES[name], logits, pristine, targets, device), device)
    return {**result, "logits": logits.numel() * logits.element_size()}


def markdown(args, argv, device, times, checks, memory) -> str:
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    header = ("| logits | loss | s / step median [min-max] | usual / ours time | vs usual: loss, gradient | "
              "peak memory above the logits GiB | in logits' sizes |")
    lines = [
        "# The training loss at BLOOM's vocabulary: support/token_loss.py vs upcast + F.cross_entropy",
        "",
        f"Reproduce: `{command_line('bench_loss.py', argv)}`",
        "",
        f"- Device: {args.device} ({describe_device(device)}); torch {torch.__version__}.",
        f"- Logits {args.batch} x {args.seq} x {args.vocab:,}, requiring grad; random targets, 10 % skipped. A step "
        "is the loss's forward and backward (the logits' gradient is made by both).",
        f"- {args.repeats} interleaved rounds after {args.warmup} warm-up round(s); usual / ours = median over "
        "rounds of the per-round ratio.",
        "- Memory: each variant in a fresh process of its own, one step; the peak minus the memory in use once the "
        "logits exist (" + {"cuda": "torch.cuda.max_memory_allocated", "vmhwm": "peak resident set size, VmHWM",
                             "ru_maxrss": "ru_maxrss: the whole process, not above the logits",
                             None: "not measured" if args.no_memory else "not measured yet: the run stopped "
                                   "before the memory processes finished"}[
                                       next(iter(memory.values()))["method"] if memory else None]
        + "); it includes the logits' gradient where that is a new tensor (usual, ours; ours-in-place writes it "
        "into the logits).",
        "",
        header,
        "|---" * (header.count("|") - 1) + "|",
    ]
    for dtype_name in args.dtypes:
        for name in LOSSES:
            variant = f"{name} {dtype_name}"
            t = times[variant]
            if variant in memory and memory[variant]["before"] is not None:
                above = memory[variant]["peak"] - memory[variant]["before"]
                mem = f"{gib(above)} | {above / memory[variant]['logits']:.1f}"
            else:
                mem = f"{gib(memory[variant]['peak'])} | -" if variant in memory else "- | -"
            ratio = statistics.median(u / o for u, o in zip(times[f"usual {dtype_name}"], t))
            versus = "{:.1e}, {:.1e}".format(*checks[dtype_name][name]) if name != "usual" else "(reference)"
            lines.append(f"| {dtype_name} | {name} | {statistics.median(t):.3f} [{min(t):.3f}-{max(t):.3f}] | "
                         f"{f'{ratio:.2f}x' if name != 'usual' else '1'} | {versus} | {mem} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = device_from_args(args)
    if answer_memory_request(measure_memory, args):
        return
    steps, checks = {}, {}
    for dtype_name in args.dtypes:
        logits, targets = make_inputs(args, DTYPES[dtype_name], device)
        pristine = logits.detach().clone()
        checks[dtype_name] = compare(logits, pristine, targets)
        for name, loss_fn in LOSSES.items():
            steps[f"{name} {dtype_name}"] = step_function(loss_fn, logits, pristine, targets, device)
    times = interleave(steps, args.repeats, args.warmup, progress=True)
    del steps
    table = markdown(args, argv, device, times, checks, {})
    write_text_atomically(args.out, table)  # the timing is kept even if the memory processes do not finish
    if not args.no_memory:
        memory = memory_of_variants(__file__, argv, list(times), args.memory_jobs)
        table = markdown(args, argv, device, times, checks, memory)
        write_text_atomically(args.out, table)
    print(table)


if __name__ == "__main__":
    main()
