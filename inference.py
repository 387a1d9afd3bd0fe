"""Try a fine-tuned LoRA adapter: generate Alpaca-style responses, or export base + adapter as one
merged model.

From Python (a notebook), as the course assignment ends::

    from inference import generate_inference
    generate_inference(instruction="Name three primary colors.", user_inp="",
                       model_path="bigscience/bloom-1b7", lora_weights_path="outputs/lora-alpaca")

From the shell::

    python inference.py --lora-weights outputs/lora-alpaca --instruction "Name three primary colors."
    python inference.py --lora-weights outputs/lora-alpaca  # interactive: one prompt after another
    python inference.py export --lora-weights outputs/lora-alpaca --out outputs/bloom-alpaca-merged
    python inference.py serve --lora-weights outputs/lora-alpaca
        # a page: base and base + adapter side by side
    python inference.py evaluate --lora-weights outputs/lora-alpaca  # base vs adapter, scored

The model is loaded once per process and kept (one at a time: loading another evicts it), so a loop
of calls pays for loading once. It goes to the GPU when there is one, in bf16 (fp16 on GPUs without
bf16); on the CPU in fp32. The adapter is merged into the base weights, W = W0 + (alpha / r) B A, so
generation costs exactly what the base model costs; 8-bit / 4-bit bases, and adapters on a tied
embedding, stay unmerged (the layers add the update on the fly instead). Decoding is greedy unless
sampling is asked for, so the same prompt gives the same answer.

Read in order: `generate_inference`, then loading (`load_model`), export, the command line. The
decoding options and the batch generation it shares with the playground (playground.py, the page
`serve` opens) are in support/generation.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import warnings
from pathlib import Path

import torch

from lora_model import LoraModelForCasualLM, read_adapter_dir
from prompter import Prompter
from support import answer_eval, model_loading
from support.atomic import atomic_write
from support.generation import (
    SAMPLING_DEFAULTS, CliParser, GenerationOptions, LoadedModel, add_model_arguments,
    add_placement_arguments, build_prompt, generate_responses,
)
from support.peft_format import ADAPTER_WEIGHTS_NAME, LEGACY_WEIGHTS_NAME
from support.precision import DTYPES, QUANTIZED, half_precision_dtype, resolve_precision

PROMPTER = Prompter()  # the Alpaca template the adapter was trained with (train.py uses the same)


# --- the assignment's entry point -----------------------------------------------------------------

def generate_inference(instruction: str | list[str], user_inp: str | list[str | None] | None = None,
                       model_path: str | None = None,
                       lora_weights_path: str | os.PathLike | None = None, *,
                       precision: str = "auto", merge: bool = True,
                       device: str | torch.device | None = None, stream: bool = False,
                       **generation_options) -> str | list[str]:
    """Answer an instruction with the fine-tuned model: the text after "### Response:", stripped.

    Decoding is greedy by default, so the same prompt always gives the same answer; pass
    do_sample=True (with temperature / top_p / top_k) for varied answers, seeded with
    `torch.manual_seed` for reproducibility. The model is loaded on the first call and reused by
    later calls with the same model arguments.

    Args:
        instruction: the task, or a list of tasks: a list is generated as one left-padded batch.
        user_inp: optional context; None, "" or "n/a" means none. For a list of instructions: None
            or a list of the same length.
        model_path: base model hub id or folder; None = the base recorded in the adapter's
            adapter_config.json.
        lora_weights_path: the adapter folder (train.py's OUTPUT_DIR, or a PEFT adapter); None =
            base model only.
        precision: "auto" (bf16 on an A100/H100, fp16 on a T4/V100, fp32 on the CPU), "fp32",
            "fp16", "bf16", "8bit" or "4bit".
        merge: merge the adapter into the weights (default; same output, no added latency). False
            keeps it as separate matrices. Quantized bases and adapters on a tied embedding always
            stay unmerged.
        device: "cpu", "cuda", ...; None = CUDA when available.
        stream: print tokens as they are generated (one instruction, no beam search).
        **generation_options: max_new_tokens (256), do_sample (False), temperature, top_p, top_k,
            num_beams (1), repetition_penalty (1.0); see `GenerationOptions`.

    Returns:
        The response, or a list of responses in the order of the instructions.

    Raises:
        ValueError: a bad option (named), an adapter that does not fit the base model.
        FileNotFoundError: a missing adapter folder, or a base model that cannot be found (locally
            or on the hub).
    """
    unknown = sorted(set(generation_options) - {f.name
                                                for f in dataclasses.fields(GenerationOptions)})
    if unknown:
        raise ValueError(f"unknown generation option(s) {', '.join(unknown)}; valid ones: "
                         f"{', '.join(f.name for f in dataclasses.fields(GenerationOptions))}")
    options = GenerationOptions(**generation_options)
    prompts = _build_prompts(instruction, user_inp)
    if stream and (isinstance(instruction, list) or options.num_beams > 1):
        raise ValueError("stream=True needs a single instruction and num_beams=1")
    loaded = load_model(model_path, lora_weights_path, precision=precision, merge=merge,
                        device=device)
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    responses = generate_responses(loaded, prompts, options, PROMPTER, streamer)
    return responses if isinstance(instruction, list) else responses[0]


def _build_prompts(instruction, user_inp) -> list[str]:
    if not isinstance(instruction, list):
        return [build_prompt(PROMPTER, instruction, user_inp)]
    if not instruction:
        raise ValueError("instruction is an empty list")
    if user_inp is None:
        user_inp = [None] * len(instruction)
    if not isinstance(user_inp, list) or len(user_inp) != len(instruction):
        raise ValueError(f"with {len(instruction)} instructions, user_inp must be None or a list "
                         f"of {len(instruction)} inputs, got {user_inp!r}")
    return [build_prompt(PROMPTER, i, u) for i, u in zip(instruction, user_inp)]


# --- loading --------------------------------------------------------------------------------------

# One model at a time: a second cached 3.4 GB model could fill a notebook GPU. Key -> LoadedModel.
_cache: dict[tuple, LoadedModel] = {}


def clear_cache() -> None:
    """Drop the cached model and free its memory (also what loading a different model does
    first)."""
    _cache.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The given device, or CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:1', got {device!r} "
                         f"({err})") from None


def resolve_adapter(lora_weights_path, model_path: str | None) -> tuple[Path | None, str]:
    """Check the adapter folder and find the base model: `model_path`, or the one named in
    adapter_config.json.

    Returns:
        (adapter folder as an absolute path, or None for the base model alone; base model id or
        folder).

    Raises:
        FileNotFoundError: the adapter folder or its files are missing.
        ValueError: no base model given and the adapter names none.
    """
    if lora_weights_path is None:
        if model_path is None:
            raise ValueError("give lora_weights_path (the adapter folder train.py wrote), "
                             "model_path, or both")
        return None, model_path
    adapter_dir = Path(lora_weights_path).expanduser().resolve()
    config, _ = read_adapter_dir(adapter_dir)
    if model_path is None:
        model_path = config.base_model_name_or_path
        if not model_path:
            raise ValueError(f"{adapter_dir}/adapter_config.json names no base model; pass "
                             "model_path (e.g. 'bigscience/bloom-1b7')")
    return adapter_dir, model_path


def load_tokenizer(model_path: str):
    """The base model's tokenizer, padding on the left: a batch of prompts must end where generation
    starts."""
    tokenizer = model_loading.load_tokenizer(model_path)
    tokenizer.padding_side = "left"
    return tokenizer


def load_base_model(model_path: str, device: torch.device, precision: str):
    """The frozen base model on `device`, in eval mode: in fp32/fp16/bf16, or quantized to 8 or 4
    bits."""
    if precision in QUANTIZED:
        # LLM.int8 computes in fp16 (it would cast bf16 inputs anyway); 4-bit in the hardware's half
        # precision.
        dtype = torch.float16 if precision == "8bit" else half_precision_dtype(device)
        return model_loading.load_base_model(model_path, device, dtype, quantize=precision).eval()
    return model_loading.load_base_model(model_path, device, DTYPES[precision]).eval()


def attach_adapter(model, adapter_dir: Path, model_path: str, merge: bool):
    """Wrap `model` with the adapter; merge it when asked and possible.

    Returns:
        (model, merged, note): note explains a merge that was asked for but not done.

    Raises:
        ValueError: the adapter does not fit the base model (other architecture, size or layer
            count).
    """
    try:
        lora_model = LoraModelForCasualLM.from_pretrained(model, adapter_dir)
    except ValueError as err:
        raise ValueError(f"adapter {adapter_dir} does not fit base model {model_path!r}: {err}; "
                         "pass the model_path it was trained on") from None
    if not merge:
        return lora_model, False, None
    try:
        # merge_and_unload checks every layer before writing any weight, so a refusal leaves the
        # model intact.
        return lora_model.merge_and_unload(), True, None
    except ValueError as err:
        return lora_model, False, f"adapter kept unmerged: {err}"


def load_model(model_path: str | None = None, lora_weights_path=None, precision: str = "auto",
               merge: bool = True, device: str | torch.device | None = None) -> LoadedModel:
    """Load base model, tokenizer and adapter, or return them from the cache.

    The cache holds one model, keyed by (base model, adapter folder and its weights' modification
    time, device, precision, merge): the same arguments reuse it; an adapter re-trained into the
    same folder is reloaded.

    Args:
        model_path: hub id or local folder of the base model; None = the adapter's
            base_model_name_or_path.
        lora_weights_path: adapter folder (this repo's or PEFT's layout); None = the base model
            alone.
        precision: "auto", "fp32", "fp16", "bf16", "8bit" or "4bit" (bitsandbytes).
        merge: merge the adapter into the weights (no extra cost per token). Quantized bases and
            adapters on a tied embedding cannot merge; they stay unmerged, with a warning.
        device: "cpu", "cuda", ...; None = CUDA when available.

    Raises:
        FileNotFoundError: missing adapter folder or files, or a base model that is neither a local
            folder nor reachable on the hub. ValueError: bad arguments, or an adapter that does not
            fit the base model.
    """
    adapter_dir, model_path = resolve_adapter(lora_weights_path, model_path)
    device = resolve_device(device)
    # auto: half precision on a GPU
    precision = resolve_precision(precision, device, mixed=device.type == "cuda")
    if not isinstance(merge, bool):
        raise ValueError(f"merge must be True or False, got {merge!r}")
    key = (model_path, str(adapter_dir), _weights_mtime(adapter_dir), str(device), precision, merge)
    if key in _cache:
        return _cache[key]
    clear_cache()  # free the old model before loading the new one: never two in memory
    tokenizer = load_tokenizer(model_path)
    model = load_base_model(model_path, device, precision)
    merged, note = False, None
    if adapter_dir is not None:
        quantized = precision in QUANTIZED
        model, merged, note = attach_adapter(model, adapter_dir, model_path,
                                             merge and not quantized)
        if merge and quantized:
            note = (f"adapter kept unmerged: bitsandbytes' {precision} weights cannot absorb the "
                    "update; the LoRA layers add it on the fly")
        if note:
            warnings.warn(note, stacklevel=2)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, device=device, precision=precision,
                         merged=merged, note=note, base=model_path, adapter=adapter_dir)
    _cache[key] = loaded
    return loaded


def _weights_mtime(adapter_dir: Path | None) -> int | None:
    if adapter_dir is None:
        return None
    for name in (ADAPTER_WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        if (adapter_dir / name).is_file():
            return (adapter_dir / name).stat().st_mtime_ns
    return None


# --- export ---------------------------------------------------------------------------------------

def export_merged_model(lora_weights_path, out_dir, model_path: str | None = None,
                        dtype: str = "auto", overwrite: bool = False) -> Path:
    """Write base + adapter, merged, as a standalone transformers model folder (safetensors, config,
    tokenizer): `AutoModelForCausalLM.from_pretrained(out_dir)` loads it with no LoRA code. Works on
    the CPU; the folder is built beside `out_dir` and renamed into place, so a failed export leaves
    nothing half-written.

    Args:
        lora_weights_path: the adapter folder.
        out_dir: where the merged model goes.
        model_path: base model; None = the one named in adapter_config.json.
        dtype: "auto" (the base checkpoint's own dtype: fp16 for bloom-1b7), "fp32", "fp16" or
            "bf16".
        overwrite: replace an existing `out_dir`.

    Returns:
        The output folder.

    Raises:
        FileExistsError: `out_dir` exists and overwrite is False. ValueError: a bad dtype, an
            adapter that does
        not fit, or one that cannot merge (on a tied embedding). FileNotFoundError: as `load_model`.
    """
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    if lora_weights_path is None:
        raise ValueError("lora_weights_path is required: it is the adapter to merge")
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another output folder or pass "
                              "overwrite=True (--overwrite)")
    adapter_dir, model_path = resolve_adapter(lora_weights_path, model_path)
    tokenizer = load_tokenizer(model_path)
    model = model_loading.load_base_model(model_path, torch.device("cpu"),
                                          DTYPES.get(dtype, "auto"))
    model, merged, note = attach_adapter(model, adapter_dir, model_path, merge=True)
    if not merged:
        raise ValueError(f"cannot export a merged model: {note}")
    with atomic_write(out_dir, folder=True) as staging, model_loading.no_loading_bar():
        model.save_pretrained(staging)  # safetensors
        tokenizer.save_pretrained(staging)
    return out_dir


# --- evaluation -------------------------------------------------------------------------------

EVAL_MAX_NEW_TOKENS = 128  # most Alpaca references are shorter; a looping answer stops here


def evaluate_adapter(lora_weights_path, data: str | None = None, data_fields: str = "",
                     limit: int | None = None, model_path: str | None = None, *,
                     precision: str = "auto", device: str | torch.device | None = None,
                     batch_size: int = 8, **generation_options) -> tuple[dict, Path]:
    """Answer held-out instructions with the base model and with the adapter (greedy, batched, the
    prompts of `generate_inference`), score both against the references (support/answer_eval.py)
    and write `<adapter>/eval/`: answers.jsonl (one line per example), summary.json, report.md.

    Args:
        data: an Alpaca-format file (json, jsonl, csv, parquet); None = the run's validation set.
        data_fields: DATA_FIELDS for `data`, e.g. "instruction=prompt,output=completion".
        limit: the first `limit` examples (default: answer_eval.DEFAULT_LIMIT, or all when fewer).
        **generation_options: as `generate_inference` (max_new_tokens: EVAL_MAX_NEW_TOKENS here).

    Returns:
        (summary: answer_eval.summarize's dict, the report's path).

    Raises:
        ValueError, FileNotFoundError: a bad option, adapter folder or data file; nothing written.
    """
    options = GenerationOptions(**{"max_new_tokens": EVAL_MAX_NEW_TOKENS, **generation_options})
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    adapter_dir, model_path = resolve_adapter(lora_weights_path, model_path)
    tokenizer = load_tokenizer(model_path)
    records, about = answer_eval.heldout_set(adapter_dir, data, data_fields, tokenizer, PROMPTER)
    records = records[:answer_eval.check_limit(limit, len(records), about["examples from"])]

    def answers_of(adapter: Path | None):
        def generate(records: list[dict]) -> list[str]:
            loaded = load_model(model_path, adapter, precision=precision, device=device)
            print(f"{loaded.describe()}: answering {len(records)} instructions", file=sys.stderr,
                  flush=True)
            prompts = [build_prompt(PROMPTER, r["instruction"], r["input"]) for r in records]
            batches = (prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size))
            return [answer for batch in batches
                    for answer in generate_responses(loaded, batch, options, PROMPTER)]
        return generate

    rows = answer_eval.compare(records, answers_of(None), answers_of(adapter_dir))
    summary = answer_eval.summarize(rows)
    about |= {"base model": model_path, "adapter": str(adapter_dir),
              "decoding": f"greedy, max_new_tokens={options.max_new_tokens}, "
                          f"repetition_penalty={options.repetition_penalty:g}"}
    report = answer_eval.report_markdown(summary, rows, about)
    folder = adapter_dir / answer_eval.EVAL_DIR_NAME
    return summary, answer_eval.write_results(folder, rows, summary, report)


# --- command line ---------------------------------------------------------------------------------

def build_evaluate_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="inference.py evaluate",
                     description="Score the base model's and the adapter's greedy answers to "
                                 "held-out instructions against the references (ROUGE-L F1, "
                                 "exact match); writes <adapter>/eval/.")
    add_model_arguments(parser)
    parser.add_argument("--data", help="Alpaca-format file to evaluate on (default: the run's "
                                       "validation set)")
    parser.add_argument("--data-fields", default=os.environ.get("DATA_FIELDS", ""),
                        help="the data's column names, e.g. instruction=prompt,output=completion "
                             "(default: env DATA_FIELDS)")
    parser.add_argument("--limit", type=int, help=f"the first N examples (default: "
                                                  f"{answer_eval.DEFAULT_LIMIT}, or all if fewer)")
    parser.add_argument("--max-new-tokens", type=int, default=EVAL_MAX_NEW_TOKENS,
                        help=f"default: {EVAL_MAX_NEW_TOKENS}")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 discourages repeats (default: 1.0)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="prompts generated together (default: 8)")
    add_placement_arguments(parser)
    return parser


def _evaluate(argv: list[str]) -> int:
    args = build_evaluate_parser().parse_args(argv)
    if args.lora_weights is None:
        raise ValueError("--lora-weights is required: the adapter folder to evaluate")
    summary, report = evaluate_adapter(
        args.lora_weights, args.data, args.data_fields, args.limit, args.model_path,
        precision=args.precision, device=args.device, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty)
    print(answer_eval.table(summary))
    answers = report.with_name(answer_eval.ANSWERS_NAME)
    print(f"{summary['examples']} examples; report: {report}; every answer: {answers}", flush=True)
    return 0


def build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(generation parser, export parser)."""
    generate = CliParser(prog="inference.py", description=__doc__.split("\n\n")[0],
                       epilog="Export a merged model: python inference.py export --help. Base and "
                              "adapter side by side in the browser: python inference.py serve "
                              "--help. Scored on held-out examples: python inference.py evaluate "
                              "--help")
    add_model_arguments(generate)
    generate.add_argument("--instruction", help="the task; without it, an interactive prompt loop")
    generate.add_argument("--input", default="", help="optional context for the instruction")
    add_placement_arguments(generate)
    generate.add_argument("--no-merge", action="store_true",
                          help="keep the adapter unmerged (same output)")
    generate.add_argument("--no-stream", action="store_true",
                          help="print the answer at the end, not as generated")
    defaults = GenerationOptions()
    generate.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                          help=f"default: {defaults.max_new_tokens}")
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    for name, kind in (("temperature", float), ("top-p", float), ("top-k", int)):
        default = SAMPLING_DEFAULTS[name.replace("-", "_")]
        generate.add_argument(f"--{name}", type=kind,
                              help=f"with --sample (default then: {default})")
    generate.add_argument("--num-beams", type=int, default=defaults.num_beams,
                          help="beam search width (default: 1)")
    generate.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty,
                          help="> 1 discourages repeats (default: 1.0, off)")

    export = CliParser(prog="inference.py export",
                     description="Write base model + adapter, merged, as a standalone transformers "
                                 "model folder.")
    add_model_arguments(export)
    export.add_argument("--out", required=True, help="output folder for the merged model")
    export.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="weights' dtype (default: auto = the base checkpoint's)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace the output folder if it exists")
    return generate, export


