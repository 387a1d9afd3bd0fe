"""Inject the hand-written LoRA layers of `lora_layer.py` into a Hugging Face causal LM, and
save/load adapters.

`LoraModelForCasualLM(model, config)` freezes the model, swaps every targeted layer for a LoRA
wrapper around it, and leaves only the adapter (plus biases, if asked) trainable. Adapters are saved
in PEFT's on-disk layout (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_A.weight`), so PEFT can load ours and we can load PEFT's. PEFT
itself is only used by the tests, as the reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from lora_layer import Embedding, Linear, LoraLayer, is_conv1d, is_quantized_linear
from support.atomic import atomic_write, write_bytes, write_text_atomically
from support.peft_format import (
    ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, BIAS_CHOICES, DEFAULT_TARGET_MODULES,
    LEGACY_WEIGHTS_NAME, PEFT_KEY_PREFIX,
)
from support.token_loss import causal_lm_token_loss

# Fields of peft.LoraConfig that change the math in ways this repo does not implement; a config that
# sets one is refused rather than silently trained as plain LoRA.
UNSUPPORTED_PEFT_FIELDS = {
    "modules_to_save": None,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "lora_bias": False,
    "exclude_modules": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "use_qalora": False,
    "megatron_config": None,
}


@dataclass
class LoraConfig:
    """The adapter's hyper-parameters, with peft.LoraConfig's field names and meanings.

    Args:
        r: rank of each update.
        lora_alpha: scaling numerator: updates are scaled by lora_alpha / r (or / sqrt(r) with
            use_rslora).
        lora_dropout: dropout on the adapter input during training.
        target_modules: module names (a name matches itself or any `...<name>` suffix), one regex
            string matched against full names, "all-linear", or None for the architecture's default.
        bias: "none", "all" (every bias trains) or "lora_only" (biases of LoRA-wrapped layers
            train).
        fan_in_fan_out: the base weights are stored (in, out), as GPT-2's Conv1D.
        use_rslora: rsLoRA scaling alpha / sqrt(r).
        init_lora_weights: True (PEFT default), "gaussian", "pissa", "pissa_niter_<N>" (PiSSA: the
            targeted base weights become residuals; see `save_pretrained`), or False (random B:
            tests only).
        use_dora: DoRA, a trainable magnitude per output feature (Linear layers only).
        base_model_name_or_path: recorded in adapter_config.json so inference can find the base
            model.

    Raises:
        ValueError: a field out of range, naming it.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    use_dora: bool = False
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        LoraLayer._check_options(self.r, self.lora_alpha, self.lora_dropout, self.init_lora_weights)
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be True or False, got {self.use_dora!r}")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_modules, list):
            if not self.target_modules or not all(isinstance(t, str) and t
                                                  for t in self.target_modules):
                raise ValueError("target_modules must be non-empty module names, got "
                                 f"{self.target_modules!r}")
        elif self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ValueError(f"target_modules must be a list of names, a regex string or None, "
                             f"got {self.target_modules!r}")

    @classmethod
    def from_any(cls, config) -> "LoraConfig":
        """Accept this class, a `peft.LoraConfig` (as the assignment's train.py passes) or any
        object or dict with the same field names. Raises ValueError for PEFT features this repo does
        not implement."""
        if isinstance(config, cls):
            return dataclasses.replace(config)
        values = dict(config) if isinstance(config, dict) else vars(config)
        peft_type = values.get("peft_type", "LORA")
        if getattr(peft_type, "value", peft_type) != "LORA":
            raise ValueError(f"adapter config peft_type must be LORA, got {peft_type!r}")
        for name, inert in UNSUPPORTED_PEFT_FIELDS.items():
            if values.get(name, inert) not in (inert, None, {}, [], False):
                raise ValueError(f"LoRA config field {name}={values[name]!r} is not supported by "
                                 "this repo")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_peft_dict(self) -> dict:
        """adapter_config.json content that peft.PeftConfig.from_pretrained understands."""
        target = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "inference_mode": True,
            **dataclasses.asdict(self),
            "target_modules": target if isinstance(target, str) or target is None else list(target),
            "modules_to_save": None,
        }


# --- finding and wrapping the target layers -------------------------------------------------------

def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_quantized_linear(module)


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Short names (last path component) of the layers LoRA can wrap: what an error message should
    suggest."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if name and (_is_linear_like(module) or isinstance(module, nn.Embedding))}
    return sorted(names)


def _resolve_targets(model: nn.Module, target_modules) -> list[str] | str:
    if target_modules is not None:
        return target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"no default target_modules for model type {model_type!r}; set "
                         "target_modules (layers here: "
                         f"{', '.join(adaptable_module_names(model))})")
    return DEFAULT_TARGET_MODULES[model_type]


