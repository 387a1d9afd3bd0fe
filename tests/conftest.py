"""Shared test set-up (everything runs offline, on the CPU, on files the repo ships) and the helpers several test
files use: `from conftest import TINY_BLOOM, metric_rows, ...`."""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

# Set before transformers/datasets are imported (here, or by any test module): nothing may reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from support.config import TrainConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_BLOOM = REPO / "models" / "tiny-bloom"
SAMPLE = REPO / "data" / "alpaca_sample.json"


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors a run (or a checkpoint) saved in `folder`."""
    return load_file(str(folder / "adapter_model.safetensors"))


def metric_rows(output_dir: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per line ([] before the file exists; a line being written is skipped)."""
    path = output_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """48 Alpaca records: 8 for validation, 40 to train on (an even count, so DistributedSampler pads nothing)."""
    path = tmp_path_factory.mktemp("data") / "small.json"
    path.write_text(json.dumps(json.loads(SAMPLE.read_text(encoding="utf-8"))[:48]), encoding="utf-8")
    return path


def tiny_settings(root: Path, data: Path, name: str = "out", **overrides) -> dict:
    """TrainConfig keywords for a run small enough for a unit test, into root/name (tokenized data cached in
    root/cache): 3 steps of 4 examples, float32, no dropout, no warm-up (a warm-up's first lr is 0, which makes
    step 1 move nothing), evaluation only at the end."""
    settings = dict(model_path=str(TINY_BLOOM), data_path=str(data), output_dir=str(root / name),
                    cache_dir=str(root / "cache"), max_length=128, batch_size=4, grad_accum_steps=1,
                    lora_dropout=0.0, warmup_steps=0, size_valid_set=8, eval_freq=0, num_epochs=1, max_steps=3)
    settings.update(overrides)
    return settings


def user_command(folder: Path, **settings) -> subprocess.CompletedProcess:
    """`SETTING=... python train.py` with only `settings` set (the environment's other TrainConfig variables
    removed), from `folder`, which sees the repo's models/ and data/ as a clone's root would."""
    for name in ("models", "data"):
        if not (folder / name).exists():
            (folder / name).symlink_to(REPO / name)
    env = {k: v for k, v in os.environ.items() if k.lower() not in FIELDS}
    # A bound for a hung run, not a speed check (bf16 and bitsandbytes are slow on a CPU without AVX-512).
    return subprocess.run([sys.executable, str(REPO / "train.py")], cwd=folder, env={**env, **settings},
                          capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """An adapter trained by train.run for a few steps at a high learning rate, so it changes the greedy text (the
    quick-start path, in a few seconds)."""
    import train

    tmp = tmp_path_factory.mktemp("adapter")
    data = tmp / "small.json"
    data.write_text(json.dumps(json.loads(SAMPLE.read_text(encoding="utf-8"))[:24]), encoding="utf-8")
    cfg = TrainConfig(**tiny_settings(tmp, data, size_valid_set=4, max_steps=5, learning_rate=3e-3))
    train.run(cfg, train.DistEnv())
    return tmp / "out"


@pytest.fixture(scope="session")
def quick_start_run(tmp_path_factory):
    """(folder, result) of the README's quick start, `DEBUG=true MODEL_PATH=models/tiny-bloom python train.py`, run
    once, as typed, for the tests that check it (test_train's and test_evaluation's)."""
    folder = tmp_path_factory.mktemp("quick-start")
    return folder, user_command(folder, DEBUG="true", MODEL_PATH="models/tiny-bloom")


@pytest.fixture
def fake_gpu(monkeypatch):
    """`fake_gpu(native_bf16)`: torch.cuda.is_bf16_supported answers as on an A100 (native bf16) or a T4 (emulation
    only, which it reports as supported by default)."""
    def answer_as(native_bf16: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: native_bf16 or including_emulation)
    return answer_as


# Hypothesis's material for settings: every TrainConfig field, and values a user might type for one.
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
ODD_VALUES = st.one_of(
    st.text(max_size=12),
    st.integers(-2**70, 2**70).map(str),
    st.floats().map(repr),
    st.sampled_from(["", " ", "true", "No", "latest", "-1", "0", "1e400", "nan", "-inf", "1_000", "0x10", "\u0663",
                     "4294967296", "2147483648", "1" * 5000, "fp16", "all-linear", " , ", "\x00"]),
)


@contextlib.contextmanager
def one_torch_thread():
    """The tiny models' ops take microseconds: on a busy CPU, waiting for a descheduled second thread costs more
    than the op (see bench/bench_lora.py), so the tests of them run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
