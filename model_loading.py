"""Loading the base model and its tokenizer (a hub id or a local folder), shared by train.py and inference.py, and
the one hardware question both ask before choosing a precision. No remote code is ever run.

Errors are one line that names the setting (`MODEL_PATH` in train.py, `model_path` in inference.py), says what went
wrong and what to do; they are FileNotFoundError when the model could not be found, ValueError otherwise.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from lora_model import DEFAULT_TARGET_MODULES

QUANTIZED = ("8bit", "4bit")


def has_native_bf16(device: torch.device) -> bool:
    """The CPU, or a GPU with bf16 in hardware (compute capability 8.0 and newer: A100, H100, RTX 30xx). A T4 or V100
    only emulates bf16, slower than fp16, though torch.cuda.is_bf16_supported() says True there by default."""
    return device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)


def half_precision_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it; else fp16, which needs loss scaling (a GradScaler) to train."""
    return torch.bfloat16 if has_native_bf16(device) else torch.float16


def model_load_error(model_path: str, err: Exception, name: str) -> Exception:
    """The one-line error for a model or tokenizer that did not load."""
    lines = str(err).strip().splitlines()
    reason = lines[0] if lines else type(err).__name__
    error_type = FileNotFoundError if isinstance(err, OSError) else ValueError
    if Path(model_path).expanduser().exists():
        return error_type(f"{name}={model_path!r}: cannot load the model in this folder ({reason})")
    if model_path.startswith((".", "/", "~")) or model_path.count("/") > 1:  # a path, not a hub id
        return FileNotFoundError(f"{name}={model_path!r}: no such model folder; pass a local model folder or a hub "
                                 "id such as 'bigscience/bloom-1b7'")
    return error_type(f"{name}={model_path!r}: not a local folder, and cannot load it from the hub ({reason}); "
                      "check the name, download it once while online (HF_HUB_OFFLINE unset), or point it at a "
                      "local model folder such as models/tiny-bloom")


def looks_like_missing_folder(model_path: str) -> bool:
    """A path (not a hub id like "owner/name") with nothing there: fail at once instead of asking the hub, whose
    retries take most of a minute on a machine without a network."""
    is_path = model_path.startswith((".", "/", "~")) or model_path.count("/") > 1 or Path(model_path).is_absolute()
    return is_path and not Path(model_path).expanduser().exists()


@contextlib.contextmanager
def no_loading_bar():
    """transformers' progress bars ("Loading weights", "Writing model shards") off inside the block: they say
    nothing our own lines do not."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def load_tokenizer(model_path: str, name: str = "model_path"):
    """The base model's tokenizer; one without a pad token pads with its EOS token."""
    from transformers import AutoTokenizer

    if looks_like_missing_folder(model_path):
        raise model_load_error(model_path, FileNotFoundError(model_path), name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise model_load_error(model_path, err, name) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_target_modules(model_path: str, name: str = "model_path") -> list[str] | None:
    """The layers LoRA adapts by default in this model's architecture, read from its config.json before the weights
    load (lora_model.DEFAULT_TARGET_MODULES: BLOOM query_key_value, Llama/Mistral/Qwen2 q_proj,v_proj, GPT-2
    c_attn), or None for an architecture without a default.

    Raises:
        FileNotFoundError, ValueError: the model's config.json cannot be found or read (see `model_load_error`).
    """
    from transformers import AutoConfig

    if looks_like_missing_folder(model_path):
        raise model_load_error(model_path, FileNotFoundError(model_path), name)
    try:
        model_type = AutoConfig.from_pretrained(model_path, trust_remote_code=False).model_type
    except (OSError, ValueError) as err:
        raise model_load_error(model_path, err, name) from None
    return DEFAULT_TARGET_MODULES.get(model_type)


def load_base_model(model_path: str, device: torch.device, dtype: torch.dtype | str = torch.float32,
                    quantize: str | None = None, name: str = "model_path"):
    """The base model on `device`, its weights in `dtype` ("auto": the checkpoint's own), or quantized by
    bitsandbytes (`quantize` "8bit" or "4bit"; transformers 5 takes these as a `BitsAndBytesConfig`)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": dtype}
    if quantize == "8bit":
        # LLM.int8 computes in fp16 (it would cast bf16 inputs anyway); the layers it leaves alone are fp16 too.
        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "dtype": torch.float16}
    elif quantize == "4bit":
        compute = half_precision_dtype(device)
        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_compute_dtype=compute), "dtype": compute}
    if quantize:
        kwargs["device_map"] = {"": device}  # quantized weights are placed while loading; they cannot move after
    if looks_like_missing_folder(model_path):
        raise model_load_error(model_path, FileNotFoundError(model_path), name)
    try:
        with no_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as err:
        raise model_load_error(model_path, err, name) from None
    return model if quantize else model.to(device)


def is_norm(module: torch.nn.Module) -> bool:
    """LayerNorm (BLOOM, GPT-2) or an RMSNorm (Llama, Qwen2, Mistral: each model has its own class)."""
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def keep_residual_stream_float32(model) -> None:
    """For a base loaded in half precision to train under autocast: norms back in float32, and the embeddings'
    output cast to float32, so that the residual stream (embeddings, norms, the additions around each block) stays
    float32, as with float32 weights. Autocast rounds only the matmuls' inputs; on a GPU it also runs layer_norm in
    float32, but on a CPU layer_norm keeps its input's dtype, so half-precision embeddings would make the whole
    stream half precision."""
    for module in model.modules():
        if is_norm(module):
            module.float()
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.float())


def enable_activation_checkpointing(model, checkpoint_kwargs: dict) -> None:
    """transformers 5.23 renamed gradient_checkpointing_enable (the old name still works there, with a warning);
    a notebook's preinstalled, older transformers knows only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