def _interactive(generate) -> None:
    print("Interactive mode: type an instruction, then an optional input line. "
          "An empty instruction or Ctrl-D quits.", flush=True)
    while True:
        try:
            instruction = input("\nInstruction: ").strip()
            if not instruction:
                return
            user_inp = input("Input (optional): ")
        except EOFError:
            print()
            return
        generate(instruction, user_inp)


def _serve(argv: list[str]) -> int:
    """`inference.py serve`: load the model with its adapter unmerged, then hand it to the
    playground's page."""
    try:
        # Gradio: requirements-playground.txt, which training and generating do not need
        import playground
    except ModuleNotFoundError as err:
        if err.name != "gradio":
            raise
        raise ValueError("the playground needs Gradio: "
                         "pip install -r requirements-playground.txt") from None
    args = playground.build_parser().parse_args(argv)
    if args.lora_weights is None:
        raise ValueError("--lora-weights is required: the page compares the base model with the "
                         "adapter")
    # Unmerged: the base pane switches the adapter off (disable_adapter), so one model in memory
    # answers both.
    loaded = load_model(args.model_path, args.lora_weights, precision=args.precision, merge=False,
                        device=args.device)
    print(loaded.describe(), file=sys.stderr, flush=True)
    return playground.serve(loaded, PROMPTER, host=args.host, port=args.port)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (1 with one `error:` line for a user
    error)."""
    argv = sys.argv[1:] if argv is None else argv
    generate_parser, export_parser = build_parsers()
    try:
        if argv[:1] == ["serve"]:
            return _serve(argv[1:])
        if argv[:1] == ["evaluate"]:
            return _evaluate(argv[1:])
        if argv[:1] == ["export"]:
            args = export_parser.parse_args(argv[1:])
            out = export_merged_model(args.lora_weights, args.out, model_path=args.model_path,
                                      dtype=args.dtype, overwrite=args.overwrite)
            # Which base the adapter went into: an adapter trained with QUANTIZE still merges into
            # the original weights.
            weights = "its own dtype" if args.dtype == "auto" else args.dtype
            print(f"merged model written to {out}: the adapter merged into the unquantized base, "
                  f"loaded in {weights} (never dequantized 8/4-bit weights)")
            return 0
        args = generate_parser.parse_args(argv)
        sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
        options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                       num_beams=args.num_beams, repetition_penalty=args.repetition_penalty,
                       **{name: value for name, value in sampling.items() if value is not None})
        GenerationOptions(**options)  # bad options fail before the model loads
        # transformers' streamers cannot follow beams
        stream = not args.no_stream and args.num_beams == 1

        def generate(instruction: str, user_inp: str) -> None:
            response = generate_inference(instruction, user_inp, args.model_path, args.lora_weights,
                                          precision=args.precision, merge=not args.no_merge,
                                          device=args.device, stream=stream, **options)
            if not stream:
                print(response, flush=True)

        # Load first: load errors show before the first prompt, and the user sees what answers.
        # a merge that did not happen is the note below, not a Python warning
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="adapter kept unmerged", category=UserWarning)
            loaded = load_model(args.model_path, args.lora_weights, precision=args.precision,
                                merge=not args.no_merge, device=args.device)
        print(loaded.describe() + (f"\nnote: {loaded.note}" if loaded.note else ""),
              file=sys.stderr, flush=True)
        if args.instruction is None:
            _interactive(generate)
        else:
            generate(args.instruction, args.input)
        return 0
    except (ValueError, OSError) as err:
        message = " ".join(str(err).split("\n"))
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
