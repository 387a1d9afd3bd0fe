"""Fine-tune a causal LM (BLOOM-1.7B by default) with hand-written LoRA on the Stanford Alpaca data.

    python train.py                                                  # one GPU (or the CPU)
    DEBUG=true MODEL_PATH=models/tiny-bloom python train.py          # offline quick start, minutes on a CPU
    MIX_PREC_TRAIN=true python train.py                              # bf16 where supported, else fp16 + GradScaler
    DDP=true torchrun --standalone --nproc_per_node=2 train.py       # data parallel on 2 GPUs (or 2 CPU processes)
    DDP=true torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py
                                                                     # the same on each of 2 machines, 4 GPUs each

All settings live in `config.TrainConfig` (env vars or flags; `python train.py --help`). The loop follows nanoGPT:
distributed set-up in one block, `raw_model` for saving, `if dist.is_master` guards for printing and writing.

Runs on borrowed machines end without warning (a Kaggle session's time limit, a reclaimed spot node), so a run
must lose at most the steps since its last checkpoint, and must never leave a damaged checkpoint behind:
  * every SAVE_STEPS steps, at each epoch's end and at the last step, OUTPUT_DIR/checkpoint-<step>/ is written
    into a temporary folder, flushed to disk (fsync) and renamed into place; its manifest.json (step, settings,
    each file's size and SHA-256) is what marks it complete (checkpoint.py). SAVE_TOTAL_LIMIT=N keeps the newest N.
  * RESUME_FROM=latest continues from the newest complete checkpoint exactly where the run stopped: adapter,
    optimizer, learning-rate schedule, GradScaler, every random generator of every rank, and the position in the
    data. Settings that would make the continued run another run are refused (config.RESUME_MUST_MATCH).
  * SIGTERM (what a scheduler, torchrun or a spot reclaim sends) or Ctrl-C finishes the current optimizer step,
    writes a checkpoint and exits with 128 + the signal number. Under DDP all ranks stop after the same step.
  * A DDP rank that dies or hangs ends the others with an error (at the latest after DDP_TIMEOUT seconds)
    instead of leaving them waiting for it.
Exit codes: 0 finished; 1 bad setting or data, failed run, checkpoint not written, lost DDP peer; 143 (SIGTERM) or
130 (Ctrl-C) stopped after writing a checkpoint; 130 also for a second Ctrl-C, which stops at once without one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import inspect
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset
from tqdm.auto import tqdm

from alpaca_data import (DataError, LengthGroupedSampler, PadCollator, data_stats_line, load_records,
                         split_train_valid, tokenize_records, validate_records)
from checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_PREFIX, TRAINER_STATE_NAME, check_resumable, checkpoint_dirs,
                        find_latest_checkpoint, identity_hash, prune_checkpoints, rng_state, run_identity,
                        set_rng_state, write_checkpoint)
from config import ConfigError, TrainConfig, load_config
from lora_model import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LoraConfig, LoraModelForCasualLM, read_adapter_dir
from prompter import Prompter
from token_loss import count_label_tokens, next_token_labels, sum_token_loss

METRICS_NAME = "metrics.jsonl"
LOSS_CURVE_NAME = "loss_curve.png"


class RunError(RuntimeError):
    """A problem found while running (model cannot load, loss became NaN); printed as one line."""


class TrainingStopped(Exception):
    """SIGTERM or SIGINT stopped the run after a step; a checkpoint of that step was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


# --- distributed set-up: everything DDP needs to know, in one place ----------------------------------------------

@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank among world_size processes, and the device it drives."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    ddp: bool = False

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> DistEnv:
    """Join torchrun's process group when DDP=true; otherwise pick the single device.

    Returns:
        The DistEnv of this process (rank 0 of 1 on the single device without DDP).

    Raises:
        ConfigError: DDP=true without torchrun's environment variables, or torchrun's several processes without
            DDP=true.
    """
    if not cfg.ddp:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Each process would train alone on all the data and all would write the same OUTPUT_DIR.
            raise ConfigError(f"DDP is not true but torchrun started WORLD_SIZE={os.environ['WORLD_SIZE']} "
                              "processes; set DDP=true (or launch one process with `python train.py`)")
        return DistEnv(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    missing = [v for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(f"DDP=true needs torchrun's variables ({', '.join(missing)} unset); launch with "
                          "`DDP=true torchrun --standalone --nproc_per_node=2 train.py`")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        # One GPU per process, chosen by LOCAL_RANK; NCCL moves the gradients between them.
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # init_method defaults to env://: MASTER_ADDR/MASTER_PORT, set by torchrun (--standalone, or the c10d
    # rendezvous of a multi-node launch). device_id binds NCCL's communicator to this process's GPU.
    # The timeout bounds how long a rank waits in a collective for a peer that hangs (a peer that dies usually
    # breaks the connection and errors the collective at once). Long, because rank 0 alone writes checkpoints
    # and each rank may first download or tokenize for minutes while the others wait at the first collective.
    torch_dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                  timeout=datetime.timedelta(seconds=cfg.ddp_timeout),
                                  device_id=device if device.type == "cuda" else None)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device, ddp=True)


