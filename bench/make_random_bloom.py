"""Write a model folder with BLOOM-1b7's shapes and random weights, to time train.py end to end at the real size
without downloading bigscience/bloom-1b7 (3.4 GB).

Reproduce (from the repository root)::

    python bench/make_random_bloom.py --out /tmp/bloom-1b7-random
    DEBUG=true MIX_PREC_TRAIN=true MODEL_PATH=/tmp/bloom-1b7-random MAX_STEPS=10 python train.py

The folder holds BLOOM-1b7's config (vocab 250,880, hidden 2048, 24 layers, 16 heads; --vocab, --hidden, --layers
and --heads make a smaller BLOOM-shaped model, as bench/bench_vs_hf_trainer.py does), random weights (float16,
safetensors, built on the GPU when there is one) and models/tiny-bloom's tokenizer. That tokenizer's 4,096 ids fit
in the large embedding, and its smaller vocabulary splits Alpaca's text into more tokens than BLOOM's would, so
batches are a little longer than with the real model (timings and memory on the safe side). The losses mean
nothing: only the speed and memory of the run are real.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import BloomConfig, BloomForCausalLM  # noqa: E402

from bench.common import BLOOM_1B7, SHAPE_ARGUMENTS  # noqa: E402
from support.atomic import atomic_write # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (must not exist)")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "models" / "tiny-bloom")
    for argument, field in SHAPE_ARGUMENTS.items():
        parser.add_argument(f"--{argument}", type=int, default=BLOOM_1B7[field], help=f"default {BLOOM_1B7[field]}")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"--out {args.out} already exists")
    missing = [name for name in TOKENIZER_FILES if not (args.tokenizer / name).is_file()]
    if missing:
        parser.error(f"--tokenizer {args.tokenizer}: no {', '.join(missing)} there")
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    with atomic_write(args.out, folder=True) as staging:
        write_folder(staging, args.tokenizer, {field: getattr(args, argument)
                                               for argument, field in SHAPE_ARGUMENTS.items()})
    print(f"wrote {args.out}")


def write_folder(folder: Path, tokenizer: Path, shape: dict | None = None) -> None:
    """A BLOOM of `shape` (BloomConfig fields; default BLOOM-1b7's) with random float16 weights and the tokenizer
    files of the folder `tokenizer`, written into `folder`."""
    # BLOOM's special-token ids (unk 0, bos 1, eos 2, pad 3), which models/tiny-bloom's tokenizer shares
    config = BloomConfig(**(shape or BLOOM_1B7), bos_token_id=1, eos_token_id=2, pad_token_id=3, unk_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = BloomForCausalLM(config).to(torch.float16)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer / name, folder / name)


if __name__ == "__main__":
    main()
