"""The one configuration object of train.py, built from environment variables and `--flags`,
validated here.

Every field can be set as an environment variable named like the field in upper case
(`BATCH_SIZE=8`), as the course assignment does with `DEBUG`, `MIX_PREC_TRAIN` and `DDP`, or as a
flag (`--batch_size 8`, `--batch-size 8`). A flag wins over the environment, the environment over
the default. A bad value stops the program with one line that names the variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import re
import typing
from dataclasses import dataclass, field

from support.data_sources import ALPACA_URL, DEBUG_SAMPLE
from support.precision import PRECISIONS, QUANTIZED

TRUE_WORDS = ("1", "true", "yes")
FALSE_WORDS = ("0", "false", "no")
REPORT_TO_CHOICES = ("tensorboard",)  # metrics.TRACKER_CLASSES
DEFAULT_MODEL = "bigscience/bloom-1b7"
MAX_INT = 2**31 - 1
# INIT_LORA_WEIGHTS in PEFT's names: true (its default: A kaiming-uniform, B zeros), gaussian,
# pissa, pissa_niter_<N>.
INIT_LORA_WEIGHTS_RE = re.compile(r"true|gaussian|pissa|pissa_niter_\d+")
# WARMUP_STEPS and SIZE_VALID_SET: chosen from the run's length and the data's size (see resolve_*)
AUTO = -1
# What AUTO chooses: 10 % of the run's steps / of the examples, at most the full-Alpaca defaults of
# the assignment.
AUTO_FRACTION, MAX_AUTO_WARMUP, MAX_AUTO_VALID = 0.1, 100, 2000


class ConfigError(ValueError):
    """A bad setting; its message is one line naming the variable."""


@dataclass
class TrainConfig:
    """Settings of a fine-tuning run. Defaults reproduce the assignment's BLOOM-1.7B Alpaca LoRA
    run."""

    debug: bool = field(default=False,
                        metadata={"help": "sample run: shipped 2,000-record Alpaca sample, 1 "
                                          "epoch"})
    mix_prec_train: bool = field(default=False,
                                 metadata={"help": "mixed precision: bf16 where supported, else "
                                                   "fp16"})
    precision: str = field(default="",
                           metadata={"help": "force fp32|bf16|fp16 (overrides MIX_PREC_TRAIN)"})
    quantize: str = field(default="",
                          metadata={"help": "8bit|4bit: the frozen base quantized by "
                                            "bitsandbytes (4bit: QLoRA's NF4 with double "
                                            "quantization, its matmuls in the precision's "
                                            "dtype); the adapter stays float32"})
    ddp: bool = field(default=False,
                      metadata={"help": "distributed data parallel; launch with torchrun"})
    fsdp: bool = field(default=False,
                       metadata={"help": "fully sharded data parallel (FSDP2) instead of DDP: "
                                         "each process holds 1/N of the base model; launch with "
                                         "torchrun"})
    model_path: str = field(default=DEFAULT_MODEL,
                            metadata={"help": "hub id or local folder of the base model"})
    data_path: str = field(default="",
                           metadata={"help": "training records: a .json, .jsonl, .csv or "
                                             ".parquet file, a URL, a Drive link or a hub "
                                             "dataset id (default: full Alpaca; DEBUG: the "
                                             "sample)"})
    data_fields: str = field(default="",
                             metadata={"help": "where the Alpaca fields are in other column "
                                               "names, e.g. instruction=prompt,output=completion"})
    valid_data_path: str = field(default="",
                                 metadata={"help": "validation records from their own file "
                                                   "(then SIZE_VALID_SET is not used)"})
    output_dir: str = field(default="outputs/lora-alpaca",
                            metadata={"help": "adapter, checkpoints, metrics"})
    num_epochs: int = field(default=3, metadata={"help": "passes over the training data"})
    max_steps: int = field(default=-1,
                           metadata={"help": "stop after this many optimizer steps (-1: no "
                                             "limit)"})
    max_length: int = field(default=512,
                            metadata={"help": "tokens per example (longer ones are truncated)"})
    batch_size: int = field(default=4, metadata={"help": "examples per micro-batch per device"})
    grad_accum_steps: int = field(default=8, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=3e-4, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.01,
                                metadata={"help": "AdamW weight decay on the LoRA matrices"})
    warmup_steps: int = field(default=AUTO,
                              metadata={"help": "linear warm-up steps before the cosine decay "
                                                "(-1: 10 % of the run's steps, at most 100)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    use_dora: bool = field(default=False, metadata={
        "help": "DoRA: a trainable magnitude per output feature times the LoRA-updated weight's "
                "direction (docs/lora_variants.md)"})
    init_lora_weights: str = field(default="true", metadata={
        "help": "true (A random, B zeros), gaussian, or pissa / pissa_niter_N: A, B from the base "
                "weight's top singular vectors, the base keeping the rest (docs/lora_variants.md)"})
    target_modules: str = field(default="",
                                metadata={"help": "comma-separated module names, or all-linear "
                                                  "(default: the architecture's usual ones: "
                                                  "query_key_value for BLOOM, q_proj,v_proj for "
                                                  "Llama, Mistral and Qwen2, c_attn for GPT-2)"})
    size_valid_set: float = field(default=AUTO,
                                  metadata={"help": "validation examples split off the data: a "
                                                    "count, or a fraction < 1 (-1: 10 % of "
                                                    "them, at most 2000)"})
    seed: int = field(default=42, metadata={"help": "seed for data order, LoRA init and dropout"})
    eval_freq: int = field(default=200,
                           metadata={"help": "evaluate every N optimizer steps (0: only per "
                                             "epoch)"})
    eval_generate: int = field(default=0, metadata={
        "help": "at the run's end, answer the first N validation instructions with the base model "
                "and the adapter and score them (ROUGE-L, exact match; as inference.py "
                "evaluate); 0: off"})
    eval_generate_every_eval: bool = field(default=False, metadata={
        "help": "with EVAL_GENERATE: score the answers at every evaluation, not only the last"})
    report_to: str = field(default="", metadata={
        "help": "tensorboard: stream the metrics (loss, learning rate, gradient norm, tokens/s, "
                "eval loss, EVAL_GENERATE's scores) to OUTPUT_DIR/tensorboard/"})
    save_steps: int = field(default=200,
                            metadata={"help": "checkpoint every N optimizer steps, besides each "
                                              "epoch's end and the last step (0: only those)"})
    save_total_limit: int = field(default=0,
                                  metadata={"help": "keep only the newest N complete "
                                                    "checkpoints (0: keep all)"})
    train_on_inputs: bool = field(default=True,
                                  metadata={"help": "false: prompt tokens carry no label"})
    group_by_length: bool = field(default=False,
                                  metadata={"help": "batch similar lengths together (less "
                                                    "padding)"})
    packing: bool = field(default=False,
                          metadata={"help": "several examples per row of MAX_LENGTH tokens (no "
                                            "padding), each attending only to itself; "
                                            "BATCH_SIZE counts rows (docs/packing.md)"})
    overwrite_output_dir: bool = field(default=False,
                                       metadata={"help": "a new run into a folder that holds "
                                                         "another run's results moves them "
                                                         "aside to "
                                                         "<OUTPUT_DIR>.replaced-<time>/ first"})
    resume_from: str = field(default="",
                             metadata={"help": "checkpoint folder to continue from, or "
                                               "'latest': the newest complete one in OUTPUT_DIR "
                                               "(none yet: start at step 0, with a note)"})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "keep only each layer's input and recompute the rest in the backward "
                          "pass: far less activation memory, 15-35 % slower (one more forward "
                          "pass)"})
    fused_modules: bool = field(default=True,
                                metadata={"help": "BLOOM's attention and GELU on PyTorch's "
                                                  "fused kernels (fused_bloom.py); false: "
                                                  "transformers' eager modules (the same "
                                                  "numbers up to rounding)"})
    cache_dir: str = field(default=".cache", metadata={"help": "downloads and tokenized data"})
    num_workers: int = field(default=0, metadata={"help": "data-loader worker processes"})
    ddp_timeout: int = field(default=1800,
                             metadata={"help": "seconds a DDP process waits for the others in a "
                                               "collective before it gives up with an error"})

    def __post_init__(self) -> None:
        self._apply_debug_defaults()
        self._validate()

    def _apply_debug_defaults(self) -> None:
        if not self.data_path:
            self.data_path = str(DEBUG_SAMPLE) if self.debug else ALPACA_URL

    def _validate(self) -> None:
        positive = ("max_length", "batch_size", "grad_accum_steps", "num_epochs", "lora_r",
                    "ddp_timeout")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.upper()} must be > 0, got {getattr(self, name)}")
        non_negative = ("eval_freq", "eval_generate", "save_steps", "save_total_limit",
                        "num_workers", "weight_decay", "max_grad_norm")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.upper()} must be >= 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "size_valid_set"):
            if getattr(self, name) < 0 and getattr(self, name) != AUTO:
                raise ConfigError(f"{name.upper()} must be >= 0, or -1 to choose it from the data, "
                                  f"got {getattr(self, name):g}")
        # Larger counts are never meant, and would fail later with an OverflowError from deep inside
        # a library (itertools.islice, torch, NumPy's seed) instead of this line.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if _field_type(f) is int and value > MAX_INT:
                raise ConfigError(f"{f.name.upper()} must be at most {MAX_INT}, got {value}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"SEED must be in [0, {2**32 - 1}] (NumPy's range), got {self.seed}")
        if self.max_length < 2:
            raise ConfigError("MAX_LENGTH must be at least 2 (a prompt token and a response "
                              f"token), got {self.max_length}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError("MAX_STEPS must be a positive step count or -1 (no limit), got "
                              f"{self.max_steps}")
        if not self.learning_rate > 0:
            raise ConfigError(f"LEARNING_RATE must be > 0, got {self.learning_rate}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"LORA_ALPHA must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"LORA_DROPOUT must be in [0, 1), got {self.lora_dropout}")
        if self.precision and self.precision not in PRECISIONS:
            raise ConfigError(f"PRECISION must be one of {', '.join(PRECISIONS)}, got "
                              f"{self.precision!r}")
        if self.ddp and self.fsdp:
            raise ConfigError("DDP=true and FSDP=true: set one of them (DDP copies the model to "
                              "every process, FSDP shards it)")
        if self.quantize not in ("", *QUANTIZED):
            raise ConfigError(f"QUANTIZE must be one of {', '.join(QUANTIZED)}, or empty for none, "
                              f"got {self.quantize!r}")
        self.init_lora_weights = self.init_lora_weights.strip().lower()
        if not INIT_LORA_WEIGHTS_RE.fullmatch(self.init_lora_weights):
            raise ConfigError(f"INIT_LORA_WEIGHTS must be true, gaussian, pissa or pissa_niter_<N> "
                              f"(N iterations of a randomized SVD), got {self.init_lora_weights!r}")
        if self.quantize and (self.use_dora or self.pissa):
            variant = ("USE_DORA=true" if self.use_dora
                       else f"INIT_LORA_WEIGHTS={self.init_lora_weights}")
            raise ConfigError(f"QUANTIZE={self.quantize} and {variant}: DoRA and PiSSA need the "
                              "unquantized base weight, which this repo does not dequantize")
        if self.fsdp and self.quantize:
            raise ConfigError(f"QUANTIZE={self.quantize} and FSDP=true: this repo does not shard "
                              "bitsandbytes' quantized weights; use DDP=true (each process holds "
                              "the quantized base) or FSDP without QUANTIZE")
        if self.packing and self.group_by_length:
            raise ConfigError("PACKING=true and GROUP_BY_LENGTH=true: packed rows are full "
                              "already, there is no padding left to group away; set one of them")
        if self.overwrite_output_dir and self.resume_from:
            raise ConfigError(f"RESUME_FROM={self.resume_from!r} continues a run and "
                              "OVERWRITE_OUTPUT_DIR=true starts a new one; set one of them")
        if self.target_modules.strip() and not self.target_module_list:
            raise ConfigError("TARGET_MODULES must name at least one module, or be empty for the "
                              f"architecture's default, got {self.target_modules!r}")
        self.data_field_map  # checks DATA_FIELDS
        self.report_to_list  # checks REPORT_TO
        if self.eval_generate_every_eval and not self.eval_generate:
            raise ConfigError("EVAL_GENERATE_EVERY_EVAL=true scores generated answers, but "
                              "EVAL_GENERATE=0 asks for none; set EVAL_GENERATE=N (validation "
                              "examples to answer)")
        if self.eval_generate and self.fsdp:
            raise ConfigError(f"EVAL_GENERATE={self.eval_generate} and FSDP=true: generating "
                              "needs the whole model in one process; score the adapter after "
                              "training with python inference.py evaluate")
        if not (0 < self.size_valid_set < 1 or self.size_valid_set == int(self.size_valid_set)):
            raise ConfigError(f"SIZE_VALID_SET must be a whole count or a fraction in (0, 1), got "
                              f"{self.size_valid_set}")

    @property
    def pissa(self) -> bool:
        return self.init_lora_weights.startswith("pissa")

    @property
    def lora_init(self) -> bool | str:
        """INIT_LORA_WEIGHTS as LoraConfig's init_lora_weights: True, or PEFT's name of the init."""
        return True if self.init_lora_weights == "true" else self.init_lora_weights

    @property
    def target_module_list(self) -> list[str] | str:
        """TARGET_MODULES as LoraConfig takes it; [] before train.py has filled in the
        architecture's default."""
        names = [name.strip() for name in self.target_modules.split(",") if name.strip()]
        return "all-linear" if names == ["all-linear"] else names

    @property
    def data_field_map(self) -> dict[str, str]:
        """DATA_FIELDS as {Alpaca field: the data's column}, e.g. {"instruction": "prompt",
        "output": "completion"}."""
        mapping = {}
        for pair in (p.strip() for p in self.data_fields.split(",") if p.strip()):
            ours, sep, theirs = (part.strip() for part in pair.partition("="))
            if not sep or ours not in ("instruction", "input",
                                       "output") or not theirs or ours in mapping:
                raise ConfigError("DATA_FIELDS must be like instruction=prompt,output=completion "
                                  "(instruction, input, output, each once), got "
                                  f"{self.data_fields!r}")
            mapping[ours] = theirs
        return mapping

    @property
    def report_to_list(self) -> list[str]:
        """REPORT_TO as a list of tracker names, e.g. ["tensorboard"]; [] for none."""
        names = [name.strip().lower() for name in self.report_to.split(",") if name.strip()]
        if "wandb" in names:
            raise ConfigError("REPORT_TO=wandb is not supported: use REPORT_TO=tensorboard; "
                              "Weights & Biases imports its event files (wandb sync "
                              "--sync-tensorboard OUTPUT_DIR/tensorboard)")
        for name in names:
            if name not in REPORT_TO_CHOICES or names.count(name) > 1:
                choices = ", ".join(REPORT_TO_CHOICES)
                raise ConfigError(f"REPORT_TO must be {choices} (comma-separated, each once), or "
                                  f"empty for none, got {self.report_to!r}")
        return names

    def resolve_valid_size(self, examples: int) -> tuple[int | float, str]:
        """SIZE_VALID_SET as the splitter wants it (an int count or a float fraction) for `examples`
        examples, and
        why: as set, or by default 10 % of them, at most 2000 (the assignment's value for the full
            Alpaca)."""
        if self.size_valid_set != AUTO:
            return (self.size_valid_set if self.size_valid_set < 1
                    else int(self.size_valid_set)), "SIZE_VALID_SET"
        return (min(MAX_AUTO_VALID, int(examples * AUTO_FRACTION)),
                f"10 % of {examples:,} examples, at most {MAX_AUTO_VALID:,}")

    def resolve_warmup_steps(self, total_steps: int) -> tuple[int, str]:
        """WARMUP_STEPS for a run of `total_steps` optimizer steps, and why: as set, or by default
        10 % of them, at most 100 (the assignment's value)."""
        if self.warmup_steps != AUTO:
            return self.warmup_steps, "WARMUP_STEPS"
        return (min(MAX_AUTO_WARMUP, int(total_steps * AUTO_FRACTION)),
                f"10 % of {total_steps:,} steps, at most {MAX_AUTO_WARMUP}")