def all_reduce_sum(value: torch.Tensor, dist: DistEnv) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op for one process)."""
    if dist.ddp:
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
    return value


# --- precision -------------------------------------------------------------------------------------------------

def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    """fp32 unless mixed precision is asked for; then bf16 where the hardware has it (A100, H100, CPUs), else
    fp16 (T4, V100), which needs a GradScaler. PRECISION overrides the choice.

    Returns:
        "fp32", "bf16" or "fp16".
    """
    if cfg.precision:
        return cfg.precision
    if not cfg.mix_prec_train:
        return "fp32"
    # including_emulation=False: a T4 can run bf16 kernels in emulation (so the default answer is True there),
    # but slower than fp16; only a GPU with native bf16 (compute capability >= 8.0) should get it.
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "fp16"
    return "bf16"


def describe_precision(cfg: TrainConfig, precision: str, device: torch.device) -> str:
    """One line for the start banner: what was chosen, why, and the dtype of each part of the model."""
    reason = ("PRECISION" if cfg.precision else "MIX_PREC_TRAIN=true" if cfg.mix_prec_train
              else "MIX_PREC_TRAIN=false")
    compute = "no autocast" if precision == "fp32" else f"{precision} autocast"
    scaler = " + GradScaler" if precision == "fp16" else ""
    base = str(base_weight_dtype(precision, device)).removeprefix("torch.")
    return f"{precision} on {device.type} ({reason}): {compute}{scaler}; base weights {base}, LoRA float32"


def base_weight_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Frozen base weights in half precision on a GPU (half the memory, as the assignment loads them); on the
    CPU they stay float32 and autocast does the casting."""
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def autocast_context(precision: str, device: torch.device):
    """The forward pass's autocast for `precision` (nothing for fp32); the same one is used for evaluation."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


# --- model and data ---------------------------------------------------------------------------------------------

def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise RunError(_model_load_message(model_path, err)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pretrained_model(model_path: str, device: torch.device, dtype: torch.dtype):
    """Load the frozen base model onto `device` in `dtype` (no trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise RunError(_model_load_message(model_path, err)) from None
    return model.to(device)


def _model_load_message(model_path: str, err: Exception) -> str:
    if model_path.startswith((".", "/", "~")) and not Path(model_path).expanduser().exists():
        return f"MODEL_PATH={model_path!r}: no such model folder"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"MODEL_PATH={model_path!r}: cannot load it ({reason}); offline, or if it is not on the hub, point "
            "MODEL_PATH at a local model folder such as models/tiny-bloom")


def prepare_datasets(cfg: TrainConfig, tokenizer):
    """Load, check and tokenize the records; split off the validation set. Raises DataError on bad data.

    The returned stats include `fingerprint`: a hash of the records' content, the tokenizer, the prompt template,
    MAX_LENGTH and TRAIN_ON_INPUTS. A checkpoint stores it, so a resumed run can tell that its data are the same
    even when DATA_PATH names another copy of them.
    """
    records, stats = validate_records(load_records(cfg.data_path, cfg.cache_dir), cfg.data_path)
    prompter = Prompter()
    dataset = tokenize_records(records, tokenizer, prompter, cfg.max_length, cfg.train_on_inputs,
                               Path(cfg.cache_dir), stats=stats)
    train_set, valid_set = split_train_valid(dataset, cfg.valid_size, cfg.seed)
    return train_set, valid_set, stats


def build_lora_model(model, cfg: TrainConfig, model_path: str) -> LoraModelForCasualLM:
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=cfg.target_module_list, base_model_name_or_path=model_path)
    try:
        lora_model = LoraModelForCasualLM(model, config)
    except ValueError as err:
        raise ConfigError(f"TARGET_MODULES: {err}") from None
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing: gradients reach the LoRA matrices inside a checkpointed block even though
        # the block's input (from the frozen embeddings) does not require grad, which the old reentrant variant
        # needs `enable_input_require_grads` for; it also replays dropout with the same random masks.
        enable_activation_checkpointing(lora_model.model, {"use_reentrant": False})
    return lora_model


def enable_activation_checkpointing(model, checkpoint_kwargs: dict) -> None:
    """transformers 5.23 renamed gradient_checkpointing_enable to activation_checkpointing_enable (the old name
    still works there, with a warning); a notebook's preinstalled, older transformers knows only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


def no_buffer_sync_before_forward() -> dict:
    """DDP's option not to broadcast buffers before every forward: buffers, if the model has any (rotary tables,
    ...), are the same constants on every rank. torch 2.13 renamed it (broadcast_buffers -> forward_sync_buffers);
    the old name still works there, with a warning, and is the only one older torch (a notebook's preinstalled
    one) knows."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


# --- seeds, notes, resuming (how checkpoints are written and checked: checkpoint.py) ------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def note(message: str) -> None:
    """A remark that is not an error (the caller prints it on rank 0 only)."""
    print(f"note: {message}", flush=True)


def resolve_resume(cfg: TrainConfig, dist: DistEnv) -> Path | None:
    """RESUME_FROM as a folder: "latest" becomes the newest complete checkpoint in OUTPUT_DIR.

    "latest" with no checkpoint yet starts the run at step 0, with a note, rather than failing: a job that is
    simply started again until it finishes (a Kaggle notebook re-run, a spot-instance script) can then always set
    it. The note names the folder searched, so a mistyped OUTPUT_DIR shows. Under DDP rank 0 decides and tells
    the others, so that all ranks resume from the same checkpoint.
    """
    if cfg.resume_from != "latest":
        return Path(cfg.resume_from) if cfg.resume_from else None
    skipped: list[str] = []
    found = [find_latest_checkpoint(Path(cfg.output_dir), skipped) if dist.is_master else None]
    if dist.ddp:
        torch_dist.broadcast_object_list(found, src=0)
    if dist.is_master:
        for reason in skipped:
            note(f"RESUME_FROM=latest: skipping {reason}")
        if found[0] is None:
            note(f"RESUME_FROM=latest: no complete checkpoint in {cfg.output_dir} yet; starting at step 0")
    return found[0]


