"""Benchmark generation speed (tokens/s) of the base model, the base with a merged LoRA adapter, and the base with
the same adapter unmerged.

Reproduce (from the repository root)::

    python bench/bench_generate.py                          # CPU, random BLOOM-shaped model (defaults below)
    python bench/bench_generate.py --device cuda            # same script on a GPU (bf16 there)
    python bench/bench_generate.py --model-path bigscience/bloom-1b7 --device cuda [--lora-weights DIR]

Model: by default a randomly initialised BLOOM-shaped model (hidden 1024, 4 layers, 16 heads, vocabulary 4096; built
from a config, nothing downloaded); `--model-path` loads a real one. Adapter: LoRA r=8, alpha=16 on query_key_value
with random, non-zero A and B (`--lora-weights` loads a trained one instead).

Three variants, from one set of base weights and one adapter:
  base      - the model alone;
  merged    - the adapter folded into the weights and the LoRA modules removed (`merge_and_unload`), which is what
              inference.py generates with: the same computation as the base, so merged / base should be ~1.00;
  unmerged  - the LoRA modules in place: each targeted layer also runs x -> A -> B and adds the result.

Each generation is greedy, from the same prompt (`--batch` x `--prompt-tokens` random token ids), with
min_new_tokens = max_new_tokens = `--new-tokens`, so every variant generates exactly the same number of tokens
whatever it predicts. Timing: warm-up rounds, then `--repeats` rounds that each time every variant once, the order
rotating from round to round, so drift in a shared machine's load hits all three alike. tokens/s = generated tokens
(batch x new tokens) / wall time of `generate` (prompt pass included). Ratios are medians over rounds of the
per-round ratio. Writes a markdown table to bench/results/generate.md (atomically) and prints it.

On a CPU shared with other jobs, `--threads 1` gives steadier numbers (see bench_lora.py's docstring).
"""

import argparse
import copy
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

import inference  # noqa: E402
from bench.common import (
    add_device_arguments,
    add_model_shape_arguments,
    bloom_config,
    command_line,
    describe_device,
    device_from_args,  # noqa: E402
    interleave,
    synchronize,
)
from lora_model import LoraConfig, LoraModelForCasualLM  # noqa: E402
from support.atomic import write_text_atomically # noqa: E402
from support.precision import DTYPES, resolve_precision  # noqa: E402

VARIANTS = ("base", "merged", "unmerged")


