"""Generating with a loaded model, shared by inference.py (`generate_inference`, the command line)
and the
playground: the decoding options, the loaded model, the Alpaca prompt and a batch of responses.

Loading the model and its adapter stays in inference.py, beside `generate_inference`. The prompt
template is passed in (`prompter`: any object with `generate_prompt` and `get_response`, e.g.
prompter.Prompter), so that this package never imports the files above it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from support.precision import INFERENCE_PRECISIONS

# user_inp values (after strip, lower-cased) that select the template without an input
NO_INPUT = ("", "n/a")
# Used only when sampling is on and the caller leaves them unset: a common choice for
# instruction-tuned models.
SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": 50}


class Template(Protocol):
    """What generation needs of a prompt template (prompter.Prompter is one)."""

    def generate_prompt(self, instruction: str, input: str | None = None) -> str: ...

    def get_response(self, output: str) -> str: ...


# --- generation options ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings, validated on creation.

    Args:
        max_new_tokens: most tokens to generate per response (generation also stops at the EOS
            token).
        do_sample: False (default) = greedy (or beam search with num_beams > 1): deterministic. True
            = sample.
        temperature: sampling temperature (> 0); only with do_sample=True (default then 0.7).
        top_p: nucleus sampling mass, in (0, 1]; only with do_sample=True (default then 0.9).
        top_k: sample among the k most likely tokens (0 = no limit); only with do_sample=True
            (default then 50).
        num_beams: beam search width (1 = no beam search).
        repetition_penalty: > 1 discourages repeating tokens (1.0 = off); 1.1-1.3 curbs the loops
            small models fall into under greedy decoding.

    Raises:
        ValueError: a value out of range or of the wrong type, naming it, e.g. "top_p must be in (0,
            1], got 128".
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    num_beams: int = 1
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_int("num_beams", self.num_beams, minimum=1)
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        _check_number("repetition_penalty", self.repetition_penalty, "> 0", lambda v: v > 0)
        if self.temperature is not None:
            _check_number("temperature", self.temperature, "> 0", lambda v: v > 0)
        if self.top_p is not None:
            _check_number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, minimum=0)
        if not self.do_sample:
            for name in SAMPLING_DEFAULTS:
                if getattr(self, name) is not None:
                    # Greedy decoding ignores it; silently ignoring a setting the caller chose would
                    # mislead.
                    raise ValueError(f"{name}={getattr(self, name)!r} only applies when sampling: "
                                     "pass do_sample=True (--sample on the command line); decoding "
                                     "is greedy by default")

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `model.generate` (sampling settings only when sampling)."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                  "num_beams": self.num_beams, "repetition_penalty": float(self.repetition_penalty)}
        if self.do_sample:
            kwargs.update({name: default if getattr(self, name) is None else getattr(self, name)
                           for name, default in SAMPLING_DEFAULTS.items()})
            # transformers refuses an int temperature (temperature=2 passes our check, as 2.0 would)
            kwargs["temperature"], kwargs["top_p"] = (float(kwargs["temperature"]),
                                                      float(kwargs["top_p"]))
        return kwargs


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value, rule: str, ok) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(value):
        raise ValueError(f"{name} must be {rule}, got {value!r}")


# --- the loaded model -----------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model ready to generate (inference.load_model builds it): `model` is a plain transformers
    model (base only, or adapter merged) or a `LoraModelForCasualLM` (adapter unmerged); `note` says
    why an asked-for merge did not happen."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    precision: str
    merged: bool
    note: str | None = None
    base: str = ""
    adapter: Path | None = None

    def describe(self) -> str:
        """One line: which base and adapter are loaded, and how."""
        adapter = (f" + adapter {self.adapter} ({'merged' if self.merged else 'unmerged'})"
                   if self.adapter else "")
        return f"loaded {self.base} ({self.precision} on {self.device}){adapter}"


# --- prompts and responses ------------------------------------------------------------------------

def build_prompt(prompter: Template, instruction: str, user_inp: str | None) -> str:
    """The Alpaca prompt; an input of None, "" or "n/a" (any case) selects the template without an
    input.

    Raises:
        ValueError: an empty instruction or a non-string argument.
    """
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"instruction must be a non-empty string, got {instruction!r}")
    if user_inp is not None and not isinstance(user_inp, str):
        raise ValueError(f"user_inp must be a string or None, got {user_inp!r}")
    if user_inp is None or user_inp.strip().lower() in NO_INPUT:
        return prompter.generate_prompt(instruction)
    return prompter.generate_prompt(instruction, user_inp)


@torch.inference_mode()
def generate_responses(loaded: LoadedModel, prompts: list[str], options: GenerationOptions,
                       prompter: Template, streamer=None, stopping_criteria=None) -> list[str]:
    """Generate for a batch of prompts (left-padded) and return each response, in order.

    Only the new tokens are decoded; `prompter.get_response` strips them (and drops anything up to a
    "### Response:" the model might write itself). `streamer` and `stopping_criteria` go to
    `model.generate`.
    """
    tokenizer = loaded.tokenizer
    batch = tokenizer(prompts, return_tensors="pt", padding=True,
                      return_token_type_ids=False).to(loaded.device)
    output = loaded.model.generate(**batch, **options.generate_kwargs(), streamer=streamer,
                                   stopping_criteria=stopping_criteria,
                                   pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    return [prompter.get_response(text)
            for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


# --- command line ---------------------------------------------------------------------------------

class CliParser(argparse.ArgumentParser):
    """argparse, but a usage error becomes a ValueError, which inference.py's `main` prints as one
    `error: ...` line with exit code 1, like every other user error (argparse's own is a usage block
    and exit code 2)."""

    def error(self, message: str):
        raise ValueError(f"{message} (see --help)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--lora-weights and --model-path: which adapter, on which base."""
    parser.add_argument("--lora-weights",
                        help="adapter folder (train.py's OUTPUT_DIR, or a PEFT adapter)")
    parser.add_argument("--model-path",
                        help="base model hub id or folder (default: the one the adapter names)")


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """--precision and --device: how and where the model is loaded."""
    parser.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="auto",
                        help="auto = bf16 on an A100/H100, fp16 on a T4/V100, fp32 on the CPU "
                             "(default: auto)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