def trim_metrics(path: Path, step: int) -> None:
    """Drop the metrics.jsonl rows past `step`, and any line a kill cut short: the resumed run logs those steps
    again, and the file (and the loss curve drawn from it) should read as one run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text("".join(kept), encoding="utf-8")
    os.replace(staging, path)


# --- stopping on a signal ----------------------------------------------------------------------------------------

class StopSignals:
    """While active, SIGTERM and SIGINT only record that the run should stop; the loop then finishes its step,
    writes a checkpoint and exits.

    torchrun forwards the SIGTERM it gets to every worker, so under DDP each rank records it; the ranks then agree
    on stopping through an all-reduce after each step (a rank that stopped alone would leave the others waiting in
    the next collective). torchrun SIGKILLs its workers 30 s after its own SIGTERM: where a step and a checkpoint
    take longer, launch it with `--shutdown-timeout=<seconds>`. With `force_on_second_sigint`, a second Ctrl-C
    stops at once, without a checkpoint (for a person at a terminal). Not under torchrun: it forwards a terminal's
    Ctrl-C to workers that already got it from the terminal, so each would see two at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, force_on_second_sigint: bool) -> None:
        self.force_on_second_sigint = force_on_second_sigint
        self.received = 0  # the first signal's number, 0 for none
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        # No printing here: a handler runs between two bytecodes, possibly inside another print to the same stream.
        if signum == signal.SIGINT and self.received == signal.SIGINT and self.force_on_second_sigint:
            raise KeyboardInterrupt
        self.received = self.received or signum


WORKER_DIED = ("a data-loader worker process died ({}); the system may have killed it for lack of memory: lower "
               "NUM_WORKERS (0 loads data in the training process) or BATCH_SIZE")


@contextlib.contextmanager
def data_worker_errors(num_workers: int):
    """Fetching batches from worker processes: a worker that dies (the out-of-memory killer, most often) as a
    one-line RunError. Depending on the moment, the DataLoader reports it as "DataLoader worker (pid N) is killed
    by signal", or the pipe it was sending a batch through breaks."""
    try:
        yield
    except (RuntimeError, ConnectionError, EOFError) as err:
        if num_workers == 0 or (isinstance(err, RuntimeError) and not str(err).startswith("DataLoader worker")):
            raise
        raise RunError(WORKER_DIED.format(f"{type(err).__name__}: {err}" if not isinstance(err, RuntimeError)
                                          else str(err).strip())) from None


class SkipSampler(Sampler):
    """A sampler's indices from position `skip` on. Resuming mid-epoch starts at the first example not yet trained
    on, without loading and collating the batches before it (batch k is indices k*b..(k+1)*b-1 of the sampler)."""

    def __init__(self, sampler) -> None:
        self.sampler, self.skip = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


# --- the trainer -------------------------------------------------------------------------------------------------

