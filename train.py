"""Fine-tune a causal LM (BLOOM-1.7B by default) with hand-written LoRA on the Stanford Alpaca data.

    python train.py                                                  # one GPU (or the CPU)
    DEBUG=true MODEL_PATH=models/tiny-bloom python train.py          # offline quick start, minutes on a CPU
    MIX_PREC_TRAIN=true python train.py                              # bf16 where supported, else fp16 + GradScaler
    DDP=true torchrun --standalone --nproc_per_node=2 train.py       # data parallel on 2 GPUs (or 2 CPU processes)
    DDP=true torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py
                                                                     # the same on each of 2 machines, 4 GPUs each

All settings live in `config.TrainConfig` (env vars or flags; `python train.py --help`). The loop follows nanoGPT:
distributed set-up in one block, `raw_model` for saving, `if dist.is_master` guards for printing and writing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from alpaca_data import (IGNORE_INDEX, DataError, LengthGroupedSampler, PadCollator, data_stats_line, load_records,
                         split_train_valid, tokenize_records, validate_records)
from config import ConfigError, TrainConfig, load_config
from lora_model import (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LoraConfig, LoraModelForCasualLM,
                        read_adapter_dir, replace_directory)
from prompter import Prompter

TRAINER_STATE_NAME = "trainer_state.pt"
METRICS_NAME = "metrics.jsonl"
LOSS_CURVE_NAME = "loss_curve.png"
CHECKPOINT_PREFIX = "checkpoint-"


class RunError(RuntimeError):
    """A problem found while running (model cannot load, loss became NaN); printed as one line."""


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
    torch_dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                  timeout=datetime.timedelta(minutes=10),
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
    """Load, check and tokenize the records; split off the validation set. Raises DataError on bad data."""
    records, stats = validate_records(load_records(cfg.data_path, cfg.cache_dir), cfg.data_path)
    dataset = tokenize_records(records, tokenizer, Prompter(), cfg.max_length, cfg.train_on_inputs,
                               Path(cfg.cache_dir), stats=stats)
    train_set, valid_set = split_train_valid(dataset, cfg.valid_size, cfg.seed)
    return train_set, valid_set, stats


def build_lora_model(model, cfg: TrainConfig, model_path: str) -> LoraModelForCasualLM:
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=cfg.target_module_list, base_model_name_or_path=model_path)
    try:
        return LoraModelForCasualLM(model, config)
    except ValueError as err:
        raise ConfigError(f"TARGET_MODULES: {err}") from None


def next_token_labels(batch: dict) -> torch.Tensor:
    """Targets for positions 0..T-2: the label of the next token, or -100 where there is nothing to learn.

    Position t predicts token t+1. A left-padded row's first real token follows a pad position; predicting it from
    padding is meaningless (and would make the loss depend on how much padding the batch needed), so it is masked.
    """
    return batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, :-1] == 0, IGNORE_INDEX)


def sum_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `logits[:, :-1]` against `next_token_labels`, in float32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_label_tokens(batch: dict) -> int:
    return int((next_token_labels(batch) != IGNORE_INDEX).sum())


# --- checkpoints -------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """Every random generator this process uses, in types `torch.load(weights_only=True)` accepts."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    """

    def __init__(self, cfg: TrainConfig, dist: DistEnv, model: LoraModelForCasualLM, tokenizer,
                 train_set, valid_set, precision: str) -> None:
        self.cfg, self.dist, self.precision = cfg, dist, precision
        self.raw_model = model
        self.output_dir = Path(cfg.output_dir)
        self.train_loader, self.valid_loader = self.prepare_dataloader(train_set, valid_set, tokenizer)
        self.micro_batches_per_epoch = len(self.train_loader)
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
        self._saved_step = -1     # step of the last checkpoint this run wrote
        if cfg.resume_from:
            self.resume(Path(cfg.resume_from))

        # DDP wraps the LoRA model after injection, so only the adapter's gradients are all-reduced (DDP reduces
        # the parameters that require grad). broadcast_buffers=False: buffers, if the model has any (rotary
        # tables, ...), are the same constants on every rank; no need to broadcast them before every forward.
        self.model = model
        if dist.ddp:
            self.model = DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.type == "cuda"
                                                 else None, broadcast_buffers=False)

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
        # A generator of its own: otherwise each new epoch's iterator draws from the global RNG, and a resumed run's
        # dropout masks would drift from the uninterrupted run's.
        train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                                  num_workers=cfg.num_workers, pin_memory=dist.device.type == "cuda",
                                  generator=torch.Generator().manual_seed(cfg.seed))
        # Every rank evaluates its own slice once (no padding repeats); the loss sums are all-reduced.
        valid_shard = Subset(valid_set, range(dist.rank, len(valid_set), dist.world_size))
        valid_loader = DataLoader(valid_shard, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate,
                                  num_workers=cfg.num_workers)
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

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.raw_model.parameters() if p.requires_grad]

    # --- the loop ---

    def train(self) -> dict:
        """Run until num_epochs or max_steps; returns the last evaluation's metrics."""
        cfg, dist = self.cfg, self.dist
        self.raw_model.train()
        last_eval: dict = {}
        # `with`: the bar is closed (its line ended) also when a RunError ends the run, so the error gets a line.
        with tqdm(total=self.total_steps, initial=self.step, disable=not dist.is_master, desc="train",
                  dynamic_ncols=True) as progress:
            while self.epoch < cfg.num_epochs and self.step < self.total_steps:
                self.train_loader.sampler.set_epoch(self.epoch)
                batches = itertools.islice(iter(self.train_loader), self.batches_done, None)
                while self.step < self.total_steps:
                    micro_batches = list(itertools.islice(batches, cfg.grad_accum_steps))
                    if not micro_batches:
                        break
                    started = time.perf_counter()
                    metrics = self.optimizer_step(micro_batches)
                    self.batches_done += len(micro_batches)
                    metrics["tokens_per_s"] = metrics.pop("tokens") / (time.perf_counter() - started)
                    self._log(metrics)
                    progress.update(1)
                    postfix = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
                               "tok_s": f"{metrics['tokens_per_s']:.0f}"}
                    if self.scaler.is_enabled():
                        postfix["skipped"] = self.skipped_steps  # fp16 steps the GradScaler threw away
                    progress.set_postfix(postfix)
                    if cfg.eval_freq and self.step % cfg.eval_freq == 0:
                        last_eval = self.evaluate()
                    if cfg.save_steps and self.step % cfg.save_steps == 0:
                        self.save_checkpoint()
                if self.batches_done >= self.micro_batches_per_epoch:
                    self.epoch, self.batches_done = self.epoch + 1, 0
                    last_eval = self._evaluate_once(last_eval)
                    self.save_checkpoint()
        return self._evaluate_once(last_eval)  # MAX_STEPS can end the run mid-epoch

    def _evaluate_once(self, last_eval: dict) -> dict:
        return last_eval if last_eval.get("step") == self.step else self.evaluate()

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
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(micro_batches):
            is_last = i == len(micro_batches) - 1
            # Skip DDP's gradient all-reduce on all but the last micro-batch: one all-reduce per optimizer step.
            sync_context = self.model.no_sync() if dist.ddp and not is_last else contextlib.nullcontext()
            with sync_context:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast_context(self.precision, device):
                    logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                micro_loss = sum_token_loss(logits, next_token_labels(batch))
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

    def _stop(self, problem: str) -> NoReturn:
        """End the run before a non-finite value reaches the adapter; the checkpoints on disk stay as they are."""
        raise RunError(f"{problem} at step {self.step + 1} with {self.precision}; stopping before the update. The "
                       f"last good checkpoint is {self.latest_checkpoint() or 'none'}; try a lower LEARNING_RATE "
                       "or PRECISION=fp32")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss (token mean over all ranks' shards) and perplexity."""
        device = self.dist.device
        self.raw_model.eval()
        totals = torch.zeros(2, device=device, dtype=torch.float64)  # [loss sum, label tokens]
        for batch in self.valid_loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast_context(self.precision, device):
                logits = self.raw_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            totals[0] += sum_token_loss(logits, next_token_labels(batch)).double()
            totals[1] += count_label_tokens(batch)
        self.raw_model.train()
        loss_sum, tokens = all_reduce_sum(totals, self.dist).tolist()
        if tokens == 0:
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
            "skipped_steps": self.skipped_steps, "world_size": self.dist.world_size,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng_states,
            "config": dataclasses.asdict(self.cfg),
        }

    def save_checkpoint(self) -> Path:
        """Write `OUTPUT_DIR/checkpoint-<step>/` (adapter in PEFT layout + trainer_state.pt) atomically.
        Every rank must call it (the RNG states are gathered); only rank 0 writes."""
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        if self._saved_step == self.step:
            return final  # SAVE_STEPS and the end of an epoch can fall on the same step
        self._saved_step = self.step
        state = self.trainer_state()
        if self.dist.is_master:
            staging = self.output_dir / f".{final.name}.tmp"
            self.raw_model.save_pretrained(staging)
            torch.save(state, staging / TRAINER_STATE_NAME)
            replace_directory(staging, final)
        if self.dist.ddp:
            torch_dist.barrier()  # nobody runs ahead (or exits) before the checkpoint is complete
        return final

    def latest_checkpoint(self) -> Path | None:
        found = [p for p in self.output_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / TRAINER_STATE_NAME).is_file()]
        return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)

    def resume(self, checkpoint: Path) -> None:
        """Restore adapter, optimizer, schedule, scaler, RNG and data position from a checkpoint."""
        state_path = checkpoint / TRAINER_STATE_NAME
        if not state_path.is_file():
            raise ConfigError(f"RESUME_FROM={str(checkpoint)!r}: no {TRAINER_STATE_NAME} there; point it at a "
                              f"{CHECKPOINT_PREFIX}<step> folder inside an OUTPUT_DIR")
        try:
            _, tensors = read_adapter_dir(checkpoint)
            self.raw_model.load_adapter_weights(tensors, source=str(checkpoint))
        except (OSError, ValueError) as err:
            raise ConfigError(f"RESUME_FROM: {err}") from None
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["world_size"] != self.dist.world_size:
            raise ConfigError(f"RESUME_FROM: checkpoint was written by {state['world_size']} process(es), this run "
                              f"has {self.dist.world_size}; the data order would differ")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batches_done, self.skipped_steps = state["batches_done"], state["skipped_steps"]
        set_rng_state(state["rng"][self.dist.rank])

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

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines()]
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
        f"{effective_batch} examples per optimizer step; {trainer.total_steps:,} steps",
        f"output       {cfg.output_dir}",
    ]
    print("\n".join(lines), flush=True)


