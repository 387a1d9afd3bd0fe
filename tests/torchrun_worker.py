"""What tests/test_distributed.py launches under torchrun: train.py's own code, plus a record of what each rank did.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/torchrun_worker.py DUMP_DIR
        train.main() exactly as `torchrun ... train.py` runs it, configured by the environment (DDP=true, ...).
    python -m torch.distributed.run ... tests/torchrun_worker.py DUMP_DIR RUNS_JSON
        RUNS_JSON is a list of TrainConfig keyword dicts; each is trained with train.run() in turn, in one process
        group (one launch for several runs: starting torchrun costs more than a tiny run). A dict with
        "float64": true trains that run with the whole model, adapters included, in float64 (see `float64_models`);
        one with "base_weights": "float16" or "bfloat16" loads the base model in that dtype, as train.py does on a
        GPU (see `gpu_base_weights`).

Each rank writes, for each run, into DUMP_DIR/<name of the run's OUTPUT_DIR>/:
    rank<r>.safetensors        its final adapter tensors, straight from its own model (not from OUTPUT_DIR);
    rank<r>-grads.safetensors  the gradients handed to the optimizer at every step ("<step>/<parameter name>");
    rank<r>-writes.json        every file-system change it made inside OUTPUT_DIR, seen by a Python audit hook
                               (open for writing, mkdir, rename/replace, remove, rmtree; writes from C++/Rust
                               code, such as safetensors' own file, show up through the folders they land in);
    rank<r>-bytes.json         the bytes of the frozen base's parameters this rank holds (its FSDP shards) and
                               of the whole base, at the last optimizer step (after the backward pass, when FSDP
                               has resharded every unit; it keeps the root gathered from a forward pass to the
                               backward pass, and after an evaluation's).
Under FSDP the adapter and the gradients are gathered whole (every rank takes part) before they are written.
The tests also use RecordingTrainer in-process, for the single-process references.
Not collected by pytest (the name does not start with test_).
"""

import contextlib
import json
import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers.models.bloom import modeling_bloom  # noqa: E402

import train  # noqa: E402
from support.config import TrainConfig # noqa: E402
from support.fsdp import full_adapter_state, full_tensor # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
WRITES: dict[str, list] = {}  # OUTPUT_DIR -> [(event, path), ...] made by this rank
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _inside_an_output_dir(path) -> str | None:
    if isinstance(path, int):  # an open file descriptor
        return None
    path = os.path.abspath(os.fsdecode(path))
    return next((out for out in WRITES if path == out or path.startswith(out + os.sep)), None)


def _audit(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        paths = [path] if writing else []
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
        paths = [args[0]]
    elif event == "os.rename":  # also raised by os.replace
        paths = [args[0], args[1]]
    else:
        return
    for path in paths:
        out = path is not None and _inside_an_output_dir(path)
        if out:
            WRITES[out].append((event, os.fsdecode(path)))


class RecordingTrainer(train.Trainer):
    """train.Trainer that records the gradients of every optimizer step and, after the final save, leaves this
    rank's adapter and records in `dump_dir`."""

    dump_dir: Path | None = None  # set by main() or by the test

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_grads: dict[str, torch.Tensor] = {}
        named = [(n, p) for n, p in self.raw_model.named_parameters() if p.requires_grad]

        def record_gradients(optimizer, step_args, step_kwargs):
            # Runs when GradScaler.step calls optimizer.step, after all-reduce, unscale_ and clipping: what the
            # update is made from. (A pre-hook, not a replaced optimizer.step, which the LR scheduler warns about.)
            self.step_grads.update({f"{self.progress.step + 1}/{n}": full_tensor(p.grad.detach()).clone()
                                    for n, p in named})
            self.base_bytes = base_bytes(self.raw_model)

        self.optimizer.register_step_pre_hook(record_gradients)

    def save_final_adapter(self) -> None:
        super().save_final_adapter()
        out = os.path.abspath(self.cfg.output_dir)
        target = self.dump_dir / Path(out).name
        target.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in full_adapter_state(self.raw_model).items()}
        save_file(tensors, str(target / f"rank{RANK}.safetensors"))
        save_file(self.step_grads, str(target / f"rank{RANK}-grads.safetensors"))
        (target / f"rank{RANK}-writes.json").write_text(json.dumps(WRITES.get(out, [])))
        (target / f"rank{RANK}-bytes.json").write_text(json.dumps(self.base_bytes))


