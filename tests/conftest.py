"""Shared test set-up: everything runs offline, on the CPU, on files the repo ships."""

import os

# Set before transformers/datasets are imported by any test module: nothing may reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
