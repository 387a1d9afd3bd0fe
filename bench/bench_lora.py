"""Benchmark one training step (forward + backward) of our LoRA against PEFT's LoRA and the frozen base model.

Reproduce (from the repository root)::

    python bench/bench_lora.py                      # CPU, defaults below
    python bench/bench_lora.py --device cuda        # same script on a GPU

Model: a randomly initialised BLOOM-shaped model (default hidden 1024, 4 layers, 16 heads) with a small vocabulary
(default 4096). BLOOM's real 250,880-token vocabulary would make the lm_head matmul and the cross-entropy dominate
the step, hiding the layers where LoRA sits; with 4096 the lm_head costs about a third of one block. Batch 4 x 256
tokens; LoRA r=8, alpha=16, dropout 0.05 on query_key_value (BLOOM's default target), in float32 and with bf16
autocast (weights stay float32).

Three variants, built from one set of base weights:
  ours  - LoraModelForCasualLM from lora_model.py, with lora_layer.Linear's own forward;
  peft  - peft.get_peft_model with the same LoraConfig;
  base  - the same model without adapters, every parameter frozen. A frozen model has nothing to differentiate,
          so for a fair backward the output of the first layer LoRA targets (layer 0's query_key_value) is made
          to require grad: backward then computes every activation gradient from the loss down to that point, which
          is exactly the part of the backward LoRA cannot avoid (an adapter in layer 0 needs the gradient at layer
          0's output, and gradients of the frozen weights are never computed). "LoRA overhead" is therefore the
          adapter's own cost: its matmuls, dropout, additions and the A/B gradients. Making the input embeddings
          require grad instead (`--base-grad-from embeddings`, what `enable_input_require_grads` does) also
          backpropagates through layer 0's qkv and two layer norms, which LoRA never does; it makes the base slower
          and the overhead look smaller.

Forward forms (`--forward`, default addmm,plain): the same `ours` model timed once more per form, its LoRA Linear
layers running that form instead of their own forward, interleaved with the three variants above:
  addmm - result + after_A @ (scaling B)^T in one torch.addmm, so the (tokens x out) update is never materialised;
  plain - result + B(A(dropout(x))) * scaling, as the paper writes it (and PEFT computes it).
Both cast the adapter's input and the update's dtype alike. Their table decides which form lora_layer.py keeps.

Timing: warm-up rounds, then `--repeats` rounds, each timing every variant once in a rotated order (ours, peft, base;
then peft, base, ours; ...), so that drift in a shared machine's load hits all of them alike. Reports medians, the
ours/PEFT ratio (target <= 1.00) and the overhead of each LoRA over the base (target <= 10%), both as the median over
rounds of the per-round ratio. Before timing, checks that ours and PEFT give the same logits for the same adapter
values. Writes a markdown table to bench/results/lora.md (atomically) and prints it.

On a CPU shared with other jobs, pass `--threads 1`: with several OpenMP threads, every parallel op waits for its
slowest thread, and a thread the OS has descheduled costs a whole time slice (~10 ms measured here, even for a
0.3 ms matmul), a penalty per op that falls hardest on LoRA's many small ops.
"""

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import BloomForCausalLM  # noqa: E402

from bench.common import (  # noqa: E402
    add_device_arguments,
    add_model_shape_arguments,
    bloom_config,
    command_line,
    describe_device,
    device_from_args,
    interleave,
    synchronize,
)
from lora_layer import Linear, LoraLayer, _cast_for_adapter  # noqa: E402
from lora_model import LoraConfig, LoraModelForCasualLM  # noqa: E402
from support.atomic import write_text_atomically # noqa: E402

VARIANTS = ("ours", "peft", "base")
PRECISIONS = ("fp32", "bf16")


