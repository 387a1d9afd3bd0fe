"""Hand-written LoRA layers (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen weight W0 (out x in) gets a trainable low-rank update:

    h = W0 x + (alpha / r) * B A dropout(x)        A: r x in (random),  B: out x r (zeros)

so at initialisation B A = 0 and the adapted model starts exactly at the base model. Merging folds
the update into the weight, W = W0 + (alpha / r) * B A, so a merged model costs nothing extra at
inference. rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r) instead, which keeps the update's
size stable as r grows.

Each LoRA module wraps the loaded base layer (`base_layer`), reusing its weight tensor rather than
copying it, so the wrapper works for `nn.Linear`, GPT-2's `Conv1D` and bitsandbytes' 8-bit / 4-bit
layers alike. Parameter names (`base_layer`, `lora_A`, `lora_B`, `lora_embedding_A`,
`lora_embedding_B`) match PEFT's, which is what makes saved adapters interchangeable with PEFT's.

Two variants on `Linear`, as PEFT 0.21 computes them (tests/test_lora_variants.py checks both):

- DoRA (Liu et al., 2024, `use_dora=True`) splits the adapted weight into a learned magnitude per
  output feature and a direction,

      W' = m * (W0 + s B A) / ||W0 + s B A||        s = scaling, the norm of each output row

  the norm treated as a constant in the backward pass (the paper's section 4.3); m starts as
  ||W0 + s B A||, so the layer starts as the base layer.
- PiSSA (Meng et al., 2024, `init_lora_weights="pissa"` or `"pissa_niter_N"`) starts A and B from
  W0's top r singular vectors, s B A = U_r S_r V_r^T, and leaves the residual W0 - s B A in the
  frozen weight: the layer starts as the base layer, and training moves W0's principal part.
  `pissa_niter_N`: a randomized SVD with N iterations.

Dtype rules (shared by Linear and Embedding): the adapter weights are float32 whatever the base
dtype, because GradScaler refuses to unscale fp16 gradients and fp16 Adam updates underflow. The
adapter path runs in float32 (or in the autocast dtype when autocast is on) and its result is cast
back to the base layer's output dtype.
"""

from __future__ import annotations

import math
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANTIZED_LINEAR_NAMES = ("Linear8bitLt", "Linear4bit")

INIT_CHOICES = (True, False, "gaussian", "pissa")  # and "pissa_niter_<N>"
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def is_pissa(init_lora_weights) -> bool:
    """Whether `init_lora_weights` asks for PiSSA: "pissa" (full SVD) or "pissa_niter_N" (a
    randomized SVD with N iterations)."""
    return init_lora_weights == "pissa" or (
        isinstance(init_lora_weights, str) and PISSA_NITER.fullmatch(init_lora_weights) is not None)


def is_quantized_linear(layer: nn.Module) -> bool:
    """A bitsandbytes 8-bit or 4-bit linear. Recognised by class, not isinstance, so that
    bitsandbytes (slow to import, and noisy on a CPU) is only imported by those who quantize."""
    cls = type(layer)
    return cls.__name__ in QUANTIZED_LINEAR_NAMES and cls.__module__.startswith("bitsandbytes")