def _name_matches(name: str, targets: list[str] | str) -> bool:
    # PEFT's rule: a string is a regex over the full name; a list matches a name exactly or as its
    # suffix.
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_names(model: nn.Module, target_modules) -> list[str]:
    """Full names of the modules to wrap.

    Raises:
        ValueError: nothing matches (the message lists the model's adaptable layers), or a match is
            a layer type LoRA cannot wrap.
    """
    targets = _resolve_targets(model, target_modules)
    if targets == "all-linear":
        output_layer = (model.get_output_embeddings() if hasattr(model, "get_output_embeddings")
                        else None)
        names = [n for n, m in model.named_modules() if _is_linear_like(m)
                 and m is not output_layer]
    else:
        names = [n for n, _ in model.named_modules() if n and _name_matches(n, targets)]
    if not names:
        raise ValueError(f"target modules {targets!r} not found in the base model; its "
                         f"Linear/Embedding layers are: {', '.join(adaptable_module_names(model))}")
    for name in names:
        module = model.get_submodule(name)
        if not (_is_linear_like(module) or isinstance(module, nn.Embedding)):
            raise ValueError(f"target module {name!r} is a {type(module).__name__}; LoRA wraps "
                             "only Linear, Conv1D, bitsandbytes linear and Embedding layers")
    return names


def targets_conv1d(model: nn.Module, target_modules) -> bool:
    """Whether the layers `target_modules` selects are GPT-2 Conv1D layers, which store their weight
    (in, out): a LoraConfig for them wants fan_in_fan_out=True (each layer would otherwise correct
    it, with a warning).

    Raises:
        ValueError: as `find_target_names`.
    """
    return any(is_conv1d(model.get_submodule(name))
               for name in find_target_names(model, target_modules))