def _field_type(f: dataclasses.Field) -> type:
    return _type_hints()[f.name]


@functools.cache
def _type_hints() -> dict[str, type]:
    # Resolving the string annotations (`from __future__ import annotations`) compiles each one:
    # once per process, not once per field per parse.
    return typing.get_type_hints(TrainConfig)


# What RESUME_FROM may change. A checkpoint continues its run exactly only if the resumed run
# computes the same thing, so train.py refuses to resume when one of these differs from the
# checkpoint's value (as it does for another number of processes, and for training data of other
# content). Optimizer settings are here too because the optimizer's saved state would silently
# override a new LEARNING_RATE or WEIGHT_DECAY.
RESUME_MUST_MATCH = (
    "model_path", "quantize",                                                 # the frozen base
    # the adapter and its shapes
    "target_modules", "lora_r", "lora_alpha", "lora_dropout",
    "use_dora", "init_lora_weights",                                          # DoRA; PiSSA's W0
    # the examples and the split
    "max_length", "train_on_inputs", "size_valid_set", "seed",
    # the data order and batches
    "batch_size", "grad_accum_steps", "group_by_length", "packing",
    # the optimizer and schedule
    "learning_rate", "weight_decay", "warmup_steps", "max_grad_norm",
)
# These change the run's length or arithmetic on purpose: more epochs (the cosine schedule is then
# recomputed for the new total), an fp16 T4 session followed by a bf16 A100 one, fused or eager
# modules (they round differently). Allowed, with a note that the rest of the run differs from an
# uninterrupted one.
RESUME_MAY_CHANGE_WITH_NOTE = ("num_epochs", "max_steps", "mix_prec_train", "precision",
                               "fused_modules")
