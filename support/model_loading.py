"""Loading the base model and its tokenizer (a hub id or a local folder), shared by train.py and
inference.py (the precision they load in is chosen by precision.py). No remote code is ever run.

Errors are one line that names the setting (`MODEL_PATH` in train.py, `model_path` in inference.py),
says what went wrong and what to do; they are FileNotFoundError when the model could not be found,
ValueError otherwise.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import socket
import threading
import urllib.parse
from pathlib import Path

import torch

from support.peft_format import DEFAULT_TARGET_MODULES
from support.precision import half_precision_dtype

# How long to wait for the hub to answer before treating it as unreachable: huggingface_hub itself
# retries a failed connection five times with backoff, about a minute per file, before it looks in
# its download cache.
HUB_PROBE_TIMEOUT_S = 5


def model_load_error(model_path: str, err: Exception, name: str) -> Exception:
    """The one-line error for a model or tokenizer that did not load."""
    lines = str(err).strip().splitlines()
    reason = lines[0] if lines else type(err).__name__
    error_type = FileNotFoundError if isinstance(err, OSError) else ValueError
    if Path(model_path).expanduser().exists():
        return error_type(f"{name}={model_path!r}: cannot load the model in this folder ({reason})")
    if looks_like_missing_folder(model_path):
        return FileNotFoundError(f"{name}={model_path!r}: no such model "
                                 f"folder{close_folder_hint(model_path)}; pass a local model "
                                 "folder or a hub id such as 'bigscience/bloom-1b7'")
    unreachable = hub_unreachable()
    if unreachable:
        return FileNotFoundError(f"{name}={model_path!r}: not a local folder, not downloaded yet, "
                                 f"and the hub cannot be reached ({unreachable}); connect to the "
                                 "internet to download it once, or point it at a local model "
                                 "folder such as models/tiny-bloom (HF_HUB_OFFLINE=1 skips the "
                                 "hub)")
    return error_type(f"{name}={model_path!r}: not a local folder, and cannot load it from the hub "
                      f"({reason}); check the name, download it once while online (HF_HUB_OFFLINE "
                      "unset), or point it at a local model folder such as models/tiny-bloom")


def looks_like_missing_folder(model_path: str) -> bool:
    """A path (not a hub id like "owner/name") with nothing there: fail at once instead of asking
    the hub, whose retries take most of a minute on a machine without a network. "models/tiny-blom"
    is a path because the folder "models" exists here."""
    path = Path(model_path).expanduser()
    is_path = (model_path.startswith((".", "/", "~")) or model_path.count("/") > 1
               or path.is_absolute()
               or (len(path.parts) > 1 and path.parent.is_dir()))
    return is_path and not path.exists()


def close_folder_hint(model_path: str) -> str:
    """ "; did you mean models/tiny-bloom?" when a folder beside the missing one has a close name,
    else ""."""
    path = Path(model_path).expanduser()
    if not path.parent.is_dir():
        return ""
    close = difflib.get_close_matches(path.name,
                                      [p.name for p in path.parent.iterdir() if p.is_dir()], n=1)
    return f" (did you mean {path.parent / close[0]}?)" if close else ""


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from here ("cannot resolve huggingface.co", "no
    answer within 5 s"), or None when it answers, when HF_HUB_OFFLINE is set (the library then never
    asks) or behind a proxy (which this check cannot see through). Asked once per process, with a
    short timeout."""
    from huggingface_hub import constants

    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")
    if constants.HF_HUB_OFFLINE or any(os.environ.get(var) for var in proxies):
        return None
    url = urllib.parse.urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except socket.gaierror:
            outcome.append(f"cannot resolve {host}")
        except OSError as err:
            outcome.append(f"cannot connect to {host}:{port}: {err.strerror or err}")

    # In a thread: name resolution has no timeout of its own, and a broken DNS can hang for a long
    # time.
    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(HUB_PROBE_TIMEOUT_S)
    return outcome[0] if outcome else f"no answer from {host} within {HUB_PROBE_TIMEOUT_S} s"


def hub_options(model_path: str) -> dict:
    """from_pretrained's options for `model_path`: only the download cache when it is a hub id and
    the hub cannot be reached, so that a model downloaded before still loads and a missing one fails
    at once, not after a minute of retries."""
    if Path(model_path).expanduser().exists():
        return {}
    return {"local_files_only": True} if hub_unreachable() else {}