def _make_lora_layer(base: nn.Module, config: LoraConfig) -> Linear | Embedding:
    common = dict(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                  init_lora_weights=config.init_lora_weights, use_rslora=config.use_rslora)
    if isinstance(base, nn.Embedding):
        if config.use_dora:
            raise ValueError("use_dora=True is implemented for Linear layers only; target no "
                             "Embedding with DoRA")
        return Embedding(base, **common)
    return Linear(base, fan_in_fan_out=config.fan_in_fan_out, use_dora=config.use_dora, **common)


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def _count_parameter(param: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte; count the unpacked weights as PEFT does.
    if type(param).__name__ == "Params4bit":
        storage = getattr(param, "quant_storage", torch.uint8)
        return param.numel() * 2 * storage.itemsize
    return param.numel()


# --- the model ------------------------------------------------------------------------------------

class LoraModelForCasualLM(nn.Module):
    """A causal LM with hand-written LoRA adapters (the course assignment's spelling;
    `LoraModelForCausalLM` is the same class).

    Args:
        model: a loaded transformers causal LM; it is modified in place (frozen, layers wrapped).
        config: a `LoraConfig`, a `peft.LoraConfig`, or a dict with the same field names.

    Raises:
        ValueError: bad config values or target modules that do not exist in the model.
    """

    def __init__(self, model: nn.Module, config) -> None:
        super().__init__()
        self.model = model
        self.lora_config = LoraConfig.from_any(config)
        if self.lora_config.base_model_name_or_path is None:
            self.lora_config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        for name in find_target_names(model, self.lora_config.target_modules):
            _replace_module(model, name,
                            _make_lora_layer(model.get_submodule(name), self.lora_config))
        self._mark_only_adapter_trainable()

    def _mark_only_adapter_trainable(self) -> None:
        for name, param in self.model.named_parameters():
            param.requires_grad = "lora_" in name
        if self.lora_config.bias == "all":
            for name, param in self.model.named_parameters():
                if name.endswith("bias"):
                    param.requires_grad = True
        elif self.lora_config.bias == "lora_only":
            for _, layer in self.lora_layers():
                if getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad = True

    def __getattr__(self, name: str):
        # Pass attribute look-ups (config, device, activation_checkpointing_enable, ...) to the
        # wrapped model.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, targets: torch.Tensor | None = None, **kwargs):
        """The wrapped model's forward; given `targets` (token_loss.next_token_labels), the summed
        token loss instead of the logits, computed without ever holding them whole where the model
        allows it (train.py's steps)."""
        if targets is None:
            return self.model(*args, **kwargs)
        return causal_lm_token_loss(self.model, targets, *args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        """(name, layer) for every LoRA-wrapped layer, names relative to the wrapped model."""
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                yield name, module

    # --- parameter report ---

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """Returns (trainable parameters, all parameters), counted as PEFT counts them."""
        trainable = total = 0
        for param in self.model.parameters():
            count = _count_parameter(param)
            total += count
            trainable += count if param.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: `trainable params: X || all params: Y || trainable%: Z`."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # --- merging ---

    def _check_no_tied_embedding_targets(self) -> None:
        # A tied table is also the output layer: merging into it would change lm_head, not just the
        # input lookup.
        output = (self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings")
                  else None)
        for name, layer in self.lora_layers():
            if (isinstance(layer, Embedding) and output is not None
                    and output.weight is layer.base_layer.weight):
                raise ValueError(f"cannot merge LoRA into {name!r}: its weight is tied to the "
                                 "output layer, which would change too; keep the adapter unmerged")

    def _check_all_mergeable(self) -> None:
        """Raise before any weight is written if some layer cannot merge, so a refused merge leaves
        every W0 untouched rather than half the model merged."""
        self._check_no_tied_embedding_targets()
        for name, layer in self.lora_layers():
            if layer.merged:
                continue
            layer._check_mergeable()
            if not torch.isfinite(layer._delta_weight()).all():
                raise ValueError(f"LoRA update of {name!r} contains NaN or inf; refusing to merge "
                                 "any adapter")

    def merge_adapter(self) -> None:
        """Merge every adapter into its base weight (see `LoraLayer.merge`).

        Raises:
            ValueError: a tied embedding target, a quantized base, or a non-finite update; nothing
                is merged then.
        """
        self._check_all_mergeable()
        for _, layer in self.lora_layers():
            layer.merge()

    def unmerge_adapter(self) -> None:
        """Undo `merge_adapter`."""
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the adapters and return the plain transformers model, with no LoRA modules left in
        it (savable with `save_pretrained`, loadable with `AutoModelForCausalLM`).

        Raises:
            ValueError: as `merge_adapter`, before anything is merged or unwrapped.
        """
        self._check_all_mergeable()
        for name, layer in list(self.lora_layers()):
            if not layer.merged:
                layer.merge()
            _replace_module(self.model, name, layer.base_layer)
        return self.model

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager: inside it the model computes exactly the base model's output."""
        layers = [layer for _, layer in self.lora_layers()]
        if any(layer.merged for layer in layers):
            warnings.warn("disabling merged adapters: unmerging them first", stacklevel=3)
            self.unmerge_adapter()
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    # --- saving and loading ---

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors under PEFT's keys, plus the biases that `bias` makes trainable; never
        the base."""
        lora_only_biases = {f"{name}.base_layer.bias" for name, _ in self.lora_layers()}
        bias_mode = self.lora_config.bias

        def is_adapter_tensor(name: str) -> bool:
            return ("lora_" in name or (bias_mode == "all" and name.endswith("bias"))
                    or (bias_mode == "lora_only" and name in lora_only_biases))

        return {PEFT_KEY_PREFIX + name: param.detach()
                for name, param in self.model.named_parameters() if is_adapter_tensor(name)}

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
                        initial_state_dict: dict | None = None) -> None:
        """Write `adapter_model.safetensors` (the float32 LoRA tensors), then `adapter_config.json`,
        into `save_directory` (created if missing; other files in it are left alone, as PEFT does).
        Each file is complete or not at all (atomic.atomic_write), so a crash never leaves a
        half-written adapter.

        Args:
            save_directory: the adapter folder.
            state_dict: the adapter tensors to write instead of the model's own, as PEFT takes it
                (train.py's, gathered whole under FSDP).
            path_initial_model_for_weight_conversion: PEFT's option for a PiSSA adapter: the folder
                this model's adapter was saved to right after initialisation. The adapter is then
                written as a plain LoRA adapter of rank 2r for the original base (`pissa_to_lora`).
            initial_state_dict: the same, the initial adapter tensors in memory (train.py's).

        Raises:
            ValueError: the initial adapter's keys or shapes do not fit this adapter.
        """
        folder = Path(save_directory)
        state_dict = self.adapter_state_dict() if state_dict is None else state_dict
        config = self.lora_config
        if path_initial_model_for_weight_conversion is not None:
            initial_state_dict = read_adapter_dir(Path(path_initial_model_for_weight_conversion))[1]
        if initial_state_dict is not None:
            state_dict, config = pissa_to_lora(state_dict, initial_state_dict, config)
        tensors = {key: (t.float() if "lora_" in key else t).contiguous().cpu()
                   for key, t in state_dict.items()}
        with atomic_write(folder / ADAPTER_WEIGHTS_NAME) as staging:
            # Serialized in memory, written by Python: a full disk is an OSError naming the file.
            write_bytes(staging, safetensors_bytes(tensors, metadata={"format": "pt"}))
        write_text_atomically(folder / ADAPTER_CONFIG_NAME,
                              json.dumps(config.to_peft_dict(), indent=2) + "\n")

    def load_adapter_weights(self, tensors: dict[str, torch.Tensor],
                             source: str = "adapter") -> None:
        """Copy adapter tensors (PEFT keys) into the model, strictly.

        Raises:
            ValueError: keys missing or unexpected (all listed), or a tensor whose shape does not
                fit.
        """
        own = self.adapter_state_dict()
        tensors = {_strip_adapter_name(key): value for key, value in tensors.items()}
        missing, unexpected = (sorted(own.keys() - tensors.keys()),
                               sorted(tensors.keys() - own.keys()))
        if missing or unexpected:
            raise ValueError(f"{source}: adapter keys do not match the model: missing "
                             f"{missing or 'none'}; unexpected {unexpected or 'none'}")
        for key, target in own.items():
            if tensors[key].shape != target.shape:
                raise ValueError(f"{source}: {key} has shape {tuple(tensors[key].shape)} but the "
                                 f"base model needs {tuple(target.shape)}: the adapter was trained "
                                 "for another model or rank")
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(tensors[key])

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_dir: str | os.PathLike,
                        is_trainable: bool = False) -> "LoraModelForCasualLM":
        """Wrap `model` with the adapter saved in `adapter_dir` (by this repo or by PEFT).

        Args:
            model: the base model the adapter was trained on.
            adapter_dir: folder with adapter_config.json and adapter_model.safetensors (or PEFT's
                older .bin).
            is_trainable: keep the adapter trainable (to continue training); otherwise frozen, in
                eval mode.

        Raises:
            FileNotFoundError: the folder or one of its files is missing.
            ValueError: a bad config, key mismatch or shape mismatch, naming what is wrong.
        """
        config, tensors = read_adapter_dir(Path(adapter_dir))
        lora_model = cls(model, config)
        lora_model.load_adapter_weights(tensors, source=str(adapter_dir))
        if not is_trainable:
            for param in lora_model.parameters():
                param.requires_grad = False
            lora_model.eval()
        return lora_model


LoraModelForCausalLM = LoraModelForCasualLM


def pissa_to_lora(state_dict: dict[str, torch.Tensor], initial_state_dict: dict[str, torch.Tensor],
                  config: LoraConfig) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """A trained PiSSA adapter as a plain LoRA adapter for the original base model (PEFT's
    `subtract_mutated_init`). PiSSA trains W = W_res + s B A from W_res + s B0 A0 = W0, so

        W = W0 + s (B A - B0 A0) = W0 + s [B, -B0] [A; A0]

    a LoRA adapter of rank 2r (alpha doubled too, so s stays; times sqrt(2) under rsLoRA) with the
    default init. Other tensors (DoRA's magnitude, trained biases) are kept as they are: the weight
    they act on is the same W.

    Raises:
        ValueError: the initial adapter's A and B keys or shapes differ from this adapter's.
    """
    factors = sorted(key for key in state_dict if ".lora_A." in key or ".lora_B." in key)
    initial = {_strip_adapter_name(key): value for key, value in initial_state_dict.items()}
    bad = [key for key in factors
           if key not in initial or initial[key].shape != state_dict[key].shape]
    if bad:
        raise ValueError(f"initial adapter for the PiSSA conversion does not fit this adapter: "
                         f"{', '.join(bad)} missing or of another shape")
    tensors = dict(state_dict)
    for key in factors:
        trained, start = state_dict[key].float().cpu(), initial[key].float().cpu()
        is_a = ".lora_A." in key
        tensors[key] = torch.cat([trained, start], 0) if is_a else torch.cat([trained, -start], 1)
    alpha = config.lora_alpha * (2**0.5 if config.use_rslora else 2)
    return tensors, dataclasses.replace(config, r=2 * config.r, lora_alpha=alpha,
                                        init_lora_weights=True)


def _strip_adapter_name(key: str) -> str:
    # PEFT's in-memory names carry the adapter name (`lora_A.default.weight`); its files do not.
    return key.replace(".default.", ".").removesuffix(".default")


def read_adapter_dir(directory: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read an adapter folder written by this repo or by PEFT.

    Raises:
        FileNotFoundError: missing folder or files. ValueError: unreadable config.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter folder {directory} does not exist; pass the folder that "
                                "save_pretrained wrote (adapter_config.json + "
                                "adapter_model.safetensors)")
    config_path = directory / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no adapter config here; expected a folder written "
                                "by save_pretrained (adapter_config.json + "
                                "adapter_model.safetensors)")
    try:
        config = LoraConfig.from_any(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: {err}") from None
    weights = directory / ADAPTER_WEIGHTS_NAME
    if weights.is_file():
        return config, load_file(str(weights))
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        return config, torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{weights}: adapter weights are missing")