# These never change the numbers: where files go, how often to evaluate or save, how data is loaded,
# whether activations are kept or recomputed (GRADIENT_CHECKPOINTING: the same adapter, tested),
# whether the ranks copy the model (DDP) or shard it (FSDP: the same checkpoints, tested). DATA_PATH
# may name another copy of the same data (the content is compared: DATA_FIELDS and VALID_DATA_PATH
# through it too); DEBUG acts only through the settings above.
RESUME_FREE = ("debug", "ddp", "fsdp", "data_path", "data_fields", "valid_data_path", "output_dir",
               "cache_dir", "num_workers", "eval_freq", "save_steps", "save_total_limit",
               "ddp_timeout", "resume_from", "gradient_checkpointing", "overwrite_output_dir",
               "eval_generate", "eval_generate_every_eval", "report_to")


def parse_value(name: str, raw: str, kind: type):
    """Turn one env/flag string into the field's type; ConfigError names the variable on failure."""
    text = raw.strip()
    if kind is bool:
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise ConfigError(f"{name} must be one of 1/0/true/false/yes/no, got {raw!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{name} must be a finite number, got {raw!r}")
        return value
    return raw


# What DEBUG=true changes, unless the variable is set explicitly: a short run that shows every stage
# of training (evaluation, checkpoints, the loss falling) within minutes.
DEBUG_DEFAULTS = {"num_epochs": 1, "size_valid_set": 100, "eval_freq": 20, "warmup_steps": 10,
                  "output_dir": "outputs/debug"}