def base_bytes(model: torch.nn.Module) -> dict:
    """{"held": bytes of the frozen parameters this rank holds, "whole": bytes of all of them}: under FSDP a rank
    holds its shard (DTensor.to_local()) of each; otherwise the whole tensor."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    held = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in frozen)
    return {"held": held, "whole": sum(p.numel() * p.element_size() for p in frozen)}


@contextlib.contextmanager
def float64_models():
    """Within this block train.run() builds its model in float64, base and adapters, and pads on the right.

    Not a precision train.py offers (it would only be slower): a test-only setting in which rounding is ~1e-16, so
    that whatever difference is left between a DDP run and a single process is a real one. In float32, AdamW's
    first steps magnify rounding (see tests/test_distributed.py) and hide small real differences in the noise.
    BLOOM's attention takes its softmax in float32 whatever the model's dtype; here it is taken in float64, or its
    rounding (~6e-8) would be all there is to see. Right padding, because a left-padded row's first positions see
    only padding, and a row that is all mask (-1.8e308 in float64) is NaN after softmax."""
    build, load_tokenizer, bloom_functional = train.build_lora_model, train.load_tokenizer, modeling_bloom.F

    def right_padding_tokenizer(*args, **kwargs):
        tokenizer = load_tokenizer(*args, **kwargs)
        tokenizer.padding_side = "right"
        return tokenizer

    def softmax_in_input_dtype(input, dim=None, dtype=None, **kwargs):
        return torch.nn.functional.softmax(input, dim=dim, **kwargs)

    train.build_lora_model = lambda *args, **kwargs: build(*args, **kwargs).double()
    train.load_tokenizer = right_padding_tokenizer
    # Only modeling_bloom's own name F is replaced: the rest of torch keeps the real functional module.
    modeling_bloom.F = types.SimpleNamespace(**{**vars(torch.nn.functional), "softmax": softmax_in_input_dtype})
    try:
        yield
    finally:
        train.build_lora_model, train.load_tokenizer, modeling_bloom.F = build, load_tokenizer, bloom_functional


@contextlib.contextmanager
def gpu_base_weights(dtype_name: str):
    """Within this block train.run() loads the base model's weights in `dtype_name`, as it does on a GPU with
    MIX_PREC_TRAIN (float16 on a T4, bfloat16 on an A100/H100); on the CPU it otherwise keeps them float32."""
    real = train.base_weight_dtype
    train.base_weight_dtype = lambda precision, device: getattr(torch, dtype_name)
    try:
        yield
    finally:
        train.base_weight_dtype = real


TEST_ONLY_SETTINGS = ("float64", "base_weights")


def test_only_settings(kwargs: dict):
    """The context a run's test-only settings ask for (none: a null context)."""
    if kwargs.get("float64"):
        return float64_models()
    if kwargs.get("base_weights"):
        return gpu_base_weights(kwargs["base_weights"])
    return contextlib.nullcontext()


def main() -> int:
    RecordingTrainer.dump_dir = Path(sys.argv[1]).resolve()
    train.Trainer = RecordingTrainer  # run() builds its trainer through this module-level name
    sys.addaudithook(_audit)
    if len(sys.argv) == 2:
        WRITES[os.path.abspath(os.environ["OUTPUT_DIR"])] = []
        return train.main([])

    runs = json.loads(sys.argv[2])
    configs = [TrainConfig(**{k: v for k, v in kwargs.items() if k not in TEST_ONLY_SETTINGS}) for kwargs in runs]
    for cfg in configs:
        WRITES[os.path.abspath(cfg.output_dir)] = []
    dist = train.setup_distributed(configs[0])
    try:
        for cfg, kwargs in zip(configs, runs):
            with test_only_settings(kwargs):
                train.run(cfg, dist)
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
