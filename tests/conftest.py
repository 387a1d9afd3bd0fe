"""Shared test set-up: everything runs offline, on the CPU, on files the repo ships."""

import os

import pytest
import torch

# Set before transformers/datasets are imported by any test module: nothing may reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def fake_gpu(monkeypatch):
    """`fake_gpu(native_bf16)`: torch.cuda.is_bf16_supported answers as on an A100 (native bf16) or a T4 (emulation
    only, which it reports as supported by default)."""
    def answer_as(native_bf16: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: native_bf16 or including_emulation)
    return answer_as