# With PACKING=true a step holds about four times the examples (14 steps instead of 60 on the
# sample): evaluate and warm up as often per example.
DEBUG_PACKING_DEFAULTS = {"eval_freq": 5, "warmup_steps": 3}


def debug_defaults_text() -> str:
    packing = ", ".join(f"{name.upper()}={value}" for name, value in DEBUG_PACKING_DEFAULTS.items())
    return (", ".join(f"{name.upper()}={value}" for name, value in DEBUG_DEFAULTS.items())
            + f" ({packing} with PACKING=true)")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune a causal LM with hand-written LoRA on Alpaca. Every option can also "
                    "be set as an environment variable of the upper-case name, e.g. DEBUG=true or "
                    "BATCH_SIZE=8; a flag wins over the environment; a yes/no flag alone means yes "
                    f"(--debug). DEBUG=true changes these defaults: {debug_defaults_text()}.",
    )
    for f in dataclasses.fields(TrainConfig):
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        # A yes/no flag alone means yes; with a value, it is parsed like the environment variable.
        bare = {"nargs": "?", "const": "true"} if _field_type(f) is bool else {}
        parser.add_argument(*flags, dest=f.name, metavar=f.name.upper(), default=argparse.SUPPRESS,
                            **bare,
                            help=f"{f.metadata['help']} (env {f.name.upper()}, default "
                                 f"{f.default!r})".replace(
                                "%", "%%"))  # argparse formats help with %
    return parser