class Trainer:
    """LoRA fine-tuning loop: gradient accumulation, mixed precision, DDP, evaluation, checkpoints.

    Args:
        cfg: the run's settings.
        dist: this process's place in the (possibly one-process) group.
        model: the LoRA-wrapped model, already on `dist.device`.
        tokenizer: the model's tokenizer (for padding).
        train_set, valid_set: tokenized datasets.
        precision: "fp32", "bf16" or "fp16".
        data_fingerprint: `prepare_datasets`' stats["fingerprint"]; recorded in checkpoints and compared on resume.

    Raises:
        ConfigError: RESUME_FROM names a damaged checkpoint, or one this run would not continue.
    """

    def __init__(self, cfg: TrainConfig, dist: DistEnv, model: LoraModelForCasualLM, tokenizer,
                 train_set, valid_set, precision: str, data_fingerprint: str = "") -> None:
        self.cfg, self.dist, self.precision = cfg, dist, precision
        self.raw_model = model
        self.output_dir = Path(cfg.output_dir)
        self.identity = run_identity(cfg, dist.world_size, data_fingerprint)
        self.train_loader, self.valid_loader = self.prepare_dataloader(train_set, valid_set, tokenizer)
        self.train_sampler: SkipSampler = self.train_loader.sampler
        # From the full sampler, not len(train_loader): that shrinks while a resumed epoch skips its start.
        self.micro_batches_per_epoch = math.ceil(len(self.train_sampler.sampler) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_batches_per_epoch / cfg.grad_accum_steps)
        self.total_steps = cfg.num_epochs * self.steps_per_epoch
        if cfg.max_steps > 0:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        self.optimizer = self._build_optimizer()
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, cfg.warmup_steps, self.total_steps)
        # Only fp16 needs loss scaling: its 5-bit exponent underflows small gradients; bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=precision == "fp16")

        self.step = 0             # optimizer steps done
        self.epoch = 0            # current epoch
        self.batches_done = 0     # micro-batches of the current epoch already trained on
        self.skipped_steps = 0    # fp16 steps the GradScaler skipped for inf/NaN gradients
        self.last_eval: dict = {}  # the latest evaluation's metrics (kept in checkpoints)
        self._saved_step = -1     # step of the last checkpoint this run wrote
        self.resumed_from: Path | None = None
        self._signals: StopSignals | None = None  # set while train() runs
        checkpoint = resolve_resume(cfg, dist)
        if checkpoint is not None:
            self.resume(checkpoint)

        # DDP wraps the LoRA model after injection, so only the adapter's gradients are all-reduced (DDP reduces
        # the parameters that require grad).
        self.model = model
        if dist.ddp:
            self.model = DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.type == "cuda"
                                                 else None, **no_buffer_sync_before_forward())

    # --- set-up ---

    def prepare_dataloader(self, train_set, valid_set, tokenizer) -> tuple[DataLoader, DataLoader]:
        """Training batches shuffled per epoch and sharded over ranks; validation sharded without shuffling."""
        cfg, dist = self.cfg, self.dist
        if cfg.group_by_length:
            sampler = LengthGroupedSampler(train_set["length"], cfg.batch_size, dist.world_size, dist.rank, cfg.seed)
        else:
            # Also with one process: the same shuffled order for any world size, so 2 ranks x batch b see the
            # same global batches as 1 process x batch 2b.
            sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                         seed=cfg.seed, drop_last=False)
        collate = PadCollator(tokenizer)
        # Generators of their own: otherwise each new iterator (every epoch, every evaluation) draws a seed from
        # the global RNG, and a resumed run's dropout masks would drift from the uninterrupted run's (or depend on
        # EVAL_FREQ, which may change on resume).
        train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=SkipSampler(sampler),
                                  collate_fn=collate, num_workers=cfg.num_workers,
                                  pin_memory=dist.device.type == "cuda",
                                  generator=torch.Generator().manual_seed(cfg.seed))
        # Every rank evaluates its own slice once (no padding repeats); the loss sums are all-reduced.
        valid_shard = Subset(valid_set, range(dist.rank, len(valid_set), dist.world_size))
        valid_loader = DataLoader(valid_shard, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate,
                                  num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
        return train_loader, valid_loader

    def _build_optimizer(self) -> torch.optim.Optimizer:
        # Weight decay on the LoRA matrices only, not on biases (when BIAS trains them).
        decay, no_decay = [], []
        for name, param in self.raw_model.named_parameters():
            if param.requires_grad:
                (no_decay if name.endswith("bias") else decay).append(param)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.cfg.learning_rate, fused=self.dist.device.type == "cuda")

    @property
    def finished(self) -> bool:
        """True when the run has no step left to train (a finished run resumed)."""
        return self.step >= self.total_steps

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.raw_model.parameters() if p.requires_grad]

    def try_longest_batch(self) -> str:
        """One forward and backward pass on the BATCH_SIZE longest training examples, before the first step.

        A batch is padded to its longest example, and Alpaca's examples range from a few dozen tokens to
        MAX_LENGTH: a batch shape that does not fit in memory would otherwise fail whenever the loader first draws
        long examples, possibly long into the run. Here it fails (torch.OutOfMemoryError) before any step. The
        gradients are dropped and the random generators restored, so training is the same with or without it; it
        runs on the raw model, so DDP communicates nothing. Evaluation runs without gradients and needs less.

        Returns:
            A line for the start banner: the shape tried and, on a GPU, the peak memory it took.
        """
        device = self.dist.device
        dataset = self.train_loader.dataset
        longest = np.argsort(np.asarray(dataset["length"]), kind="stable")[-self.cfg.batch_size:]
        batch = self.train_loader.collate_fn([dataset[int(i)] for i in longest])
        batch = {k: v.to(device) for k, v in batch.items()}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.raw_model.train()  # as in a step: dropout and activation checkpointing are on in training mode only
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws from it
            self.batch_loss(self.raw_model, batch, overwrite_logits=True).backward()
        self.optimizer.zero_grad(set_to_none=True)
        shape = f"longest batch {len(longest)} x {batch['input_ids'].shape[1]} tokens"
        if device.type != "cuda":
            return f"{shape}: forward and backward ran"
        peak, total = torch.cuda.max_memory_allocated(device), torch.cuda.get_device_properties(device).total_memory
        # AdamW's state (allocated at the first step) is two floats per LoRA parameter: small beside this.
        return f"{shape}: peak {peak / 2**30:.1f} GiB of the GPU's {total / 2**30:.1f} GiB (forward and backward)"

    # --- the loop ---

    def train(self) -> dict:
        """Run until num_epochs or max_steps; returns the last evaluation's metrics.

        Raises:
            TrainingStopped: SIGTERM/SIGINT arrived; the step in progress was finished and checkpointed.
        """
        with StopSignals(force_on_second_sigint=not self.dist.ddp) as self._signals:
            try:
                return self._train_loop()
            finally:
                self._signals = None  # evaluate() outside train() is never abandoned

    def _train_loop(self) -> dict:
        cfg, dist = self.cfg, self.dist
        self.raw_model.train()
        # `with`: the bar is closed (its line ended) also when a RunError ends the run, so the error gets a line.
        with tqdm(total=self.total_steps, initial=self.step, disable=not dist.is_master, desc="train",
                  dynamic_ncols=True) as progress:
            while self.epoch < cfg.num_epochs and not self.finished:
                batches = self._epoch_batches()
                epoch_done = False
                while not epoch_done and not self.finished:
                    micro_batches = self._next_micro_batches(batches)
                    started = time.perf_counter()
                    metrics = self.optimizer_step(micro_batches)
                    self.batches_done += len(micro_batches)
                    # The data position moves to the next epoch at once, so that a checkpoint of this step resumes
                    # there (and not at the end of an epoch already trained).
                    epoch_done = self.batches_done >= self.micro_batches_per_epoch
                    if epoch_done:
                        self.epoch, self.batches_done = self.epoch + 1, 0
                    metrics["tokens_per_s"] = metrics.pop("tokens") / (time.perf_counter() - started)
                    self._log(metrics)
                    progress.update(1)
                    postfix = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
                               "tok_s": f"{metrics['tokens_per_s']:.0f}"}
                    if self.scaler.is_enabled():
                        postfix["skipped"] = self.skipped_steps  # fp16 steps the GradScaler threw away
                    progress.set_postfix(postfix)
                    if epoch_done or (cfg.eval_freq and self.step % cfg.eval_freq == 0):
                        self.last_eval = self.evaluate()
                    if epoch_done or (cfg.save_steps and self.step % cfg.save_steps == 0):
                        self.save_checkpoint()
                    self._stop_if_asked()
            # MAX_STEPS can end the run mid-epoch: evaluate and checkpoint that last step too, so that a longer
            # MAX_STEPS (or NUM_EPOCHS) with RESUME_FROM=latest continues from it instead of an earlier checkpoint.
            # A step evaluated already (an epoch's end, or a finished run resumed) is not evaluated and logged again.
            if self.last_eval.get("step") != self.step:
                self.last_eval = self.evaluate()
            self.save_checkpoint()
            self._stop_if_asked()  # a signal during that evaluation
        return self.last_eval

    def _epoch_batches(self):
        """An iterator over this rank's micro-batches of the current epoch, from the current data position."""
        self.train_sampler.set_epoch(self.epoch)
        self.train_sampler.skip = self.batches_done * self.cfg.batch_size
        return iter(self.train_loader)

    def _next_micro_batches(self, batches) -> list[dict]:
        with data_worker_errors(self.cfg.num_workers):
            return list(itertools.islice(batches, self.cfg.grad_accum_steps))

    def _stop_if_asked(self) -> None:
        """After each step: if any rank got SIGTERM/SIGINT, every rank writes the checkpoint and stops.

        One all-reduce of one number per step (MAX over ranks, so one rank's signal stops all): the ranks must
        decide together, after the same step, or one would wait forever in a collective the others never join.
        """
        flag = torch.tensor([self._signals.received], device=self.dist.device)
        if self.dist.ddp:
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        signum = int(flag.item())
        if signum:
            raise TrainingStopped(signum, self.step, self.save_checkpoint())

    def optimizer_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over `micro_batches` (this rank's share of the global batch).

        The loss is the mean over every label token of the global batch — all micro-batches on all ranks — so the
        update does not depend on how the batch is split into micro-batches or ranks (a mean of per-micro-batch
        means would weight short examples more).
        """
        dist, device = self.dist, self.dist.device
        # [label tokens, real (non-pad) tokens] of this rank's micro-batches, summed over ranks in one all-reduce.
        counts = torch.tensor([[count_label_tokens(b), int(b["attention_mask"].sum())] for b in micro_batches],
                              device=device).sum(0)
        global_tokens, global_real_tokens = all_reduce_sum(counts, dist).tolist()
        # DDP averages gradients over ranks; multiplying by world_size turns that average back into a sum.
        loss_weight = dist.world_size / max(global_tokens, 1)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)  # summed over micro-batches and ranks
        for i, batch in enumerate(micro_batches):
            is_last = i == len(micro_batches) - 1
            # Skip DDP's gradient all-reduce on all but the last micro-batch: one all-reduce per optimizer step.
            sync_context = self.model.no_sync() if dist.ddp and not is_last else contextlib.nullcontext()
            with sync_context:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                micro_loss = self.batch_loss(self.model, batch, overwrite_logits=True)
                self.scaler.scale(micro_loss * loss_weight).backward()
            loss_sum += micro_loss.detach()
        # Every rank gets the same summed loss, so every rank takes the same decision below.
        loss = float(all_reduce_sum(loss_sum, dist)) / max(global_tokens, 1)
        if not math.isfinite(loss) and not self.scaler.is_enabled():
            self._stop(f"loss is {loss}")

        # scale -> backward (above) -> unscale -> clip -> step -> update, as GradScaler requires: gradients are
        # clipped at their true size, and step() skips the update when unscale_ found inf/NaN.
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            self.trainable_parameters(), self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf))
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            # Without a GradScaler nothing would skip this step: AdamW would write inf/NaN into the adapter.
            self._stop(f"gradient norm is {grad_norm}")
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale_before:
            self.skipped_steps += 1  # inf/NaN gradients: GradScaler skipped the update and lowered the scale
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "skipped_steps": self.skipped_steps, "tokens": global_real_tokens}

    def batch_loss(self, model, batch: dict, overwrite_logits: bool = False) -> torch.Tensor:
        """The summed token loss of one batch, forward pass under this run's autocast.

        The logits (BLOOM's vocabulary: 1 GiB at 4 x 512 tokens in half precision) live only in here and in the
        loss's graph: they are freed as soon as its backward pass has run, or at once without gradients, never held
        through the next batch's forward pass. With `overwrite_logits` (a training step) that backward pass writes
        their gradient into them, so a step's peak holds one logits-sized tensor, the peak try_longest_batch measures.
        """
        with autocast_context(self.precision, self.dist.device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits  # a KV cache is for generating, not training
        return sum_token_loss(logits, next_token_labels(batch), overwrite_logits=overwrite_logits)

    def _stop(self, problem: str) -> NoReturn:
        """End the run before a non-finite value reaches the adapter; the checkpoints on disk stay as they are."""
        raise RunError(f"{problem} at step {self.step + 1} with {self.precision}; stopping before the update. The "
                       f"last good checkpoint is {self.latest_checkpoint() or 'none'}; try a lower LEARNING_RATE "
                       "or PRECISION=fp32")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss (token mean over all ranks' shards) and perplexity.

        A stop signal abandons it (on a real validation set it can take minutes, longer than torchrun waits
        before it kills its workers); it then returns {} and logs nothing.
        """
        device = self.dist.device
        self.raw_model.eval()
        totals = torch.zeros(3, device=device, dtype=torch.float64)  # [loss sum, label tokens, ranks that gave up]
        with data_worker_errors(self.cfg.num_workers):
            for batch in self.valid_loader:
                if self._signals is not None and self._signals.received:
                    totals[2] = 1
                    break
                batch = {k: v.to(device) for k, v in batch.items()}
                totals[0] += self.batch_loss(self.raw_model, batch).double()
                totals[1] += count_label_tokens(batch)
        self.raw_model.train()
        loss_sum, tokens, abandoned = all_reduce_sum(totals, self.dist).tolist()
        if tokens == 0 or abandoned:
            return {}
        loss = loss_sum / tokens
        metrics = {"step": self.step, "epoch": self.epoch, "eval_loss": loss,
                   "eval_ppl": math.exp(min(loss, 50.0))}
        self._log(metrics)
        if self.dist.is_master:  # tqdm.write: on its own line, not glued to the progress bar
            tqdm.write(f"step {self.step}: eval loss {loss:.4f}, perplexity {metrics['eval_ppl']:.2f}")
        return metrics

    # --- output ---

    def _log(self, metrics: dict) -> None:
        if not self.dist.is_master:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / METRICS_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")

    def trainer_state(self) -> dict:
        """Everything besides the adapter that an exact resume needs."""
        rng_states = [rng_state()]
        if self.dist.ddp:
            rng_states = [None] * self.dist.world_size
            torch_dist.all_gather_object(rng_states, rng_state())
        return {
            "step": self.step, "epoch": self.epoch, "batches_done": self.batches_done,
            "skipped_steps": self.skipped_steps, "last_eval": self.last_eval,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng_states,
        }

    def save_checkpoint(self) -> Path:
        """Write `OUTPUT_DIR/checkpoint-<step>/` (adapter in PEFT layout + trainer_state.pt + manifest.json), complete
        or not at all (see `write_checkpoint`), then apply SAVE_TOTAL_LIMIT. Every rank must call it (the RNG
        states are gathered); only rank 0 writes.

        Raises:
            RunError: on every rank, when rank 0 could not write (disk full, read-only folder); the checkpoints
                already on disk are untouched.
        """
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        if self._saved_step == self.step:
            return final  # SAVE_STEPS, the end of an epoch and a stop signal can fall on the same step
        state = self.trainer_state()
        error = ""
        if self.dist.is_master:
            manifest = {"format": CHECKPOINT_FORMAT, "step": self.step, "epoch": self.epoch,
                        "batches_done": self.batches_done, "total_steps": self.total_steps,
                        "precision": self.precision, "config_hash": identity_hash(self.identity),
                        "identity": self.identity, "config": dataclasses.asdict(self.cfg)}
            try:
                write_checkpoint(final, self.raw_model, state, manifest)
            except OSError as err:
                reason = f"[Errno {err.errno}] {err.strerror}" if err.strerror else str(err)
                error = f"cannot write checkpoint to {final}: {reason}"
            else:
                self._prune_checkpoints(final)
        # Every rank learns whether rank 0's write worked, so all stop together if it did not. This all-reduce is
        # also the barrier that keeps any rank from running ahead of (or exiting before) an unfinished checkpoint.
        failed = all_reduce_sum(torch.tensor([float(bool(error))], device=self.dist.device), self.dist)
        if failed.item():
            raise RunError(f"{error or f'rank 0 could not write {final}'}; the last complete checkpoint is "
                           f"{self.latest_checkpoint() or 'none'}")
        self._saved_step = self.step
        return final

    def _prune_checkpoints(self, written: Path) -> None:
        if self.cfg.save_total_limit <= 0:
            return
        try:
            prune_checkpoints(self.output_dir, self.cfg.save_total_limit, written)
        except OSError as err:  # the new checkpoint is safe; failing to delete an old one must not end the run
            note(f"SAVE_TOTAL_LIMIT: could not delete an old checkpoint: {err}")

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint in OUTPUT_DIR (None if there is none)."""
        return find_latest_checkpoint(self.output_dir)

    def resume(self, checkpoint: Path) -> None:
        """Restore adapter, optimizer, schedule, scaler, RNG and data position from a checkpoint.

        Raises:
            ConfigError: the checkpoint is damaged, or was trained with settings that this run would change.
        """
        manifest = check_resumable(checkpoint, self.identity)
        try:
            _, tensors = read_adapter_dir(checkpoint)
            self.raw_model.load_adapter_weights(tensors, source=str(checkpoint))
        except (OSError, ValueError) as err:
            raise ConfigError(f"RESUME_FROM: {err}") from None
        state = torch.load(checkpoint / TRAINER_STATE_NAME, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # A checkpoint from a run without fp16 has an empty scaler state; an fp16 run then starts a fresh scale.
        if state["scaler"] or not self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batches_done, self.skipped_steps = state["batches_done"], state["skipped_steps"]
        # The same on every rank, so all of them skip (or all run) the evaluation of a run that had finished.
        self.last_eval = state.get("last_eval", {})  # absent in checkpoints written before it was kept
        set_rng_state(state["rng"][self.dist.rank])
        self.resumed_from = checkpoint
        if os.path.normpath(checkpoint) == os.path.normpath(self.output_dir / f"{CHECKPOINT_PREFIX}{self.step}"):
            # This step's checkpoint is on disk already: a stop right away, or the end of a run that had finished,
            # must not write it again (replacing a good checkpoint leaves a moment without one). Compared as text,
            # not through the file system, so that every rank of a multi-node run decides the same.
            self._saved_step = self.step
        if self.dist.is_master:
            if manifest["total_steps"] != self.total_steps:
                note(f"the run now ends at step {self.total_steps} instead of {manifest['total_steps']} (NUM_EPOCHS "
                     "or MAX_STEPS changed): the learning-rate schedule is recomputed for the new length, so the "
                     "rest of the run differs from an uninterrupted one")
            if manifest["precision"] != self.precision:
                note(f"precision is {self.precision} here but was {manifest['precision']}: the rest of the run "
                     "differs slightly from an uninterrupted one")
            trim_metrics(self.output_dir / METRICS_NAME, self.step)

    def save_final_adapter(self) -> None:
        """The finished adapter, directly in OUTPUT_DIR (loadable with PeftModel.from_pretrained(base, OUTPUT_DIR)).
        Each file is staged and renamed into place, the weights before the config that points at them."""
        if self.dist.is_master:
            staging = self.output_dir / ".adapter.tmp"
            self.raw_model.save_pretrained(staging)
            for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
                os.replace(staging / name, self.output_dir / name)
            shutil.rmtree(staging, ignore_errors=True)
            plot_loss_curve(self.output_dir / METRICS_NAME, self.output_dir / LOSS_CURVE_NAME)
        if self.dist.ddp:
            torch_dist.barrier()  # the run is over for everyone only once the adapter is on disk


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    """Training and validation loss against optimizer steps, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = []
    for line in metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):  # a line cut short by a kill
            rows.append(json.loads(line))
    rows = [r for r in rows if isinstance(r, dict) and "step" in r]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    valid = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    staging = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(staging, dpi=100)
    plt.close(fig)
    os.replace(staging, png_path)


def print_banner(cfg: TrainConfig, dist: DistEnv, precision: str, stats: dict, trainer: Trainer,
                 lora_model: LoraModelForCasualLM) -> None:
    trainable, total = lora_model.get_nb_trainable_parameters()
    effective_batch = cfg.batch_size * cfg.grad_accum_steps * dist.world_size
    lines = [
        f"model        {cfg.model_path}",
        f"data         {cfg.data_path}: {data_stats_line(stats)}",
        f"examples     {len(trainer.train_loader.dataset):,} train / {len(trainer.valid_loader.dataset.dataset):,} "
        f"validation",
        f"LoRA         r={cfg.lora_r}, alpha={cfg.lora_alpha:g}, dropout={cfg.lora_dropout:g}, "
        f"targets={cfg.target_modules}; trainable {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)",
        f"precision    {describe_precision(cfg, precision, dist.device)}",
        f"processes    {dist.world_size}" + (f" (DDP, {torch_dist.get_backend()})" if dist.ddp else ""),
        f"batch        {cfg.batch_size} x {cfg.grad_accum_steps} accumulation x {dist.world_size} processes = "
        f"{effective_batch} examples per optimizer step; {trainer.total_steps:,} steps"
        + ("; gradient checkpointing" if cfg.gradient_checkpointing else ""),
        f"output       {cfg.output_dir}",
        "checkpoints  " + (f"every {cfg.save_steps} steps, " if cfg.save_steps else "")
        + "at each epoch's end and at the last step; " + (f"the newest {cfg.save_total_limit} kept"
                                                          if cfg.save_total_limit else "all kept"),
    ]
    if trainer.resumed_from is not None:
        position = ("the run had finished (raise NUM_EPOCHS or MAX_STEPS to train on)"
                    if trainer.finished else
                    f"epoch {trainer.epoch + 1}, {trainer.batches_done} of its {trainer.micro_batches_per_epoch} "
                    "micro-batches done")
        lines.append(f"resumed      from {trainer.resumed_from}: step {trainer.step}, {position}")
    print("\n".join(lines), flush=True)


def run(cfg: TrainConfig, dist: DistEnv) -> dict:
    """Everything after set-up. Errors in the data or settings (a damaged or incompatible RESUME_FROM included)
    surface before the model loads and before anything is written to OUTPUT_DIR.

    Raises:
        TrainingStopped: a stop signal; the checkpoint is written.
    """
    seed_everything(cfg.seed)
    precision = resolve_precision(cfg, dist.device)
    tokenizer = load_tokenizer(cfg.model_path)
    train_set, valid_set, stats = prepare_datasets(cfg, tokenizer)
    checkpoint = resolve_resume(cfg, dist)
    if checkpoint is not None:
        check_resumable(checkpoint, run_identity(cfg, dist.world_size, stats["fingerprint"]))
    elif dist.is_master and not cfg.resume_from and checkpoint_dirs(Path(cfg.output_dir)):
        note(f"{cfg.output_dir} already holds checkpoints up to {checkpoint_dirs(Path(cfg.output_dir))[0].name}; "
             "this run starts at step 0 (RESUME_FROM=latest would continue the earlier run instead)")
    cfg = dataclasses.replace(cfg, resume_from=str(checkpoint) if checkpoint is not None else "")
    model = load_pretrained_model(cfg.model_path, dist.device, base_weight_dtype(precision, dist.device))
    lora_model = build_lora_model(model, cfg, cfg.model_path)  # same seed on every rank: identical LoRA init
    # Dropout masks should differ between ranks; the offset keeps each rank's stream reproducible.
    torch.manual_seed(cfg.seed + dist.rank)
    trainer = Trainer(cfg, dist, lora_model, tokenizer, train_set, valid_set, precision,
                      data_fingerprint=stats["fingerprint"])
    if dist.is_master:
        print_banner(cfg, dist, precision, stats, trainer, lora_model)
    # An out-of-memory batch shape fails here, not steps into the run; a finished run has no step to fail.
    fits = "nothing left to train" if trainer.finished else trainer.try_longest_batch()
    if dist.is_master:
        print(f"memory       {fits}", flush=True)
    metrics = trainer.train()
    trainer.save_final_adapter()
    if dist.is_master:
        print(f"adapter saved to {cfg.output_dir}" + (f"; {trainer.skipped_steps} of {trainer.step} fp16 steps "
                                                      "skipped by the GradScaler (inf/NaN gradients)"
                                                      if trainer.scaler.is_enabled() else ""), flush=True)
    return metrics


def communication_failure(err: RuntimeError) -> str | None:
    """The gist of an error from a collective whose peer died or hung (gloo, NCCL); None for any other error.

    gloo raises a plain RuntimeError such as "[.../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:3490:
    Connection reset by peer. This is typically caused by ..."; this returns "Read error [...]: Connection reset
    by peer".
    """
    text = str(err).strip()
    if not (isinstance(err, torch_dist.DistError) or "gloo" in text.lower() or "nccl" in text.lower()):
        return None
    first_line = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(err).__name__)
    return first_line.split(". ")[0].rstrip(".")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code: 0 finished; 1 bad setting, bad data, failed run, checkpoint not written
    or lost DDP peer; 128 + the signal's number (143 SIGTERM, 130 SIGINT) when a signal stopped the run after
    writing a checkpoint, and 130 for a second Ctrl-C (stops at once, without one).

    Every failure is one line on stderr, prefixed with the rank under DDP, and no traceback, except for bugs.
    """
    dist = cfg = None

    def error(message: str) -> None:
        rank = f"[rank {dist.rank}] " if dist is not None and dist.ddp else ""
        print(f"error: {rank}{message}", file=sys.stderr, flush=True)

    def last_checkpoint(how_to_resume: str = "") -> str:
        """'; the last complete checkpoint is ...', with `how_to_resume` after it when there is one."""
        found = cfg and find_latest_checkpoint(Path(cfg.output_dir))
        return f"; the last complete checkpoint is {found or 'none'}{how_to_resume if found else ''}" if cfg else ""

    try:
        cfg = load_config(argv)
        dist = setup_distributed(cfg)
        run(cfg, dist)
        return 0
    except TrainingStopped as stop:
        if dist.is_master:
            print(f"{stop}: checkpoint written to {stop.checkpoint}; continue with RESUME_FROM=latest",
                  file=sys.stderr, flush=True)
        return 128 + stop.signum
    except KeyboardInterrupt:
        error(f"interrupted by Ctrl-C, without a checkpoint{last_checkpoint()}")
        return 130
    except (ConfigError, DataError, RunError) as err:
        error(str(err))
        return 1
    except torch.OutOfMemoryError:
        error(f"out of {'GPU ' if dist is not None and dist.device.type == 'cuda' else ''}memory with BATCH_SIZE="
              f"{cfg.batch_size} x MAX_LENGTH={cfg.max_length}: halve BATCH_SIZE and double GRAD_ACCUM_STEPS (the "
              "same optimizer step), set GRADIENT_CHECKPOINTING=true, or lower MAX_LENGTH"
              # A checkpoint's batch shape must match on resume (config.RESUME_MUST_MATCH); these may change.
              + last_checkpoint(" (RESUME_FROM=latest continues from it with GRADIENT_CHECKPOINTING=true or "
                                "MIX_PREC_TRAIN=true; a new BATCH_SIZE, GRAD_ACCUM_STEPS or MAX_LENGTH starts a "
                                "new run)"))
        return 1
    except OSError as err:  # disk full or folder read-only while writing metrics or the final adapter
        error(f"{err}{last_checkpoint()}")
        return 1
    except RuntimeError as err:
        if str(err).startswith("DataLoader worker"):
            # Raised by the DataLoader's SIGCHLD handler, wherever the main thread is at that moment.
            error(WORKER_DIED.format(str(err).strip()) + last_checkpoint())
            return 1
        gist = communication_failure(err) if dist is not None and dist.ddp else None
        if gist is None:
            raise  # a bug: keep its traceback
        waited = f" for DDP_TIMEOUT={cfg.ddp_timeout} s" if "time" in gist.lower() else ""
        error(f"lost contact with another process ({gist}): it died or hung{waited}; its own error line, if it "
              f"printed one, says why{last_checkpoint()}")
        return 1
    finally:
        if torch_dist.is_available() and torch_dist.is_initialized():
            # Free the DDP wrapper (left in an exception's frames) before its process group: a gloo group
            # destroyed under a live DDP reducer can deadlock when the reducer is freed later.
            gc.collect()
            torch_dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