def is_conv1d(layer: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as (in, out), the transpose of nn.Linear; matched by name so
    that transformers' import location does not matter."""
    return type(layer).__name__ == "Conv1D"


class LoraLayer(nn.Module):
    """What every LoRA module shares: the wrapped base layer, rank and scaling, the adapter set-up's
    common part, merge / unmerge and the repr. An nn.Module itself (not a mixin beside one), so that
    its `extra_repr` is the one Linear and Embedding show.

    Subclasses create their own A and B, and provide `_delta_weight()` (the update in the base
    weight's layout) and the forward.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = 0
        self.lora_alpha = 0.0
        self.scaling = 1.0
        self.merged = False
        self.disabled = False
        self.use_dora = False

    @staticmethod
    def _check_options(r: int, lora_alpha: float, lora_dropout: float, init_lora_weights) -> None:
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if (not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool)
                or lora_alpha <= 0):
            raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
        if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if init_lora_weights not in INIT_CHOICES and not is_pissa(init_lora_weights):
            raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES} or "
                             f"'pissa_niter_<N>', got {init_lora_weights!r}")

    def _start_update(
        self, r: int, lora_alpha: float, lora_dropout: float, init_lora_weights: bool | str,
        use_rslora: bool
    ) -> dict:
        """Check the options and set r, lora_alpha and scaling: the part of `update_layer` and
        `update_layer_embedding` that does not depend on the layer.

        Returns:
            The factory kwargs for the adapter weights: float32 (see the module docstring), on the
            base weight's device.
        """
        self._check_options(r, lora_alpha, lora_dropout, init_lora_weights)
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        return {"device": self.base_layer.weight.device, "dtype": torch.float32}

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, "
                f"merged={self.merged}")

    # --- merge / unmerge --------------------------------------------------------------------------

    def _check_mergeable(self) -> None:
        if is_quantized_linear(self.base_layer):
            raise ValueError(
                f"cannot merge LoRA into a quantized {type(self.base_layer).__name__} base; keep "
                "the adapter unmerged"
            )

    def merge(self) -> None:
        """Fold the update into the base weight: W = W0 + scaling * B A (computed in float32);
        with DoRA, W = m * (W0 + scaling * B A) / ||W0 + scaling * B A||.

        Idempotent: merging a merged layer warns and does nothing. Raises ValueError if the update
            is not finite,
        leaving W0 untouched.
        """
        if self.merged:
            warnings.warn("LoRA layer is already merged; merge() does nothing", stacklevel=2)
            return
        self._check_mergeable()
        delta = self._delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError("LoRA update contains NaN or inf; refusing to merge it into the base "
                             "weight")
        if self.use_dora:
            self._merge_dora(delta)
        else:
            self._add_to_base_weight(delta)
        self.merged = True

    def unmerge(self) -> None:
        """Undo `merge()`: W0 = W - scaling * B A (DoRA: W / (m / norm) - scaling * B A, with
        merge's norm). Unmerging an unmerged layer warns and does nothing."""
        if not self.merged:
            warnings.warn("LoRA layer is not merged; unmerge() does nothing", stacklevel=2)
            return
        if self.use_dora:
            self._unmerge_dora(self._delta_weight())
        else:
            self._add_to_base_weight(-self._delta_weight())
        self.merged = False

    @torch.no_grad()
    def _add_to_base_weight(self, delta: torch.Tensor) -> None:
        # Sum in the merge dtype, then write into the same tensor (other modules, e.g. a tied
        # lm_head, keep seeing the weight they share).
        weight = self.base_layer.weight
        weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))

    def _merge_dtype(self) -> torch.dtype:
        """float32 at least, so that an fp16/bf16 base loses at most one rounding; a float64 base
        stays float64."""
        return torch.promote_types(self.base_layer.weight.dtype, torch.float32)


