"""PEFT's on-disk names and per-architecture defaults, shared by the LoRA model, checkpoints and
model loading.

They live here, below `lora_model.py`, so that the package never imports the files on top of it.
"""

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # what PEFT wrote before safetensors
PEFT_KEY_PREFIX = "base_model.model."
BIAS_CHOICES = ("none", "all", "lora_only")

# Which layers get LoRA when the config names none: PEFT's defaults for these architectures.
DEFAULT_TARGET_MODULES = {
    "bloom": ["query_key_value"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}