def addmm_forward(layer: Linear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """result + after_A @ (scaling B)^T in one addmm: scaling the small B, and no (tokens x out) update on its own."""
    result = layer.base_layer(x, *args, **kwargs)
    if layer.disabled or layer.merged:
        return result
    after_a = layer.lora_A(layer.lora_dropout(_cast_for_adapter(x, layer.lora_A.weight.dtype)))
    scaled_b = layer.lora_B.weight * layer.scaling
    if after_a.dtype != result.dtype:  # e.g. a float16 base without autocast: the update is cast back
        return result + torch.nn.functional.linear(after_a, scaled_b).to(result.dtype)
    out_features = result.shape[-1]
    summed = torch.addmm(result.reshape(-1, out_features), after_a.reshape(-1, after_a.shape[-1]), scaled_b.T)
    return summed.view(result.shape)


def plain_forward(layer: Linear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """result + B(A(dropout(x))) * scaling, with the same casts: input to the adapter's dtype, update back."""
    result = layer.base_layer(x, *args, **kwargs)
    if layer.disabled or layer.merged:
        return result
    lora_input = layer.lora_dropout(_cast_for_adapter(x, layer.lora_A.weight.dtype))
    update = layer.lora_B(layer.lora_A(lora_input)) * layer.scaling
    return result + update.to(result.dtype)


FORWARDS = {"addmm": addmm_forward, "plain": plain_forward}


class WithForward(torch.nn.Module):
    """`model` whose LoRA Linear layers run FORWARDS[form] instead of their own forward while this module runs.

    The same weights as `ours`, swapped per call, so both forms are timed on the same tensors."""

    def __init__(self, model: torch.nn.Module, form: str) -> None:
        super().__init__()
        self.model = model
        self.form = form

    def forward(self, *args, **kwargs):
        layers = [m for m in self.model.modules() if isinstance(m, Linear)]
        for layer in layers:
            layer.forward = types.MethodType(FORWARDS[self.form], layer)  # an instance attribute shadows the class's
        try:
            return self.model(*args, **kwargs)
        finally:
            for layer in layers:
                del layer.forward


def parse_args(argv=None):
    """The command line (`argv` without the program name; None reads sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_shape_arguments(parser)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--target", default="query_key_value", help="comma-separated target module names")
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    parser.add_argument("--forward", default="addmm,plain",
                        help=f"comma-separated forms of our Linear forward to time as well: {', '.join(FORWARDS)}; "
                             "'' for none (see the module docstring)")
    parser.add_argument("--repeats", type=int, default=24, help="timed rounds (each times every variant once)")
    parser.add_argument("--layer-repeats", type=int, default=40, help="timed rounds of the single-layer test")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    add_device_arguments(parser)
    parser.add_argument("--base-grad-from", choices=("first-target", "embeddings"), default="first-target",
                        help="where the frozen base's backward starts to need gradients (see the module docstring)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora.md")
    args = parser.parse_args(argv)
    args.precision = [p.strip() for p in args.precision.split(",") if p.strip()]
    bad = [p for p in args.precision if p not in PRECISIONS]
    if bad or not args.precision:
        parser.error(f"--precision must list some of {PRECISIONS}, got {bad or args.precision}")
    args.forward = [f.strip() for f in args.forward.split(",") if f.strip()]
    bad = [f for f in args.forward if f not in FORWARDS]
    if bad or len(set(args.forward)) < len(args.forward):
        parser.error(f"--forward must list each of {tuple(FORWARDS)} at most once, got {args.forward}")
    if args.repeats < 1 or args.layer_repeats < 1 or args.warmup < 0:
        parser.error("--repeats and --layer-repeats must be >= 1, --warmup >= 0")
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    return args


def build_variants(args, device: torch.device) -> dict[str, torch.nn.Module]:
    """ours / peft / base on copies of one randomly initialised BLOOM, with identical (non-zero) adapters."""
    torch.manual_seed(0)
    config = bloom_config(args)
    base = BloomForCausalLM(config)
    targets = [t.strip() for t in args.target.split(",")]
    lora_kwargs = dict(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets)

    ours = LoraModelForCasualLM(copy.deepcopy(base), LoraConfig(**lora_kwargs))
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora_kwargs))
    # Random B (default init makes it zero): same values in both, so the logits check below means something.
    ref_params = {n.removeprefix("base_model.model.").replace(".default", ""): p
                  for n, p in ref.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, param in ours.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
            if "lora_" in name:
                ref_params[name].copy_(param)

    base.requires_grad_(False)
    if args.base_grad_from == "embeddings":
        hooked = base.get_input_embeddings()
    else:
        hooked = next(m for n, m in base.named_modules() if any(n.endswith("." + t) for t in targets))
    # The hooked layer's output becomes a leaf that requires grad: backward runs from the loss down to it.
    hooked.register_forward_hook(lambda module, inputs, output: output.detach().requires_grad_())
    models = {"ours": ours.to(device), "peft": ref.to(device), "base": base.to(device)}
    return models | forward_variants(models["ours"], args.forward)


def forward_variants(ours: torch.nn.Module, forms: list[str]) -> dict[str, torch.nn.Module]:
    """"ours-<form>": `ours` run with each forward form."""
    return {f"ours-{form}": WithForward(ours, form) for form in forms}


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_same_logits(models, inputs, precision: str, device: torch.device) -> float:
    """Max |ours - PEFT| of the logits in eval mode (dropout off); raises if ours, in any forward form, is not the
    same model as PEFT.

    float32: exactly 0 when alpha / r is a power of two (the default 16 / 8), since multiplying by a power of two
    does not round, whether the form scales B (addmm) or the update (plain, PEFT). bf16: the addmm form adds the
    update before rounding, PEFT and the plain form round it to bf16 and then add, about one bf16 step of the
    largest logits apart, so what is checked is that each form is as close to the float32 logits as PEFT is."""
    names = [name for name in models if name.startswith("ours")]
    with torch.no_grad():
        with autocast(precision, device):
            logits = {name: models[name].eval()(**inputs).logits.float() for name in names + ["peft"]}
        exact = models["ours"](**inputs).logits.float()
    ref_error = (logits["peft"] - exact).abs().mean().item()
    for name in names:
        diff = (logits[name] - logits["peft"]).abs().max().item()
        if precision == "fp32" and not diff <= 1e-4:
            raise SystemExit(f"{name} and PEFT disagree (fp32): max |logit diff| {diff:.3g} > 1e-4")
        error = (logits[name] - exact).abs().mean().item()
        if precision != "fp32" and not error <= 1.05 * ref_error:
            raise SystemExit(f"{name} is less accurate than PEFT in {precision}: mean |logit - fp32 logit| "
                             f"{error:.3g} vs PEFT's {ref_error:.3g}")
    return (logits["ours"] - logits["peft"]).abs().max().item()


def timed(step, model: torch.nn.Module, device: torch.device, precision: str):
    """A function that clears `model`'s gradients (untimed), then returns the seconds `step()` takes."""
    def run_once() -> float:
        model.zero_grad(set_to_none=True)
        synchronize(device)
        start = time.perf_counter()
        with autocast(precision, device):
            output = step()
        if output.dim() == 0:  # a loss
            output.backward()
        else:  # a layer's output
            output.backward(grad_output_for(output))
        synchronize(device)
        return time.perf_counter() - start
    return run_once


def grad_output_for(output: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator(device=output.device).manual_seed(2)
    return torch.randn(output.shape, generator=generator, device=output.device, dtype=output.dtype)


def time_models(args, models, device: torch.device, precision: str) -> dict[str, list[float]]:
    """Forward (to the loss) + backward of every variant's whole model."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device)
    inputs = {"input_ids": ids, "labels": ids}
    diff = check_same_logits(models, inputs, precision, device)
    for model in models.values():
        model.train()
    steps = {name: timed(lambda m=model: m(**inputs).loss, model, device, precision) for name, model in models.items()}
    times = interleave(steps, args.repeats, args.warmup)
    times["logit_diff"] = [diff]
    return times


def time_layers(args, models, device: torch.device, precision: str) -> dict[str, list[float]]:
    """Forward + backward of one targeted layer alone (the last one), its input requiring grad as in every layer
    above the first. Each step is short, so many rounds fit: a sharper ours-vs-PEFT comparison than whole models."""
    name = [n for n, m in models["ours"].model.named_modules() if isinstance(m, LoraLayer)][-1]
    ours = models["ours"].model.get_submodule(name)
    layers = {"ours": ours, "peft": models["peft"].base_model.model.get_submodule(name),
              "base": copy.deepcopy(ours.base_layer),  # a plain copy: no LoRA, no benchmark hook
              **forward_variants(ours, args.forward)}
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(args.batch * args.seq, ours.in_features, generator=generator).to(device).requires_grad_()
    for layer in layers.values():
        layer.train()
    steps = {v: timed(lambda layer=layer: layer(x), layer, device, precision) for v, layer in layers.items()}
    return interleave(steps, args.layer_repeats, args.warmup)


def per_round_ratios(times: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    """A round's timings are adjacent in time, so slow drift in the machine's load cancels in each ratio."""
    return [a / b for a, b in zip(times[numerator], times[denominator])]


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    return statistics.median(per_round_ratios(times, numerator, denominator))


def ratio_spread(times: dict[str, list[float]], numerator: str, denominator: str) -> str:
    """The middle half (quartiles) of the per-round ratios: how far the median could move by noise alone."""
    ratios = per_round_ratios(times, numerator, denominator)
    if len(ratios) < 4:
        return "n/a"
    low, _, high = statistics.quantiles(ratios, n=4)
    return f"{low:.3f}-{high:.3f}"


def time_cell(seconds: list[float]) -> str:
    """Median [min-max] in ms."""
    def ms(value: float) -> str:
        return f"{1000 * value:.1f}" if value < 0.1 else f"{1000 * value:.0f}"
    return f"{ms(statistics.median(seconds))} [{ms(min(seconds))}-{ms(max(seconds))}]"


def table_rows(results: dict[str, dict[str, list[float]]], with_logit_diff: bool) -> list[str]:
    header = ("| precision | ours | PEFT | base | ours / PEFT | ours / PEFT, middle half of rounds | ours over base "
              "| PEFT over base |")
    lines = [header + (" max logit diff |" if with_logit_diff else ""),
             "|---" * (header.count("|") - 1 + with_logit_diff) + "|"]
    for precision, times in results.items():
        cell = {name: time_cell(times[name]) for name in VARIANTS}
        ours_peft, ours_base, peft_base = (paired_ratio(times, a, b)
                                           for a, b in (("ours", "peft"), ("ours", "base"), ("peft", "base")))
        row = (f"| {precision} | {cell['ours']} | {cell['peft']} | {cell['base']} | {ours_peft:.3f} "
               f"| {ratio_spread(times, 'ours', 'peft')} | {100 * (ours_base - 1):+.1f}% "
               f"| {100 * (peft_base - 1):+.1f}% |")
        lines.append(row + (f" {times['logit_diff'][0]:.1e} |" if with_logit_diff else ""))
    return lines


def forward_rows(args, model_results, layer_results) -> list[str]:
    """One row per step and precision: each forward form's median [min-max] and the first form over each other."""
    if not args.forward:
        return []
    first, others = args.forward[0], args.forward[1:]
    header = ["step", "precision", *args.forward]
    for form in others:
        header += [f"{first} / {form}", f"{first} / {form}, middle half of rounds"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for step, results in (("whole model", model_results), ("one layer", layer_results)):
        for precision, times in results.items():
            cells = [step, precision]
            cells += [time_cell(times[f"ours-{form}"]) for form in args.forward]
            for form in others:
                cells += [f"{paired_ratio(times, f'ours-{first}', f'ours-{form}'):.3f}",
                          ratio_spread(times, f"ours-{first}", f"ours-{form}")]
            lines.append("| " + " | ".join(cells) + " |")
    forms = " and ".join(args.forward)
    return ["## Forward forms of our Linear", "",
            f"`ours` timed with {forms} (see bench_lora.py's docstring), in the same rounds as the tables above. "
            "lora_layer.py keeps addmm only while the one-layer rows show it faster than plain beyond noise (the "
            "middle half of the rounds below 1.00; the whole model dilutes the difference into its noise); a tie "
            "goes to plain, which reads like the paper.", "",
            *lines, ""]


def markdown(args, argv, device: torch.device, model_results, layer_results) -> str:
    """The results file: how to reproduce, what was measured, the whole-model table and the one-layer table."""
    tokens = args.batch * args.seq
    lines = [
        "# LoRA forward + backward: ours vs PEFT vs frozen base",
        "",
        f"Reproduce: `{command_line('bench_lora.py', argv)}`",
        "",
        f"- Device: {args.device} ({describe_device(device)}); torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}.",
        f"- Model: BLOOM-shaped, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab} "
        "(small on purpose, so lm_head does not dominate); random weights.",
        f"- Step: forward + backward on {args.batch} x {args.seq} tokens; LoRA r={args.r}, alpha={args.alpha:g}, "
        f"dropout={args.dropout:g} on {args.target}; train mode; bf16 = autocast over float32 weights.",
        f"- Base: all weights frozen, backward from the loss down to the output of "
        f"{'the input embeddings' if args.base_grad_from == 'embeddings' else 'the first targeted layer'} "
        "(see bench_lora.py's docstring).",
        "- Times: median [min-max] in ms. Ratios and overheads: median over rounds of the per-round ratio "
        "(each round times every variant back to back, in rotating order); the middle half of the per-round "
        "ratios shows how much of a difference is noise.",
        "",
        f"## Whole model ({args.repeats} rounds after {args.warmup} warm-up rounds)",
        "",
        *table_rows(model_results, with_logit_diff=True),
        "",
        f"## One targeted layer alone ({args.layer_repeats} rounds after {args.warmup} warm-up rounds)",
        "",
        f"The last {args.target.split(',')[-1]} layer, {tokens} tokens in, input requiring grad; the whole-model "
        "overhead is this layer's overhead diluted by everything LoRA does not touch.",
        "",
        *table_rows(layer_results, with_logit_diff=False),
        "",
        *forward_rows(args, model_results, layer_results),
        "Targets: ours / PEFT <= 1.00; LoRA overhead over the base (whole model) <= 10%.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = device_from_args(args)
    models = build_variants(args, device)
    model_results, layer_results = {}, {}
    for precision in args.precision:
        model_results[precision] = time_models(args, models, device, precision)
        layer_results[precision] = time_layers(args, models, device, precision)
        print(f"{precision}: done", file=sys.stderr)
    table = markdown(args, argv if argv is not None else sys.argv[1:], device, model_results, layer_results)
    write_text_atomically(args.out, table)
    print(table)


if __name__ == "__main__":
    main()