class Linear(LoraLayer):
    """LoRA on a dense layer (`nn.Linear`, GPT-2 `Conv1D`, or a bitsandbytes 8-bit / 4-bit linear).

    Args:
        base_layer: the loaded layer; its weight is reused, not copied, and stays frozen.
        r: rank of the update (> 0).
        lora_alpha: numerator of the scaling alpha / r.
        lora_dropout: dropout on the adapter's input only; the base path is unchanged.
        fan_in_fan_out: True when the base weight is stored (in, out), as in GPT-2's Conv1D.
        init_lora_weights: True = PEFT's default (A kaiming-uniform, B zeros); "gaussian" = A ~ N(0,
            1/r), B zeros, as the course assignment describes; "pissa" / "pissa_niter_N" = PiSSA
            (module docstring; the base weight becomes the residual); False = A random and B random
            too, for tests only.
        use_rslora: scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r.
        use_dora: DoRA, a trainable magnitude per output feature, `lora_magnitude_vector` (module
            docstring).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = self._resolve_fan_in_fan_out(base_layer, fan_in_fan_out)
        self.in_features, self.out_features = self._base_shape(base_layer)
        self.update_layer(r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora)

    @staticmethod
    def _resolve_fan_in_fan_out(base_layer: nn.Module, fan_in_fan_out: bool) -> bool:
        # Same correction PEFT makes: the flag must describe how the weight is actually stored.
        if is_conv1d(base_layer) and not fan_in_fan_out:
            warnings.warn("fan_in_fan_out=False but the base layer is Conv1D; setting "
                          "fan_in_fan_out=True")
            return True
        if isinstance(base_layer, nn.Linear) and fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True but the base layer is nn.Linear; setting "
                          "fan_in_fan_out=False")
            return False
        return fan_in_fan_out

    @staticmethod
    def _base_shape(base_layer: nn.Module) -> tuple[int, int]:
        if is_conv1d(base_layer):
            in_features, out_features = base_layer.weight.shape
            return in_features, out_features
        if hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features"):
            return base_layer.in_features, base_layer.out_features
        raise ValueError(f"LoRA Linear cannot wrap {type(base_layer).__name__}: it has no in/out "
                         "features")

    def update_layer(
        self,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        """Create (or re-create) the adapter: A (r x in), B (out x r), dropout and scaling; with
        DoRA also the magnitude m (out), initialised after A and B, as PEFT does.

        Raises:
            ValueError: r <= 0, lora_alpha <= 0, dropout outside [0, 1), an unknown init, or DoRA /
                PiSSA on a quantized base.
        """
        factory = self._start_update(r, lora_alpha, lora_dropout, init_lora_weights, use_rslora)
        if (use_dora or is_pissa(init_lora_weights)) and is_quantized_linear(self.base_layer):
            what = "use_dora=True" if use_dora else f"init_lora_weights={init_lora_weights!r}"
            raise ValueError(f"{what} needs the base weight unquantized, but the base layer is a "
                             f"quantized {type(self.base_layer).__name__}; load it unquantized")
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        if is_pissa(init_lora_weights):
            self.pissa_init(init_lora_weights)
        else:
            self.reset_lora_parameters(init_lora_weights)
        self.use_dora = use_dora
        if use_dora:
            norm = self._dora_norm(self._delta_weight())  # m = ||W0 + s B A||: W' = W0 at the start
            self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_A.weight.dtype))

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str) -> None:
        """Initialise A randomly and B to zero, so the adapted layer starts equal to the base
        layer."""
        if init_lora_weights is False:
            # nn.Linear's default init already made A and B random: a non-zero update, useful in
            # tests.
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            # nn.Linear's own init, as microsoft/LoRA and PEFT do.
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def pissa_init(self, init_lora_weights: str) -> None:
        """PiSSA: W0 = U S V^T (its top r by a full SVD, or a randomized one with N iterations);
        A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s), so s B A is W0's principal part, and the
        base weight keeps the rest. PEFT's `pissa_init` step for step: a float32 SVD, the residual
        written back in the weight's dtype."""
        weight = self.base_layer.weight
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"PiSSA needs a float32/float16/bfloat16 base weight, got "
                             f"{weight.dtype}")
        w0 = self._out_in(weight.to(torch.float32))
        if init_lora_weights == "pissa":
            u, s, vh = torch.linalg.svd(w0, full_matrices=False)
            u_r, s_r, vh_r = u[:, : self.r], s[: self.r] / self.scaling, vh[: self.r]
        else:
            niter = int(PISSA_NITER.fullmatch(init_lora_weights).group(1))
            u_r, s_r, v_r = torch.svd_lowrank(w0, self.r, niter=niter)
            s_r, vh_r = s_r / self.scaling, v_r.t()
        self.lora_A.weight.data = torch.diag(torch.sqrt(s_r)) @ vh_r
        self.lora_B.weight.data = u_r @ torch.diag(torch.sqrt(s_r))
        residual = w0 - self.scaling * self.lora_B.weight @ self.lora_A.weight
        weight.data = self._out_in(residual).to(weight.dtype)  # _out_in is its own inverse

    def _out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight in the base layer's layout, as (out x in); GPT-2's Conv1D stores (in x out)."""
        return weight.T if self.fan_in_fan_out else weight

    def _delta_weight(self) -> torch.Tensor:
        dtype = self._merge_dtype()
        delta = (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    # --- DoRA ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _dora_norm(self, delta: torch.Tensor) -> torch.Tensor:
        """||W0 + delta|| per output feature (a row of the out x in weight), in float32 at least,
        outside the graph. `delta`: scaling * B A in the base weight's layout."""
        weight = self.base_layer.weight
        return torch.linalg.norm(self._out_in(weight.to(delta.dtype) + delta), dim=1)

    def _dora_factor(self, norm: torch.Tensor) -> torch.Tensor:
        """m / norm, shaped to scale the rows of an (out x in) weight, or the columns of Conv1D's
        (in x out)."""
        factor = (self.lora_magnitude_vector.to(norm.dtype) / norm).view(-1, 1)
        return factor.T if self.fan_in_fan_out else factor

    @torch.no_grad()
    def _merge_dora(self, delta: torch.Tensor) -> None:
        # Kept: unmerging needs the norm of W0 + delta, which the merged weight no longer tells.
        self._dora_merged_norm = self._dora_norm(delta)
        weight = self.base_layer.weight
        factor = self._dora_factor(self._dora_merged_norm)
        weight.copy_((factor * (weight.to(delta.dtype) + delta)).to(weight.dtype))

    @torch.no_grad()
    def _unmerge_dora(self, delta: torch.Tensor) -> None:
        weight = self.base_layer.weight
        factor = self._dora_factor(self._dora_merged_norm)
        weight.copy_((weight.to(delta.dtype) / factor - delta).to(weight.dtype))
        del self._dora_merged_norm

    def _dora_update(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output (the bias left out):

            m / ||W0 + s B A|| * (W0 x + s B A x) - W0 x

        As PEFT computes it: without dropout, W0 x is the base output less its bias; with dropout
        (training) both terms see the same dropped-out input, so W0 dropout(x) is computed anew."""
        lora_input = _cast_for_adapter(x, self.lora_A.weight.dtype)
        weight = self._out_in(self.base_layer.weight).to(self.lora_A.weight.dtype)  # norm in fp32
        scaled_ba = self.scaling * (self.lora_B.weight @ self.lora_A.weight).detach()
        norm = torch.linalg.norm(weight + scaled_ba, dim=1).detach()  # a constant (section 4.3)
        factor = (self.lora_magnitude_vector / norm).view(1, -1)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            lora_input = self.lora_dropout(lora_input)
            base_part = F.linear(lora_input, weight)
        else:
            bias = getattr(self.base_layer, "bias", None)
            base_part = result if bias is None else result - bias
        lora_part = self.lora_B(self.lora_A(lora_input))
        return (factor - 1) * base_part + factor * lora_part * self.scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """h = base(x) + scaling * B A dropout(x) (DoRA: `_dora_update`); just base(x) while merged
        or disabled."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        if self.use_dora:
            return (result + self._dora_update(x, result)).to(result.dtype)
        lora_input = self.lora_dropout(_cast_for_adapter(x, self.lora_A.weight.dtype))
        after_a = self.lora_A(lora_input)
        # scale the small (out x r) B, not the (tokens x out) update
        scaled_b = self.lora_B.weight * self.scaling
        # e.g. a float16 base without autocast: the update is cast back
        if after_a.dtype != result.dtype:
            return result + F.linear(after_a, scaled_b).to(result.dtype)
        # result + after_a @ scaled_b^T in one addmm, faster than the plain form
        # (bench/results/lora.md)
        out_features = result.shape[-1]
        summed = torch.addmm(result.reshape(-1, out_features),
                             after_a.reshape(-1, after_a.shape[-1]), scaled_b.T)
        return summed.view(result.shape)


class Embedding(LoraLayer):
    """LoRA on an embedding table: E = E0 + scaling * (B A)^T, with A (r x vocab) zeros and
    B (dim x r) normal.

    The zero/normal roles are swapped relative to Linear (as in microsoft/LoRA and PEFT): the update
    still starts at zero, and the gradient reaching A through a random B is non-zero from the first
    step. No dropout: the input is token ids. Args as for `Linear`, without `fan_in_fan_out`.
    """

    def __init__(
        self,
        base_layer: nn.Embedding,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
    ) -> None:
        if not isinstance(base_layer, nn.Embedding):
            raise ValueError("LoRA Embedding needs an nn.Embedding base, got "
                             f"{type(base_layer).__name__}")
        super().__init__(base_layer)
        self.update_layer_embedding(r, lora_alpha, lora_dropout, init_lora_weights, use_rslora)

    def update_layer_embedding(
        self,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
    ) -> None:
        """Create (or re-create) the adapter: lora_embedding_A (r x vocab), lora_embedding_B
        (dim x r).

        Raises:
            ValueError: r <= 0, lora_alpha <= 0, dropout outside [0, 1), or an unknown init.
        """
        factory = self._start_update(r, lora_alpha, lora_dropout, init_lora_weights, use_rslora)
        if is_pissa(init_lora_weights):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} (PiSSA) is for Linear "
                             "layers only, not for Embedding")
        vocab, dim = self.base_layer.num_embeddings, self.base_layer.embedding_dim
        self.lora_embedding_A = nn.Parameter(torch.empty(r, vocab, **factory))
        self.lora_embedding_B = nn.Parameter(torch.empty(dim, r, **factory))
        self.reset_lora_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str) -> None:
        """A zeros, B normal, for every init choice except False (both random, for tests), as PEFT
        does: the random factor is already B here, so "gaussian" has nothing left to change."""
        nn.init.normal_(self.lora_embedding_B)
        if init_lora_weights is False:
            nn.init.normal_(self.lora_embedding_A)
        else:
            nn.init.zeros_(self.lora_embedding_A)

    def _delta_weight(self) -> torch.Tensor:
        # (dim x r) @ (r x vocab) = dim x vocab; the table is stored vocab x dim.
        dtype = self._merge_dtype()
        return (self.lora_embedding_B.to(dtype) @ self.lora_embedding_A.to(dtype)).T * self.scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """E0[x] + scaling * (A^T[x]) B^T; just E0[x] while merged or disabled."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        base = self.base_layer
        # Row lookup in A^T (vocab x r), with the base table's own padding/max-norm options.
        after_a = F.embedding(
            x,
            self.lora_embedding_A.T,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        update = after_a @ (self.lora_embedding_B.T * self.scaling)
        return result + update.to(result.dtype)


def _cast_for_adapter(x: torch.Tensor, adapter_dtype: torch.dtype) -> torch.Tensor:
    """Bring the input to the adapter's dtype (float32), unless autocast is on: autocast casts
    matmul inputs to its own dtype anyway, and a float32 copy of the activations would only cost
    memory."""
    if x.dtype == adapter_dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(adapter_dtype)