def parse_args(argv=None):
    """The command line (`argv` without the program name; None reads sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", help="real base model (hub id or folder); default: random BLOOM-shaped")
    parser.add_argument("--lora-weights", help="trained adapter folder; default: random adapter (--r, --alpha)")
    add_model_shape_arguments(parser)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--target", default="query_key_value", help="comma-separated target module names")
    parser.add_argument("--batch", type=int, default=1, help="prompts per generate call")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (min = max)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each times every variant once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    add_device_arguments(parser)
    parser.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                        help="auto = bf16/fp16 on a GPU, fp32 on the CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "generate.md")
    args = parser.parse_args(argv)
    for name in ("batch", "prompt_tokens", "new_tokens", "repeats", "r"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.model_path is None and args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    return args


def load_base(args, device: torch.device, precision: str) -> torch.nn.Module:
    if args.model_path:
        return inference.load_base_model(args.model_path, device, precision)
    torch.manual_seed(0)
    config = bloom_config(args)
    return BloomForCausalLM(config).to(device, DTYPES[precision]).eval()


def with_adapter(base: torch.nn.Module, args, adapter_values: dict | None) -> LoraModelForCasualLM:
    """A copy of `base` with the adapter: loaded from --lora-weights, or random (A and B both non-zero, so the
    merged weights really differ from the base's) and, given `adapter_values`, equal to an earlier copy's."""
    model = copy.deepcopy(base)
    if args.lora_weights:
        return LoraModelForCasualLM.from_pretrained(model, args.lora_weights)
    config = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=[t.strip() for t in args.target.split(",")],
                        init_lora_weights=False)
    lora = LoraModelForCasualLM(model, config)
    if adapter_values is not None:
        lora.load_adapter_weights(adapter_values)
    return lora.eval()


def build_variants(args, device: torch.device, precision: str) -> dict[str, torch.nn.Module]:
    base = load_base(args, device, precision)
    torch.manual_seed(1)
    unmerged = with_adapter(base, args, None)
    merged = with_adapter(base, args, unmerged.adapter_state_dict()).merge_and_unload()
    return {"base": base, "merged": merged, "unmerged": unmerged}


def make_prompt(args, base: torch.nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.prompt_tokens), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


@torch.inference_mode()
def time_generate(model, prompt: dict, args, device: torch.device) -> float:
    """Seconds for one greedy generate call of exactly --new-tokens tokens per prompt."""
    synchronize(device)
    start = time.perf_counter()
    output = model.generate(**prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            do_sample=False, num_beams=1, pad_token_id=0)
    synchronize(device)
    seconds = time.perf_counter() - start
    assert output.shape == (args.batch, args.prompt_tokens + args.new_tokens), output.shape
    return seconds


@torch.inference_mode()
def check_merged_matches_unmerged(models, prompt: dict) -> tuple[float, bool]:
    """Max |logit| difference merged vs unmerged on the prompt, and whether a short greedy continuation is the
    same token for token (near-ties in a random model may flip a token at the last bit: reported, not fatal)."""
    merged, unmerged = (models[name](**prompt).logits.float() for name in ("merged", "unmerged"))
    tokens = [models[name].generate(**prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
              for name in ("merged", "unmerged")]
    return (merged - unmerged).abs().max().item(), torch.equal(*tokens)


def run(args, models, prompt: dict, device: torch.device) -> dict[str, list[float]]:
    """Interleaved timings: each round times every variant once, the order rotating from round to round."""
    steps = {name: (lambda name=name: time_generate(models[name], prompt, args, device)) for name in VARIANTS}
    return interleave(steps, args.repeats, args.warmup)


def markdown(args, argv, device: torch.device, precision: str, times: dict[str, list[float]],
             logit_diff: float, same_tokens: bool) -> str:
    tokens = args.batch * args.new_tokens
    rate = {name: [tokens / s for s in times[name]] for name in VARIANTS}
    model = (f"`{args.model_path}`" if args.model_path else
             f"BLOOM-shaped, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}; "
             "random weights")
    adapter = (f"`{args.lora_weights}`" if args.lora_weights else
               f"random LoRA r={args.r}, alpha={args.alpha:g} on {args.target}")
    lines = [
        "# Generation speed: base vs merged LoRA vs unmerged LoRA",
        "",
        f"Reproduce: `{command_line('bench_generate.py', argv)}`",
        "",
        f"- Device: {args.device} ({describe_device(device)}), {precision}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}.",
        f"- Model: {model}. Adapter: {adapter}.",
        f"- Greedy generate of exactly {args.new_tokens} new tokens (min_new_tokens = max_new_tokens) for "
        f"{args.batch} prompt(s) of {args.prompt_tokens} tokens; KV cache on.",
        f"- {args.repeats} interleaved rounds after {args.warmup} warm-up round(s). tokens/s: median [min-max]. "
        "Ratios to the base: median over rounds of the per-round tokens/s ratio, and the ratio of each variant's "
        "fastest run (the run least disturbed by other load on a shared machine).",
        f"- Merged vs unmerged: max |logit diff| on the prompt {logit_diff:.1e}; 16 greedy tokens "
        f"{'identical' if same_tokens else 'differ (a near-tie in the random model)'}.",
        "",
        "| variant | tokens/s | ms / decoding step | vs base (median ratio) | vs base (fastest runs) |",
        "|---|---|---|---|---|",
    ]
    ratio, best_ratio = {}, {}
    for name in VARIANTS:
        median = statistics.median(rate[name])
        ratio[name] = statistics.median(r / b for r, b in zip(rate[name], rate["base"]))
        best_ratio[name] = max(rate[name]) / max(rate["base"])
        lines.append(f"| {name} | {median:.1f} [{min(rate[name]):.1f}-{max(rate[name]):.1f}] | "
                     f"{1000 * args.batch / median:.2f} | {ratio[name]:.3f} | {best_ratio[name]:.3f} |")
    lines += ["", f"merged / base = {ratio['merged']:.3f} (fastest runs: {best_ratio['merged']:.3f}); expected ~1.00, "
              f"the same computation. unmerged / base = {ratio['unmerged']:.3f} (fastest runs: "
              f"{best_ratio['unmerged']:.3f}).", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = device_from_args(args)
    precision = resolve_precision(args.precision, device, mixed=device.type == "cuda")  # as inference.py
    models = build_variants(args, device, precision)
    prompt = make_prompt(args, models["base"], device)
    logit_diff, same_tokens = check_merged_matches_unmerged(models, prompt)
    times = run(args, models, prompt, device)
    table = markdown(args, argv if argv is not None else sys.argv[1:], device, precision, times, logit_diff,
                     same_tokens)
    write_text_atomically(args.out, table)
    print(table)


if __name__ == "__main__":
    main()
