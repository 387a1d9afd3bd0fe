"""Precisions by name, for training and inference alike: one table of names and dtypes, and one rule
to pick one.

    fp32, bf16, fp16   the dtype of the base weights and, below fp32, of autocast's matmuls
    8bit, 4bit         a base quantized by bitsandbytes (inference's precision; train.py's QUANTIZE)
    auto (or unset)    half precision (bf16 where the hardware has it, else fp16) when mixed
                       precision is asked for, fp32 otherwise: training asks with
                       MIX_PREC_TRAIN=true, inference on every GPU
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(DTYPES)  # what train.py's PRECISION may say
QUANTIZED = ("8bit", "4bit")
INFERENCE_PRECISIONS = ("auto", *PRECISIONS, *QUANTIZED)  # what inference.py's precision may say


def has_native_bf16(device: torch.device) -> bool:
    """A GPU with bf16 in hardware (compute capability 8.0 and newer: A100, H100, RTX 30xx), or the
    CPU, whose half precision is bf16 (emulated on some: cpu_emulates_bf16). A T4 or V100 only
    emulates bf16, slower than fp16, though torch.cuda.is_bf16_supported() says True there by
    default."""
    return device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_emulates_bf16() -> bool:
    """A CPU without AVX512-BF16 and without AMX (most laptops' Intel chips, older servers): torch
    computes bf16 matmuls in software there, several times slower than fp32 (docs/benchmarks.md)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if not all(hasattr(cpu, name) for name in checks):  # another torch: assume the hardware has it
        return False
    return not any(getattr(cpu, name)() for name in checks)


def emulated_bf16_warning(precision: str, quantize: str, device: torch.device) -> str | None:
    """The warning for a run that computes in bf16 on a CPU that emulates it: PRECISION or
    MIX_PREC_TRAIN's bf16, or QUANTIZE in fp32 or bf16 (the quantized base's other layers are
    bf16)."""
    if device.type != "cpu" or precision not in ("bf16", "fp32") or not cpu_emulates_bf16():
        return None
    if quantize:
        return (f"QUANTIZE={quantize} on this CPU computes its 16-bit layers in bf16, which it "
                "emulates (no AVX512-BF16 or AMX): a step is several times slower than unquantized")
    if precision == "bf16":
        return ("bf16 on this CPU is emulated (no AVX512-BF16 or AMX): a step is several times "
                "slower than in fp32; PRECISION=fp32 trains faster here")
    return None


def half_precision_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it; else fp16, which needs loss scaling (a GradScaler) to
    train."""
    return torch.bfloat16 if has_native_bf16(device) else torch.float16


def resolve_precision(requested: str | None, device: torch.device, mixed: bool) -> str:
    """The precision to use: `requested` when it names one, else (None, "" or "auto") the hardware's
    half precision if `mixed`, fp32 if not.

    Args:
        requested: a name of INFERENCE_PRECISIONS, "" or None.
        device: where the model computes (decides between bf16 and fp16).
        mixed: whether "auto" may choose half precision (training: MIX_PREC_TRAIN; inference: on a
            GPU).

    Raises:
        ValueError: an unknown name.
    """
    if requested not in (None, "", *INFERENCE_PRECISIONS):
        raise ValueError(f"precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got "
                         f"{requested!r}")
    if requested not in (None, "", "auto"):
        return requested
    if not mixed:
        return "fp32"
    return "bf16" if half_precision_dtype(device) == torch.bfloat16 else "fp16"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast computes in for a training precision; None for fp32 (no autocast)."""
    return None if precision == "fp32" else DTYPES[precision]