def load_config(argv: list[str] | None = None,
                environ: typing.Mapping[str, str] | None = None) -> TrainConfig:
    """Build the run's TrainConfig from flags (argv), then environment variables, then defaults.

    Raises:
        ConfigError: a value of the wrong type or out of range, naming the variable.
    """
    environ = os.environ if environ is None else environ
    flags = vars(build_arg_parser().parse_args(argv))
    values = {}
    for f in dataclasses.fields(TrainConfig):
        name = f.name.upper()
        if f.name in flags:
            values[f.name] = parse_value(f"--{f.name}", flags[f.name], _field_type(f))
        elif name in environ:
            values[f.name] = parse_value(name, environ[name], _field_type(f))
    if values.get("debug"):
        values = {**DEBUG_DEFAULTS, **(DEBUG_PACKING_DEFAULTS if values.get("packing") else {}),
                  **values}
    return TrainConfig(**values)


# Environment variables that look like ours but belong to the launcher (torchrun) or the libraries.
FOREIGN_SETTINGS = ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                    "MASTER_ADDR", "MASTER_PORT", "CRASH_BEFORE")


def misspelled_settings(environ: typing.Mapping[str, str] | None = None) -> list[str]:
    """One line for each environment variable that is not a setting but is close to one ("LORA_RANK
    is not a setting of train.py and is ignored; did you mean LORA_R?"). Only upper-case names with
    an underscore are compared, and only a close match counts: the environment holds many other
    programs' variables."""
    environ = os.environ if environ is None else environ
    known = [f.name.upper() for f in dataclasses.fields(TrainConfig)]
    lines = []
    for name in sorted(environ):
        if (name in known or name in FOREIGN_SETTINGS
                or not re.fullmatch(r"[A-Z][A-Z0-9]*_[A-Z0-9_]+", name)):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        # PIP_CACHE_DIR: another program's CACHE_DIR
        if close and not name.endswith(f"_{close[0]}"):
            lines.append(f"{name} is not a setting of train.py and is ignored; did you mean "
                         f"{close[0]}?")
    return lines


