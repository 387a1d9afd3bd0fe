"""Benchmark the CPU levers of a packed training step inside one train.py run, step by step.

Reproduce (from the repository root)::

    python bench/bench_packed_levers.py

The run is bench/bench_vs_hf_trainer.py's `--packing` side of ours (the same random BLOOM, records and settings:
bf16, 4 packed rows of up to 256 tokens x 2 accumulation, 1,000 records), for `--epochs` epochs (default 3: each
variant then times about 43 steps, enough that the mix of batches each gets evens out). Its optimizer steps take
four variants in turn, so that all of them see the same process and machine load:

- neither: packed rows' attention row by row under the block-diagonal mask, the output layer in blocks of
  token_loss.CHUNK_ELEMENTS logits (what a GPU does);
- per-example attention: fused_bloom.PER_EXAMPLE_ATTENTION_DEVICES includes the CPU;
- small output-layer blocks: token_loss.CPU_BLOCK_ELEMENTS / CPU_MIN_BLOCK_ROWS as shipped;
- both (train.py's default on a CPU).

Each variant's figure is its steps' time per real token (steps 4 on; a step's time is optimizer_step's wall time).
Separate processes differ by up to +-5 % on a shared 2-core machine, more than these levers: hence one process.
Writes bench/results/packed_levers.md (with `_fp32`, `_1024` and the like for other --precision and --max-length;
atomically) and prints it.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import bench_vs_hf_trainer as versus  # noqa: E402
from bench.common import RESULTS, command_line  # noqa: E402
from support import fused_bloom, token_loss  # noqa: E402
from support.atomic import write_text_atomically  # noqa: E402
import torch  # noqa: E402

VARIANTS = {  # name: (PER_EXAMPLE_ATTENTION_DEVICES, CPU_BLOCK_ELEMENTS, CPU_MIN_BLOCK_ROWS)
    "neither": ((), token_loss.CHUNK_ELEMENTS, 0),
    "per-example attention": (("cpu",), token_loss.CHUNK_ELEMENTS, 0),
    "small output-layer blocks": ((), token_loss.CPU_BLOCK_ELEMENTS, token_loss.CPU_MIN_BLOCK_ROWS),
    "both": (("cpu",), token_loss.CPU_BLOCK_ELEMENTS, token_loss.CPU_MIN_BLOCK_ROWS),
}
FIRST_TIMED_STEP = 4


def run(work: Path, epochs: int, precision: str, max_length: int) -> dict[str, list[float]]:
    """train.py's packed run of bench_vs_hf_trainer, the variants taking its steps in turn; returns each variant's
    [seconds, real tokens]."""
    import train

    args = versus.parse_args(["--packing", "--precision", precision, "--max-length", str(max_length)])
    model = versus.model_folder(args)
    files = versus.write_records(args, model, work)
    _, env, _ = versus.side_command("ours", args, model, files, work / "run")
    os.environ.clear()
    os.environ.update(env, NUM_EPOCHS=str(epochs))
    totals = {name: [0.0, 0] for name in VARIANTS}
    names, steps = list(VARIANTS), [0]
    optimizer_step = train.Trainer.optimizer_step

    def timed_step(trainer, micro_batches):
        steps[0] += 1
        name = names[steps[0] % len(names)]
        fused_bloom.PER_EXAMPLE_ATTENTION_DEVICES, token_loss.CPU_BLOCK_ELEMENTS, token_loss.CPU_MIN_BLOCK_ROWS = (
            VARIANTS[name])
        started = time.perf_counter()
        metrics = optimizer_step(trainer, micro_batches)
        if steps[0] >= FIRST_TIMED_STEP:
            totals[name][0] += time.perf_counter() - started
            totals[name][1] += metrics["tokens"]
        return metrics

    train.Trainer.optimizer_step = timed_step
    if train.main([]) != 0:  # the variables above, not this script's arguments
        raise SystemExit("error: the train.py run failed (its output is above)")
    return totals


def markdown(totals: dict[str, list[float]], args: argparse.Namespace) -> str:
    per_token = {name: seconds / max(tokens, 1) * 1e6 for name, (seconds, tokens) in totals.items()}
    rows = "\n".join(f"| {name} | {per_token[name]:.1f} | {totals[name][1]:,} | "
                     f"{per_token[name] / per_token['neither']:.3f} |" for name in VARIANTS)
    return ("# The CPU levers of a packed step, in one train.py run\n\n"
            f"Reproduce: `{command_line('bench_packed_levers.py')}`\n\n"
            f"- Device: {versus.cpu_matrix_features()}; torch {torch.__version__}.\n"
            f"- bench/bench_vs_hf_trainer.py's packed run of ours ({args.precision}, 4 rows of up to "
            f"{args.max_length} tokens x 2 accumulation, 1,000 records, {args.epochs} epoch(s)); its optimizer steps "
            f"take the variants in turn, from step {FIRST_TIMED_STEP} on.\n\n"
            "| variant | step time per real token, us | real tokens | / neither |\n"
            f"|---|---|---|---|\n{rows}\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-levers-") as work:
        text = markdown(run(Path(work), args.epochs, args.precision, args.max_length), args)
    name = "packed_levers" + "".join(f"_{part}" for part, default in ((args.precision, "bf16"), (args.max_length, 256))
                                     if part != default) + ".md"
    write_text_atomically(RESULTS / name, text)
    print(text)


if __name__ == "__main__":
    main()