@contextlib.contextmanager
def no_loading_bar():
    """transformers' progress bars ("Loading weights", "Writing model shards") off inside the block:
    they say nothing our own lines do not."""
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
    # before importing transformers: a typo fails in a moment
    if looks_like_missing_folder(model_path):
        raise model_load_error(model_path, FileNotFoundError(model_path), name)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False,
                                                  **hub_options(model_path))
    except (OSError, ValueError) as err:
        raise model_load_error(model_path, err, name) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_target_modules(model_path: str, name: str = "model_path") -> list[str] | None:
    """The layers LoRA adapts by default in this model's architecture, read from its config.json
    before the weights load (peft_format.DEFAULT_TARGET_MODULES: BLOOM query_key_value,
    Llama/Mistral/Qwen2 q_proj,v_proj, GPT-2 c_attn), or None for an architecture without a default.

    Raises:
        FileNotFoundError, ValueError: the model's config.json cannot be found or read (see
        `model_load_error`).
    """
    return DEFAULT_TARGET_MODULES.get(model_type(model_path, name))


def model_type(model_path: str, name: str = "model_path") -> str:
    """The architecture's model_type ("bloom", "llama", ...), read from the model's config.json
    before the weights load. Raises as `default_target_modules`."""
    if looks_like_missing_folder(model_path):
        raise model_load_error(model_path, FileNotFoundError(model_path), name)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path, trust_remote_code=False,
                                          **hub_options(model_path)).model_type
    except (OSError, ValueError) as err:
        raise model_load_error(model_path, err, name) from None


def quiet_bitsandbytes() -> None:
    """Silence two informational lines of bitsandbytes 0.50: at import, on a CPU with AVX512-BF16,
    that the optional `kernels` package is missing (bitsandbytes' own kernel is used instead); and,
    at every 8-bit matmul whose input is not fp16, that the input is cast to fp16 before it is
    quantized to int8 (as LLM.int8 always does)."""
    for logger in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logging.getLogger(logger).setLevel(logging.ERROR)


def bitsandbytes_config(quantize: str, compute_dtype: torch.dtype):
    """`quantize` "8bit" (LLM.int8) or "4bit" (QLoRA's: NF4 with double quantization, the 4-bit
    matmuls computing in `compute_dtype`) as transformers' BitsAndBytesConfig."""
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)


def load_base_model(model_path: str, device: torch.device, dtype: torch.dtype | str = torch.float32,
                    quantize: str | None = None, compute_dtype: torch.dtype | None = None,
                    name: str = "model_path"):
    """The base model on `device`, its weights in `dtype` ("auto": the checkpoint's own), or
    quantized by
    bitsandbytes (`quantize` "8bit" or "4bit", see `bitsandbytes_config`): then `dtype` is that of
        the weights it
    leaves unquantized (embeddings, norms, biases) and `compute_dtype` (default `dtype`) that of the
    4-bit matmuls."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if quantize:
        quiet_bitsandbytes()
        # Quantized weights are placed while loading; they cannot move after.
        kwargs.update(quantization_config=bitsandbytes_config(quantize, compute_dtype or dtype),
                      device_map={"": device})
    if looks_like_missing_folder(model_path):
        raise model_load_error(model_path, FileNotFoundError(model_path), name)
    try:
        with no_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=False,
                                                         **kwargs, **hub_options(model_path))
    except (OSError, ValueError) as err:
        raise model_load_error(model_path, err, name) from None
    return model if quantize else model.to(device)


def is_norm(module: torch.nn.Module) -> bool:
    """LayerNorm (BLOOM, GPT-2) or an RMSNorm (Llama, Qwen2, Mistral: each model has its own
    class)."""
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def keep_residual_stream_float32(model) -> None:
    """For a base loaded in half precision to train under autocast: norms back in float32, and the
    embeddings' output cast to float32, so that the residual stream (embeddings, norms, the
    additions around each block) stays float32, as with float32 weights. Autocast rounds only the
    matmuls' inputs; on a GPU it also runs layer_norm in float32, but on a CPU layer_norm keeps its
    input's dtype, so half-precision embeddings would make the whole stream half precision."""
    for module in model.modules():
        if is_norm(module):
            module.float()
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.float())


# --- training on a quantized base (QLoRA) ---------------------------------------------------------