def options_markdown() -> str:
    """The options table of docs/options.md, generated from TrainConfig (tests/test_config.py fails
    if it drifts)."""
    def default_text(value) -> str:
        # Strings as they are typed in a shell (an empty one as ""), everything else as Python
        # writes it.
        return (value or '""') if isinstance(value, str) else repr(value)

    debug = ", ".join(f"`{name.upper()}={default_text(value)}`"
                      for name, value in DEBUG_DEFAULTS.items())
    packing_debug = ", ".join(f"`{name.upper()}={value}`"
                              for name, value in DEBUG_PACKING_DEFAULTS.items())
    lines = [
        "# Options of train.py",
        "",
        "Every option of `train.py`, generated from `TrainConfig` in `support/config.py`. Back to "
        "the [README](../README.md).",
        "",
        "Every option is an environment variable, the name in upper case (as the assignment's "
        "`DEBUG`, `MIX_PREC_TRAIN`, `DDP`), and a `--flag` (`--batch_size 8` or `--batch-size 8`); "
        "a flag wins over the environment, booleans accept 1/0/true/false/yes/no, a bad value "
        "stops the run with one line naming it, and `DEBUG=true` changes these defaults unless "
        f"you set them: {debug} ({packing_debug} with `PACKING=true`), and `DATA_PATH` becomes the "
        "shipped sample. An environment variable that is not an option but is close to one "
        "(`LORA_RANK`, `MAX_STEP`) gets a warning line naming the option (`LORA_R`, `MAX_STEPS`). "
        "`python train.py --help` lists the same options with their defaults.", "",
        "| variable / flag | default | meaning |",
        "| --- | --- | --- |",
    ]
    for f in dataclasses.fields(TrainConfig):
        meaning = f.metadata["help"].replace("|", "\\|")
        lines.append(f"| `{f.name.upper()}` / `--{f.name}` | `{default_text(f.default)}` | "
                     f"{meaning} |")
    lines += [
        "",
        "Regenerate this page after changing `TrainConfig` with",
        "`python -c \"from support import config; print(config.options_markdown(), end='')\" > "
        "docs/options.md`.",
    ]
    return "\n".join(lines) + "\n"