def run(cfg: TrainConfig, dist: DistEnv) -> dict:
    """Everything after set-up. Errors in the data or settings surface before the model loads and before
    anything is written to OUTPUT_DIR."""
    seed_everything(cfg.seed)
    precision = resolve_precision(cfg, dist.device)
    tokenizer = load_tokenizer(cfg.model_path)
    train_set, valid_set, stats = prepare_datasets(cfg, tokenizer)
    model = load_pretrained_model(cfg.model_path, dist.device, base_weight_dtype(precision, dist.device))
    lora_model = build_lora_model(model, cfg, cfg.model_path)  # same seed on every rank: identical LoRA init
    # Dropout masks should differ between ranks; the offset keeps each rank's stream reproducible.
    torch.manual_seed(cfg.seed + dist.rank)
    trainer = Trainer(cfg, dist, lora_model, tokenizer, train_set, valid_set, precision)
    if dist.is_master:
        print_banner(cfg, dist, precision, stats, trainer, lora_model)
    metrics = trainer.train()
    trainer.save_final_adapter()
    if dist.is_master:
        print(f"adapter saved to {cfg.output_dir}" + (f"; {trainer.skipped_steps} of {trainer.step} fp16 steps "
                                                      "skipped by the GradScaler (inf/NaN gradients)"
                                                      if trainer.scaler.is_enabled() else ""), flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (1 for a bad setting, bad data or a failed run)."""
    dist = None
    try:
        cfg = load_config(argv)
        dist = setup_distributed(cfg)
        run(cfg, dist)
        return 0
    except (ConfigError, DataError, RunError) as err:
        rank = f"[rank {dist.rank}] " if dist is not None and dist.ddp else ""
        print(f"error: {rank}{err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