def quantized_dtypes(precision_dtype: torch.dtype | None,
                     device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """For training on a quantized base: (dtype of the weights bitsandbytes leaves unquantized,
    compute dtype of the 4-bit matmuls), from the precision setting's autocast dtype (None for
    fp32).

    The unquantized weights (BLOOM's 250,880 x 4,096 embedding is 15 % of BLOOM-7B1) are 16-bit even
    in an fp32 run, or they would hold more memory than the quantized layers save: bf16 where the
    hardware has it, whose range is fp32's, so activation gradients do not underflow without loss
    scaling.

    Raises:
        ValueError: an fp32 run on a GPU without bf16 (T4, V100), whose fp16 activations would need
            a GradScaler.
    """
    if precision_dtype is None and half_precision_dtype(device) == torch.float16:
        raise ValueError("QUANTIZE on a GPU without bf16 (T4, V100) keeps the unquantized weights "
                         "in fp16, whose gradients need loss scaling: set MIX_PREC_TRAIN=true "
                         "(fp16 + GradScaler)")
    return precision_dtype or torch.bfloat16, precision_dtype or torch.float32


def prepare_for_kbit_training(model) -> None:
    """What PEFT's prepare_model_for_kbit_training does that matters here, done on `model` in place:

    - norms in float32 (their small weights exactly; the statistics in float32 whatever the
    activations' dtype);
    - the output layer (unquantized, 16-bit) gets its input in its own dtype: a float32 norm
      (Llama's RMSNorm) would hand it float32 hidden states;
    - 4-bit layers keep their training layout on the CPU: on a CPU with AVX512-BF16, bitsandbytes
      repacks a Linear4bit for its inference kernel at its first forward pass in eval mode (absmax
      rounded to bf16, double quantization undone) and the repacked weight has no backward, so the
      first step after an evaluation fails.

    Not done: PEFT's cast of every other weight to float32 (the embeddings would then outweigh the
    quantized layers), and its hook making the embeddings' output require grad, which only reentrant
    activation checkpointing needs; train.py checkpoints non-reentrantly (tests/test_qlora.py checks
    the gradients with it).
    """
    for module in model.modules():
        if is_norm(module):
            module.float()
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
    output = model.get_output_embeddings()
    if output is not None and output.weight.is_floating_point():
        output.register_forward_pre_hook(lambda module, args: tuple(
            a.to(module.weight.dtype) if torch.is_tensor(a) and a.is_floating_point() else a
            for a in args))


def load_quantized_for_training(model_path: str, device: torch.device, quantize: str,
                                precision_dtype: torch.dtype | None, name: str = "model_path"):
    """The base quantized by bitsandbytes (`quantize` "8bit" or "4bit"), in the dtypes
    `quantized_dtypes` picks for the precision setting's autocast dtype (None for fp32), and
    prepared for training (`prepare_for_kbit_training`)."""
    dtype, compute_dtype = quantized_dtypes(precision_dtype, device)
    model = load_base_model(model_path, device, dtype, quantize=quantize,
                            compute_dtype=compute_dtype, name=name)
    prepare_for_kbit_training(model)
    return model


def describe_quantized_base(quantize: str, precision_dtype: torch.dtype | None,
                            device: torch.device) -> str:
    """The banner's words for the base's dtypes, e.g. "4bit NF4 + double quantization, matmuls in
    float32; the rest bfloat16, norms float32"."""
    dtype, compute_dtype = (str(d).removeprefix("torch.")
                            for d in quantized_dtypes(precision_dtype, device))
    weights = (f"4bit NF4 + double quantization, matmuls in {compute_dtype}" if quantize == "4bit"
               else "8bit LLM.int8")
    return f"{weights}; the rest {dtype}, norms float32"


def base_model_bytes(model: torch.nn.Module) -> int:
    """Bytes of storage the base model holds: its parameters and buffers and bitsandbytes'
    quantization statistics (4-bit absmax and their double quantization, 8-bit row scales), each
    storage counted once (tied weights share one). LoRA's own tensors are left out, so the wrapped
    model can be measured too. Under FSDP: this process's shards."""
    tensors = [p for name, p in model.named_parameters()
               if "lora_" not in name] + list(model.buffers())
    for module in model.modules():
        weight = getattr(module, "weight", None)
        tensors += _quantization_statistics(getattr(weight, "quant_state", None))
        tensors += [getattr(holder, "SCB", None)
                    for holder in (weight, getattr(module, "state", None))]
    # FSDP: this process's shard
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                if torch.is_tensor(t)}
    return sum(storages.values())


def _quantization_statistics(quant_state) -> list[torch.Tensor]:
    # A bitsandbytes QuantState: absmax, code and offset, and with double quantization a nested
    # QuantState (state2).
    if quant_state is None:
        return []
    found = []
    for value in vars(quant_state).values():
        found += [value] if torch.is_tensor(value) else _quantization_statistics(value) if (
            type(value).__name__ == "QuantState") else []
    return found


def enable_activation_checkpointing(model, checkpoint_kwargs: dict) -> None:
    """transformers 5.23 renamed gradient_checkpointing_enable (the old name still works there, with
    a warning); a notebook's preinstalled, older transformers knows only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
