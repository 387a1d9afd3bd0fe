"""Benchmark the data pipeline: padding waste with and without length grouping, tokenization time, cache.

Reproduce (from the repository root)::

    python bench/bench_data.py

Measures, with the tiny-bloom tokenizer at max_length 512 on the shipped 2,000-record sample:
  1. the fraction of real (non-pad) tokens in padded batches, random batches (DistributedSampler, as train.py
     uses without GROUP_BY_LENGTH) against LengthGroupedSampler;
  2. the time to tokenize 52,000 records (the sample repeated 26 times, about the size of the full Alpaca
     set) into an empty cache, and to load the same result from the cache on a second call.
Writes a markdown table to bench/results/data.md (atomically) and prints it.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from bench.common import command_line  # noqa: E402
from prompter import Prompter  # noqa: E402
from support import alpaca_data as ad # noqa: E402
from support import data_sources # noqa: E402
from support.atomic import write_text_atomically # noqa: E402


def parse_args(argv=None):
    """The command line (`argv` without the program name; None reads sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default=str(ROOT / "models" / "tiny-bloom"), help="tokenizer folder or id")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="epochs averaged for the padding figures")
    parser.add_argument("--repeat", type=int, default=26, help="copies of the sample for the timing")
    parser.add_argument("--num-proc", type=int, default=1, help="datasets.map processes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data.md")
    return parser.parse_args(argv)


def real_token_fraction(dataset, sampler, batch_size, collate, epochs):
    """Fraction of non-pad tokens over all batches the DataLoader builds, averaged over `epochs`."""
    real = total = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate):
            real += int(batch["attention_mask"].sum())
            total += batch["attention_mask"].numel()
    return real / total


def timed(fn):
    """Run `fn()` and return (its result, wall seconds, CPU seconds of this process and its threads)."""
    cpu, start = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start, time.process_time() - cpu


def main(argv=None):
    """Run the benchmark, write the table and print it."""
    args = parse_args(argv)
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    prompter = Prompter()
    source = str(data_sources.DEBUG_SAMPLE.relative_to(ROOT))
    raw = data_sources.load_records(str(data_sources.DEBUG_SAMPLE), ROOT / ".cache")
    records, stats = ad.validate_records(raw, source)

    with tempfile.TemporaryDirectory() as cache:
        # 1. Padding waste on the sample.
        dataset = ad.tokenize_records(records, tokenizer, prompter, args.max_length, False, cache)
        lengths = list(dataset["length"])
        collate = ad.PadCollator(tokenizer)
        random_fraction = real_token_fraction(
            dataset, DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0),
            args.batch_size, collate, args.epochs)
        grouped_fraction = real_token_fraction(
            dataset, ad.LengthGroupedSampler(lengths, args.batch_size, seed=0), args.batch_size, collate, args.epochs)

        # 2. Tokenizing the sample repeated to full-Alpaca size, into an empty cache, then from the cache.
        big_raw = raw * args.repeat
        (big, _), validate_s, _ = timed(lambda: ad.validate_records(big_raw, source))
        big_cache = Path(cache) / "big"
        run = lambda: ad.tokenize_records(big, tokenizer, prompter, args.max_length, False, big_cache,  # noqa: E731
                                          num_proc=args.num_proc)
        load_before = os.getloadavg()[0]
        cold, cold_s, cold_cpu = timed(run)
        warm, warm_s, warm_cpu = timed(run)
        assert len(cold) == len(warm)

    n_batches = -(-len(lengths) // args.batch_size)
    table = f"""# Data pipeline benchmark

Reproduce: `{command_line("bench_data.py", argv)}`

Tokenizer `{Path(args.tokenizer).name}` (vocab {len(tokenizer):,}), max_length {args.max_length}, \
TRAIN_ON_INPUTS false. {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, \
transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, datasets {datasets.__version__}.

| measure | value | target |
| --- | --- | --- |
| real-token fraction, random batches (DistributedSampler) | {random_fraction:.3f} | |
| real-token fraction, LengthGroupedSampler | {grouped_fraction:.3f} | >= 0.95 |
| validate {len(big_raw):,} records | {validate_s:.2f} s | |
| tokenize {len(big):,} records, empty cache (num_proc={args.num_proc}), wall | {cold_s:.2f} s | <= 10 s |
| same, CPU time (all threads) | {cold_cpu:.2f} s | |
| same call again, loaded from cache, wall | {warm_s:.2f} s | <= 1 s |
| same, CPU time | {warm_cpu:.2f} s | |

Padding figures: {stats['kept']:,} examples of the sample (mean length {sum(lengths) / len(lengths):.0f}, \
max {max(lengths)} tokens), batch size {args.batch_size} ({n_batches} batches per epoch), \
averaged over {args.epochs} epochs. Timings include hashing the records and tokenizer for the cache key; \
the {args.repeat}-fold sample is {len(big_raw):,} records ({len(big):,} after dropping empty outputs). \
Load average (1 min) when the timing started: {load_before:.1f} on {os.cpu_count()} CPUs; wall times grow \
with it when other work shares the machine, CPU times much less.
"""
    write_text_atomically(args.out, table)
    print(table)


if __name__ == "__main__":
    main()
