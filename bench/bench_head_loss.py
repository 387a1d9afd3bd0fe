"""Benchmark the output layer and the loss together: token_loss.sum_linear_token_loss against the logits paths.

Reproduce (from the repository root)::

    python bench/bench_head_loss.py                      # CPU: vocabularies 16,384 and 250,880
    python bench/bench_head_loss.py --device cuda --hidden 2048 --seq 512

A step is what a training step spends after the last block: from the last hidden states (batch x seq x hidden,
float32, requiring grad) through the output layer (a frozen vocab x hidden weight) to the summed next-token loss, and
back to the hidden states' gradient. Under bf16 autocast (the weight in bf16, as train.py's CPU base) or in fp32:

- usual: `F.linear`, then `F.cross_entropy` on the shifted logits upcast to float32 (transformers' ForCausalLMLoss,
  the recipe's path);
- logits: `F.linear`, then token_loss.sum_token_loss writing the gradient into the logits (train.py before
  sum_linear_token_loss, and still for models it does not know);
- fused: token_loss.sum_linear_token_loss, which never holds the whole logits.

Random targets, 10 % skipped. Timing: warm-up rounds, then `--repeats` interleaved rounds (bench.common.interleave);
usual / variant = median over rounds of the per-round ratio. Before timing, each variant's loss and gradient are
compared with usual's. Peak memory of the whole logits (batch x seq x vocab in the logits' dtype) is given for scale;
the end-to-end memory of a training run is bench/bench_vs_hf_trainer.py --memory's. Writes bench/results/head_loss.md
(atomically) and prints it.
"""

import argparse
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
    command_line,
    describe_device,
    device_from_args,
    interleave,
    synchronize,  # noqa: E402
)
from support.alpaca_data import IGNORE_INDEX # noqa: E402
from support.atomic import write_text_atomically # noqa: E402
from support.token_loss import sum_linear_token_loss, sum_token_loss # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def usual(hidden, weight, targets):
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def logits_path(hidden, weight, targets):
    logits = F.linear(hidden, weight)
    with torch.autocast(logits.device.type, enabled=False):  # as token_loss.causal_lm_token_loss calls it
        return sum_token_loss(logits, targets, overwrite_logits=True)


VARIANTS = {"usual": usual, "logits": logits_path, "fused": sum_linear_token_loss}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocabs", default="16384,250880", help="comma-separated vocabulary sizes")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, of: fp32, bf16")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (each times every variant once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    add_device_arguments(parser)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "head_loss.md")
    args = parser.parse_args(argv)
    args.vocabs = [int(v) for v in args.vocabs.split(",") if v.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not args.dtypes or any(d not in DTYPES for d in args.dtypes):
        parser.error(f"--dtypes must list some of {list(DTYPES)}, got {args.dtypes}")
    if args.repeats < 1 or args.warmup < 0 or min([args.batch, args.seq - 1, args.hidden, *args.vocabs]) < 1:
        parser.error("--repeats, --batch, --hidden, --vocabs must be >= 1, --seq >= 2, --warmup >= 0")
    return args


def make_inputs(args, vocab: int, dtype: torch.dtype, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, vocab, (args.batch, args.seq - 1), generator=generator)
    targets[torch.rand(targets.shape, generator=generator) < 0.1] = IGNORE_INDEX
    hidden = torch.randn(args.batch, args.seq, args.hidden, generator=generator)
    weight = torch.randn(vocab, args.hidden, generator=generator) * args.hidden**-0.5
    return hidden.to(device).requires_grad_(), weight.to(device, dtype), targets.to(device)


def run_once(loss_fn, hidden, weight, targets, dtype, device) -> tuple[float, torch.Tensor]:
    """Forward and backward of one variant (under autocast for bf16); its loss and the hidden states' gradient."""
    hidden.grad = None
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_fn(hidden, weight, targets)
    loss.backward()
    return loss.item(), hidden.grad


def timed(loss_fn, inputs, dtype, device):
    def run_step() -> float:
        synchronize(device)
        start = time.perf_counter()
        run_once(loss_fn, *inputs, dtype, device)
        synchronize(device)
        return time.perf_counter() - start
    return run_step


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = device_from_args(args)
    steps, checks = {}, {}
    for vocab in args.vocabs:
        for dtype_name in args.dtypes:
            dtype, inputs = DTYPES[dtype_name], make_inputs(args, vocab, DTYPES[dtype_name], device)
            reference_loss, reference_grad = run_once(usual, *inputs, dtype, device)
            reference_grad = reference_grad.clone()
            for name, loss_fn in VARIANTS.items():
                loss, grad = run_once(loss_fn, *inputs, dtype, device)
                checks[name, vocab, dtype_name] = (abs(loss / reference_loss - 1),
                                                   ((grad - reference_grad).abs().max()
                                                    / reference_grad.abs().max()).item())
                steps[name, vocab, dtype_name] = timed(loss_fn, inputs, dtype, device)
    times = interleave(steps, args.repeats, args.warmup, progress=True)
    header = "| vocabulary | dtype | variant | ms / step median [min-max] | usual / variant | vs usual: loss, grad |"
    lines = ["# The output layer and the loss: token_loss.sum_linear_token_loss vs the logits paths", "",
             f"Reproduce: `{command_line('bench_head_loss.py', argv)}`", "",
             f"- Device: {args.device} ({describe_device(device)}); torch {torch.__version__}.",
             f"- Hidden states {args.batch} x {args.seq} x {args.hidden} (float32, requiring grad), a frozen output "
             "layer (bf16 under bf16 autocast); random targets, 10 % skipped; a step is forward and backward.",
             f"- {args.repeats} interleaved rounds after {args.warmup} warm-up round(s).", "",
             header, "|---" * (header.count("|") - 1) + "|"]
    for (name, vocab, dtype_name), t in times.items():
        ratio = statistics.median(u / v for u, v in zip(times["usual", vocab, dtype_name], t))
        lines.append(f"| {vocab:,} | {dtype_name} | {name} | {1e3 * statistics.median(t):.1f} "
                     f"[{1e3 * min(t):.1f}-{1e3 * max(t):.1f}] | {ratio:.2f}x | "
                     "{:.1e}, {:.1e} |".format(*checks[name, vocab, dtype_name]))
    table = "\n".join(lines) + "\n"
    write_text_atomically(args.out, table)
    print(table)


if __name__ == "__main__":
    main()
