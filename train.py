"""Fine-tune a causal LM (BLOOM-1.7B by default) with hand-written LoRA on the Stanford Alpaca data.

    python train.py  # one GPU (or the CPU)
    DEBUG=true MODEL_PATH=models/tiny-bloom python train.py  # offline quick start, minutes on a CPU
    MIX_PREC_TRAIN=true python train.py  # bf16 where supported, else fp16 + GradScaler
    DDP=true torchrun --standalone --nproc_per_node=2 train.py
        # data parallel on 2 GPUs (or 2 CPU processes)
    FSDP=true torchrun --standalone --nproc_per_node=2 train.py
        # the same, each GPU holding half the model

Read it top to bottom as nanoGPT's train.py: the distributed set-up in one block, the model and the
data, then the `Trainer`: set-up, `prepare_dataloader`, `_set_ddp_training`, and the loop `train` ->
`_run_epoch` -> `optimizer_step` -> `_run_batch`, with evaluation and checkpoints in one place after
each step. All settings live in `config.TrainConfig` (env vars or flags; `python train.py --help`).
What guards the loop (stop signals, lost DDP peers, exit codes) is in support/faults.py; how
checkpoints reach the disk and when they are trusted, in support/checkpoint.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm  # the plain bar: it renders in a notebook too, without ipywidgets

from lora_model import LoraConfig, LoraModelForCasualLM, read_adapter_dir, targets_conv1d
from prompter import Prompter
from support import answer_eval, faults, model_loading
from support.alpaca_data import (
    LengthGroupedSampler, PadCollator, SkipSampler, split_train_valid, tokenize_records,
    validate_records,
)
from support.checkpoint import (
    CHECKPOINT_PREFIX, Progress, check_resumable, checkpoint_manifest,
    read_trainer_state, resolve_resume, resume_advice, resume_notes, rng_state, run_identity,
    save_checkpoint_folder, set_rng_state, trainer_state,
)
from support.config import ConfigError, TrainConfig, load_config, misspelled_settings
from support.data_sources import load_records
from support.distributed import (
    DistEnv, all_reduce_sum, ddp_model, gather_objects, gradient_sync, note, setup_distributed,
    shutdown_distributed,
)
from support.faults import RunError, StopSignals, TrainingStopped
from support.fsdp import (
    agreed_stop_signal, even_validation_shard, full_adapter_state, full_optimizer_state,
    full_tensor, load_adapter_weights, load_optimizer_state, shard_model,
)
from support.fused_bloom import use_fused_modules
from support.metrics import MetricsLog, missing_tracker
from support.output_dir import check_output_dir, own_output_dir
from support.packing import PackCollator, check_packable, model_inputs, pack_dataset
from support.precision import DTYPES, autocast_dtype, resolve_precision
from support.report import print_banner, print_summary
from support.token_loss import count_label_tokens, next_token_labels


# --- precision ------------------------------------------------------------------------------------
# Which precision (fp32 unless MIX_PREC_TRAIN=true; PRECISION overrides) is support/precision.py's
# resolve_precision, the rule inference.py follows too.

def base_weight_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Frozen base weights in the compute dtype under mixed precision (as the assignment loads
    them): autocast would round them to it at every matmul anyway, so this saves those casts and
    half the memory. Not fp16 on a CPU, which has no fp16 arithmetic to gain from it."""
    if precision == "fp16" and device.type != "cuda":
        return torch.float32
    return DTYPES[precision]


def autocast_context(precision: str, device: torch.device):
    """The forward pass's autocast for `precision` (nothing for fp32)."""
    dtype = autocast_dtype(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def describe_precision(cfg: TrainConfig, precision: str, device: torch.device) -> str:
    """One line for the start banner: what was chosen, why, and the dtype of each part of the
    model."""
    reason = ("PRECISION" if cfg.precision else "MIX_PREC_TRAIN=true" if cfg.mix_prec_train
              else "MIX_PREC_TRAIN=false")
    compute = "no autocast" if precision == "fp32" else f"{precision} autocast"
    scaler = " + GradScaler" if precision == "fp16" else ""
    base = (model_loading.describe_quantized_base(cfg.quantize, autocast_dtype(precision), device)
            if cfg.quantize else str(base_weight_dtype(precision, device)).removeprefix("torch."))
    gathered = f"; FSDP gathers them in {precision}" if cfg.fsdp and precision != "fp32" else ""
    return (f"{precision} on {device.type} ({reason}): {compute}{scaler}; base weights {base}, "
            f"LoRA float32{gathered}")


# --- model and data -------------------------------------------------------------------------------

def load_tokenizer(model_path: str):
    try:
        return model_loading.load_tokenizer(model_path, name="MODEL_PATH")
    except (OSError, ValueError) as err:
        raise RunError(str(err)) from None


def load_pretrained_model(model_path: str, device: torch.device, dtype: torch.dtype,
                          quantize: str = "", precision: str = "fp32"):
    """Load the frozen base model onto `device` in `dtype` (no trust_remote_code); a half-precision
    one keeps its norms and residual stream float32 (model_loading.keep_residual_stream_float32).
    With QUANTIZE, quantized instead, in dtypes that follow `precision`, prepared for training
    (model_loading.load_quantized_for_training)."""
    try:
        if quantize:
            return model_loading.load_quantized_for_training(model_path, device, quantize,
                                                             autocast_dtype(precision),
                                                             name="MODEL_PATH")
        model = model_loading.load_base_model(model_path, device, dtype, name="MODEL_PATH")
    except (OSError, ValueError) as err:
        raise RunError(str(err)) from None
    if dtype != torch.float32:
        model_loading.keep_residual_stream_float32(model)
    return model


def with_default_targets(cfg: TrainConfig) -> TrainConfig:
    """TARGET_MODULES unset: the architecture's usual layers (read from the model's config.json),
    decided once, before the run's identity, so that the banner, the checkpoints and the adapter
    name the layers actually adapted."""
    if cfg.target_module_list:
        return cfg
    try:
        targets = model_loading.default_target_modules(cfg.model_path, name="MODEL_PATH")
    except (OSError, ValueError) as err:
        raise RunError(str(err)) from None
    # An architecture without a default keeps it empty: LoRA then fails naming the model's layers
    # (build_lora_model).
    return dataclasses.replace(cfg, target_modules=",".join(targets)) if targets else cfg


def build_lora_model(model, cfg: TrainConfig, model_path: str) -> LoraModelForCasualLM:
    """Wrap the base model with LoRA on TARGET_MODULES (the assignment's LoraConfig: r, alpha,
    dropout)."""
    # A local folder is recorded as an absolute path, so the adapter finds its base from any working
    # folder.
    base = str(Path(model_path).resolve()) if Path(model_path).is_dir() else model_path
    targets = cfg.target_module_list or None  # None: the architecture's default
    try:
        config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            target_modules=targets, fan_in_fan_out=targets_conv1d(model, targets),
                            use_dora=cfg.use_dora, init_lora_weights=cfg.lora_init,
                            base_model_name_or_path=base)
        lora_model = LoraModelForCasualLM(model, config)
    except ValueError as err:
        raise ConfigError(f"TARGET_MODULES: {err}") from None
    if cfg.gradient_checkpointing:
        # Non-reentrant: gradients reach the LoRA matrices inside a checkpointed block although its
        # input (from the frozen embeddings) does not require grad, and dropout is replayed with the
        # same masks.
        model_loading.enable_activation_checkpointing(lora_model.model, {"use_reentrant": False})
    return lora_model


def prepare_datasets(cfg: TrainConfig, tokenizer):
    """Load, check and tokenize the records; take the validation set from VALID_DATA_PATH or split
    it off (as many as SIZE_VALID_SET says, by default 10 %, at most 2,000). Raises DataError on bad
    data.

    The stats include `fingerprint`, a hash of the records, tokenizer, template, MAX_LENGTH and
    TRAIN_ON_INPUTS: a checkpoint stores it, so a resumed run can tell its data are the same even
        under another DATA_PATH; and
    `valid_reason`, where the validation set came from, for the banner.
    """
    dataset, stats = tokenized_records(cfg.data_path, cfg, tokenizer)
    if cfg.valid_data_path:
        valid_set, valid_stats = tokenized_records(cfg.valid_data_path, cfg, tokenizer)
        stats.update(fingerprint=stats["fingerprint"] + valid_stats["fingerprint"],
                     valid_reason="VALID_DATA_PATH")
        return dataset, valid_set, stats
    size, stats["valid_reason"] = cfg.resolve_valid_size(len(dataset))
    train_set, valid_set = split_train_valid(dataset, size, cfg.seed)
    return train_set, valid_set, stats


def pack_datasets(cfg: TrainConfig, train_set, valid_set):
    """PACKING=true: the examples packed into rows of up to MAX_LENGTH tokens (packing.py), after
    the split, so that the same examples are held out either way; other architectures are refused
    before the model loads."""
    try:
        model_type = model_loading.model_type(cfg.model_path, name="MODEL_PATH")
    except (OSError, ValueError) as err:
        raise RunError(str(err)) from None
    check_packable(model_type, cfg.fused_modules)
    return pack_dataset(train_set, cfg.max_length, cfg.seed), pack_dataset(valid_set,
                                                                           cfg.max_length, cfg.seed)


def tokenized_records(path: str, cfg: TrainConfig, tokenizer):
    """The records of one data source, checked and tokenized (cached), and their counts for the
    banner."""
    records, stats = validate_records(load_records(path, cfg.cache_dir, cfg.data_field_map), path)
    return tokenize_records(records, tokenizer, Prompter(), cfg.max_length, cfg.train_on_inputs,
                            Path(cfg.cache_dir), stats=stats), stats


def generation_records(cfg: TrainConfig, tokenizer, valid_size: int,
                       fingerprint: str) -> list[dict]:
    """EVAL_GENERATE's examples: the first EVAL_GENERATE validation records ([] when it is 0), found
    again as `inference.py evaluate` finds them (answer_eval.validation_records)."""
    if not cfg.eval_generate:
        return []
    if cfg.eval_generate > valid_size:
        raise ConfigError(f"EVAL_GENERATE={cfg.eval_generate} is more than the {valid_size:,} "
                          f"validation examples; set EVAL_GENERATE={valid_size} or less")
    records = answer_eval.validation_records(cfg, tokenizer, Prompter(), fingerprint)
    return records[:cfg.eval_generate]


def cosine_schedule_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int,
                                total_steps: int):
    """The learning rate rises linearly from 0 over `warmup_steps`, then follows half a cosine down
    to 0 at `total_steps`: alpaca-lora's schedule (transformers' get_cosine_schedule_with_warmup,
    the same floats), written out because importing transformers.optimization pulls in PEFT and
    bitsandbytes where they are installed."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return float(step) / float(max(1, warmup_steps))
        progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- the trainer ----------------------------------------------------------------------------------

class Trainer:
    """LoRA fine-tuning loop: gradient accumulation, mixed precision, DDP, evaluation, checkpoints.

    Takes the LoRA-wrapped `model` (on `dist.device`), its tokenizer (for padding), the tokenized
    data, the `precision` ("fp32", "bf16" or "fp16"), the run's `identity` (recorded in its
    checkpoints) and, to continue a run, a checkpoint folder and manifest from `resolve_resume`.
    """

    def __init__(self, cfg: TrainConfig, dist: DistEnv, model: LoraModelForCasualLM, tokenizer,
                 train_set, valid_set, precision: str, identity: dict | None = None,
                 resume: tuple[Path, dict] | None = None) -> None:
        self.cfg, self.dist, self.identity = cfg, dist, identity or {}
        # self.model: the DDP wrapper under DDP (FSDP shards model in place)
        self.raw_model = self.model = model
        self.output_dir = Path(cfg.output_dir)
        self.metrics = MetricsLog(self.output_dir, enabled=dist.is_master,
                                  report_to=cfg.report_to_list)
        self.answer_records: list[dict] = []  # EVAL_GENERATE's examples (run() sets them)
        self._base_answers: list[str] | None = None  # the base model's, generated once
        self.set_mixed_precision_context(precision)
        self.train_loader, self.valid_loader = self.prepare_dataloader(train_set, valid_set,
                                                                       tokenizer)
        self.train_sampler: SkipSampler = self.train_loader.sampler
        # From the full sampler, not len(train_loader): that shrinks while a resumed epoch skips its
        # start.
        self.micro_batches_per_epoch = math.ceil(len(self.train_sampler.sampler) / cfg.batch_size)
        self.total_steps = cfg.num_epochs * math.ceil(self.micro_batches_per_epoch
                                                      / cfg.grad_accum_steps)
        if cfg.max_steps > 0:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        if dist.distributed:  # before the optimizer: FSDP replaces the parameters with their shards
            self._set_ddp_training()
        self.optimizer = self._build_optimizer()
        self.warmup_steps, self.warmup_reason = cfg.resolve_warmup_steps(self.total_steps)
        self.scheduler = cosine_schedule_with_warmup(self.optimizer, self.warmup_steps,
                                                     self.total_steps)
        self.progress = Progress()
        self.resumed_from: Path | None = None
        self._saved_step = -1  # step of the last checkpoint on disk for this run
        self._stop_signum = 0  # a stop signal the ranks agreed on
        self.stop_signal: Callable[[], int] = lambda: 0  # see train()
        # PiSSA's initial A and B, before a resume loads trained ones (a resumed run recomputes them
        # from the same seed): the final adapter is the difference, a LoRA adapter for the base.
        self.pissa_initial = None
        if cfg.pissa:
            self.pissa_initial = {key: value.detach().cpu().clone()
                                  for key, value in full_adapter_state(model).items()}
        if resume is not None:
            self.resume(*resume)
        # where this session started: 0, or the checkpoint's step
        self.first_step = self.progress.step

    # --- set-up ---

    def set_mixed_precision_context(self, precision: str) -> None:
        """`self.ctx`, the autocast every forward pass runs in (built once, as nanoGPT does; none
        for fp32), and `self.gradscaler`, on for fp16 only: its 5-bit exponent underflows small
        gradients; bf16 has fp32's range."""
        self.precision, self.mixed_precision_dtype = precision, autocast_dtype(precision)
        self.ctx = autocast_context(precision, self.dist.device)
        self.gradscaler = torch.amp.GradScaler(self.dist.device.type,
                                               enabled=self.mixed_precision_dtype == torch.float16)

    def prepare_dataloader(self, train_set, valid_set, tokenizer) -> tuple[DataLoader, DataLoader]:
        """Training batches shuffled per epoch and sharded over ranks; validation sharded without
        shuffling."""
        cfg, dist = self.cfg, self.dist
        if cfg.group_by_length:
            sampler = LengthGroupedSampler(train_set["length"], cfg.batch_size, dist.world_size,
                                           dist.rank, cfg.seed)
        else:
            # Also with one process: the same shuffled order for any world size, so 2 ranks x batch
            # b see the same global batches as 1 process x batch 2b.
            sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank,
                                         shuffle=True, seed=cfg.seed, drop_last=False)
        # Lengths rounded up to a multiple of 8, as the usual recipe's collator does: on a CPU
        # oneDNN builds and caches kernels for each new shape, so fewer shapes mean fewer builds.
        collate = (PackCollator(tokenizer.pad_token_id, pad_to_multiple_of=8) if cfg.packing
                   else PadCollator(tokenizer, pad_to_multiple_of=8))
        workers = {"num_workers": cfg.num_workers, "worker_init_fn": faults.ignore_stop_signals}
        # Generators of their own: else each new iterator draws a seed from the global RNG, and a
        # resumed run's dropout masks would drift from the uninterrupted run's.
        train_loader = DataLoader(train_set, batch_size=cfg.batch_size,
                                  sampler=SkipSampler(sampler), collate_fn=collate,
                                  pin_memory=dist.device.type == "cuda", **workers,
                                  generator=torch.Generator().manual_seed(cfg.seed))
        # Every rank evaluates its own slice once (FSDP pads the shorter with label-less examples);
        # sums all-reduced.
        valid_shard = even_validation_shard(valid_set, dist)
        valid_loader = DataLoader(valid_shard, batch_size=cfg.batch_size, shuffle=False,
                                  collate_fn=collate, **workers,
                                  generator=torch.Generator().manual_seed(cfg.seed))
        return train_loader, valid_loader

    def _set_ddp_training(self) -> None:
        """Wrap the LoRA model after injection: DDP (support/distributed.py) gives every rank a
        whole copy and all-reduces the adapter's gradients; FSDP=true (support/fsdp.py) shards it,
        frozen base included, over the ranks."""
        self.model = (shard_model(self.raw_model, self.dist, self.mixed_precision_dtype)
                      if self.dist.fsdp
                      else ddp_model(self.raw_model, self.dist))

    def _build_optimizer(self) -> torch.optim.Optimizer:
        # Weight decay on the LoRA matrices only, not on biases (when BIAS trains them).
        decay, no_decay = [], []
        for name, param in self.raw_model.named_parameters():
            if param.requires_grad:
                (no_decay if name.endswith("bias") else decay).append(param)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.cfg.learning_rate,
                                 fused=self.dist.device.type == "cuda")

    @property
    def finished(self) -> bool:
        """True when the run has no step left to train (a finished run resumed)."""
        return self.progress.step >= self.total_steps

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.raw_model.parameters() if p.requires_grad]

    # --- the loop ---

    def train(self, stop_signal: Callable[[], int] = lambda: 0) -> dict:
        """Run until NUM_EPOCHS or MAX_STEPS; returns the last evaluation's metrics. `stop_signal()`
        is the number of a stop signal this process received, or 0 (faults.StopSignals), read once
        per step and between evaluation batches; a signal raises TrainingStopped once the step in
        progress is finished and checkpointed."""
        self.stop_signal = stop_signal
        # rows past the checkpoint (or of a run that had none) are redone
        self.metrics.trim(self.progress.step)
        self.raw_model.train()
        # `with`: the bar's line is ended also when an error ends the run, so the error gets a line
        # of its own.
        with tqdm(total=self.total_steps, initial=self.progress.step,
                  disable=not self.dist.is_master, desc="train", dynamic_ncols=True) as bar:
            while not self.finished:
                self._run_epoch(bar)
        return self.progress.last_eval

    def _run_epoch(self, bar: tqdm) -> None:
        """Optimizer steps from the current data position to the end of the epoch (or of the
        run)."""
        cfg, progress = self.cfg, self.progress
        self.train_sampler.set_epoch(progress.epoch)
        # a resumed epoch goes on where it was
        self.train_sampler.skip = progress.batches_done * cfg.batch_size
        batches = iter(self.train_loader)
        while not self.finished:
            with faults.data_worker_errors(cfg.num_workers):
                micro_batches = list(itertools.islice(batches, cfg.grad_accum_steps))
            started = time.perf_counter()
            metrics = self.optimizer_step(micro_batches)
            # The data position moves to the next epoch at once, so that this step's checkpoint
            # resumes there.
            progress.batches_done += len(micro_batches)
            epoch_done = progress.batches_done >= self.micro_batches_per_epoch
            if epoch_done:
                progress.epoch, progress.batches_done = progress.epoch + 1, 0
            metrics["tokens_per_s"] = metrics["tokens"] / (time.perf_counter() - started)
            self.metrics.write(metrics)
            bar.update(1)
            bar.set_postfix({"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
                             "tok_s": f"{metrics['tokens_per_s']:.0f}"}
                            | ({"skipped": progress.skipped_steps} if self.gradscaler.is_enabled()
                               else {}))
            self._evaluate_and_save(epoch_done, epoch=metrics["epoch"])
            if epoch_done:
                return

    def _evaluate_and_save(self, epoch_done: bool, epoch: int) -> None:
        """The loop's one place for evaluation and checkpoints, after each step: every EVAL_FREQ and
        SAVE_STEPS steps, at each epoch's end and at the run's last step (so a larger MAX_STEPS can
        extend the run from it). Then a stop signal ends the run, with this step's checkpoint."""
        cfg, step = self.cfg, self.progress.step
        boundary = epoch_done or self.finished
        if boundary or (cfg.eval_freq and step % cfg.eval_freq == 0):
            self.progress.last_eval = self.evaluate(epoch)
            generate = cfg.eval_generate and (self.finished or cfg.eval_generate_every_eval)
            if generate and self.progress.last_eval:
                self.progress.last_eval |= self.score_answers(epoch)
        if boundary or (cfg.save_steps and step % cfg.save_steps == 0):
            self.save_checkpoint()
        if self._stop_signum:
            raise TrainingStopped(self._stop_signum, step, self.save_checkpoint())

    def optimizer_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over `micro_batches`, this rank's share of the global batch.

        The loss is the mean over every label token of the global batch (all micro-batches on all
        ranks), so the update does not depend on how the batch is split (a mean of micro-batch means
        would weight short examples more). A step's collectives are all here: (1) the global token
        counts, (2) DDP's gradient all-reduce in the last micro-batch's backward pass, (3) the loss
        and the ranks' stop signals; its one host sync reads (3).
        """
        dist, device = self.dist, self.dist.device
        counts = torch.tensor([[count_label_tokens(b), int(b["attention_mask"].sum())]
                               for b in micro_batches],
                              device=device).sum(0)
        counts = all_reduce_sum(counts, dist)  # (1) [label tokens, real tokens] of the global batch
        # DDP averages gradients over ranks; multiplying by world_size turns that average back into
        # a sum.
        loss_weight = dist.world_size / counts[0].clamp_min(1).double()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        for i, batch in enumerate(micro_batches):
            # (2)
            loss_sum += self._run_batch(batch, loss_weight,
                                        sync_gradients=i == len(micro_batches) - 1)
        # scale -> backward (above) -> unscale_ -> clip -> step -> update, as GradScaler requires:
        # gradients are clipped at their true size, and step() skips the update when unscale_ found
        # inf/NaN.
        self.gradscaler.unscale_(self.optimizer)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.trainable_parameters(),
                                                               max_norm))
        totals = all_reduce_sum(torch.cat([loss_sum.view(1),
                                           faults.signal_flags(self.stop_signal(), device)]), dist)
        # (3), and the host sync
        loss_sum, sigterm, sigint, tokens, real_tokens, grad_norm = torch.cat(
            [totals, counts.double(), grad_norm.double().view(1)]).tolist()
        loss = loss_sum / max(tokens, 1)
        problem = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
        if not (math.isfinite(loss) and math.isfinite(grad_norm) or self.gradscaler.is_enabled()):
            # Without a GradScaler nothing would skip this update: AdamW would write inf/NaN into
            # the adapter.
            raise RunError(f"{problem} at step {self.progress.step + 1} with {self.precision}; "
                           f"stopping before the update; {resume_advice(self.output_dir)}; try a "
                           "lower LEARNING_RATE or PRECISION=fp32")
        scale_before = self.gradscaler.get_scale()  # a sync only with fp16's GradScaler
        self.gradscaler.step(self.optimizer)
        self.gradscaler.update()
        if self.gradscaler.is_enabled() and self.gradscaler.get_scale() < scale_before:
            # inf/NaN gradients: the update was skipped and the scale lowered
            self.progress.skipped_steps += 1
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        self._stop_signum = faults.agreed_signal(sigterm, sigint)
        return {"step": self.progress.step, "epoch": self.progress.epoch + 1, "loss": loss,
                "lr": lr, "grad_norm": grad_norm, "skipped_steps": self.progress.skipped_steps,
                "tokens": int(real_tokens)}

    def _run_batch(self, batch: dict, loss_weight: torch.Tensor,
                   sync_gradients: bool) -> torch.Tensor:
        """One micro-batch: forward under `self.ctx`, the summed token loss, its backward pass
        (weighted into the step's mean, scaled by the GradScaler for fp16). Returns the loss sum,
        detached."""
        # DDP and FSDP reduce the gradients of the last one only
        with gradient_sync(self.model, sync_gradients):
            batch = {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}
            loss = self.batch_loss(self.model, batch)
            self.gradscaler.scale(loss * loss_weight.to(loss.dtype)).backward()
        return loss.detach()

    def batch_loss(self, model, batch: dict) -> torch.Tensor:
        """The summed token loss of one batch, under `self.ctx`: computed by the model's forward
        pass (so DDP and FSDP see it), without the whole logits (1 GiB at BLOOM's vocabulary, 4 x
        512 tokens, half precision)."""
        with self.ctx:  # a KV cache is for generating, not training
            return model(**model_inputs(batch), use_cache=False, targets=next_token_labels(batch))

    @torch.no_grad()
    def evaluate(self, epoch: int | None = None) -> dict:
        """Validation loss (token mean over all ranks' shards) and perplexity, logged and printed. A
        stop signal abandons it (on a real validation set it can take longer than torchrun waits
        before it kills its workers): it then returns {}, logs nothing, and the loop stops. `epoch`
        (from 1): the last step's, as its row has it."""
        device = self.dist.device
        self.raw_model.eval()
        # [loss sum, label tokens, SIGTERM, SIGINT]
        totals = torch.zeros(4, device=device, dtype=torch.float64)
        # FSDP's ranks must stop at the same batch
        stop_signal = agreed_stop_signal(self.stop_signal, self.dist)
        with faults.data_worker_errors(self.cfg.num_workers):
            for batch in self.valid_loader:
                if signum := stop_signal():
                    totals[2:] = faults.signal_flags(signum, device)
                    break
                batch = {k: v.to(device) for k, v in batch.items()}
                totals[0] += self.batch_loss(self.raw_model, batch).double()
                totals[1] += count_label_tokens(batch)
        self.raw_model.train()
        loss_sum, tokens, sigterm, sigint = all_reduce_sum(totals, self.dist).tolist()
        self._stop_signum = self._stop_signum or faults.agreed_signal(sigterm, sigint)
        if tokens == 0 or self._stop_signum:
            return {}
        loss = loss_sum / tokens
        metrics = {"step": self.progress.step, "epoch": epoch or self.progress.epoch + 1,
                   "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
        self.metrics.write(metrics)
        if self.dist.is_master:  # tqdm.write: on its own line, not glued to the progress bar
            tqdm.write(f"step {self.progress.step}: eval loss {loss:.4f}, perplexity "
                       f"{metrics['eval_ppl']:.2f}")
        return metrics

    @torch.no_grad()
    def score_answers(self, epoch: int) -> dict:
        """EVAL_GENERATE: the base model's (generated once) and the adapter's greedy answers to the
        first EVAL_GENERATE validation instructions, scored as `inference.py evaluate` scores them;
        the means logged and returned. Rank 0 generates on its whole copy of the model; the other
        ranks wait at the next collective."""
        if not self.dist.is_master:
            return {}
        import inference  # generation's prompts, options and batching, as after training

        tokenizer = inference.load_tokenizer(self.cfg.model_path)  # padding on the left
        loaded = inference.LoadedModel(self.raw_model, tokenizer, self.dist.device, self.precision,
                                       merged=False)
        options = inference.GenerationOptions(max_new_tokens=inference.EVAL_MAX_NEW_TOKENS)
        size = self.cfg.batch_size

        def generate(records: list[dict]) -> list[str]:
            prompts = [inference.build_prompt(inference.PROMPTER, r["instruction"], r["input"])
                       for r in records]
            with self.ctx:
                batches = (prompts[i:i + size] for i in range(0, len(prompts), size))
                return [answer for batch in batches
                        for answer in inference.generate_responses(loaded, batch, options,
                                                                   inference.PROMPTER)]

        self.raw_model.eval()
        devices = [self.dist.device] if self.dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # training's random streams stay as they were
            if self._base_answers is None:
                with self.raw_model.disable_adapter():
                    self._base_answers = generate(self.answer_records)
            rows = answer_eval.compare(self.answer_records, generate, generate,
                                       base_answers=self._base_answers)
        self.raw_model.train()
        summary = answer_eval.summarize(rows)
        metrics = {"step": self.progress.step, "epoch": epoch, "eval_generated": len(rows)}
        for name in answer_eval.SCORES:
            metrics |= {f"eval_{name}": summary[name]["adapter"]["mean"],
                        f"eval_base_{name}": summary[name]["base"]["mean"]}
        self.metrics.write(metrics)
        tqdm.write(f"step {self.progress.step}: {len(rows)} answers, ROUGE-L "
                   f"{metrics['eval_rouge_l']:.4f} (base {metrics['eval_base_rouge_l']:.4f}), "
                   f"exact match {metrics['eval_exact_match']:.3f} "
                   f"(base {metrics['eval_base_exact_match']:.3f})")
        return metrics

    # --- checkpoints and the final adapter ---

    def save_checkpoint(self) -> Path:
        """Write OUTPUT_DIR/checkpoint-<step>/ (adapter in PEFT's layout, trainer_state.pt,
        manifest.json), complete or not at all, then apply SAVE_TOTAL_LIMIT. Every rank calls it
        (the RNG states are gathered); rank 0 writes. Raises RunError on every rank when rank 0
        could not write (disk full, read-only folder)."""
        progress = self.progress
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{progress.step}"
        if self._saved_step == progress.step:
            return final  # SAVE_STEPS, an epoch's end and a stop signal can fall on the same step
        rng_states = gather_objects(rng_state(), self.dist)
        # Whole tensors, in DDP's layout: under FSDP every rank takes part in gathering the shards.
        adapter, optimizer_state = (full_adapter_state(self.raw_model),
                                    full_optimizer_state(self.optimizer))
        error = ""
        if self.dist.is_master:
            state = trainer_state(progress, optimizer_state, self.scheduler, self.gradscaler,
                                  rng_states)
            manifest = checkpoint_manifest(progress, self.total_steps, self.precision,
                                           self.identity, self.cfg)
            error = save_checkpoint_folder(final, self.raw_model, state, manifest,
                                           self.cfg.save_total_limit, adapter)
        # Every rank learns whether rank 0's write worked, so all stop together if it did not; this
        # is also the barrier that keeps any rank from running ahead of (or exiting before) an
        # unfinished checkpoint.
        if all_reduce_sum(torch.tensor([float(bool(error))], device=self.dist.device),
                          self.dist).item():
            raise RunError(error
                           or f"rank 0 could not write {final}; {resume_advice(self.output_dir)}")
        self._saved_step = progress.step
        return final

    def resume(self, checkpoint: Path, manifest: dict) -> None:
        """Restore adapter, optimizer, schedule, GradScaler, RNG and data position from a verified
        checkpoint."""
        try:
            load_adapter_weights(self.raw_model, read_adapter_dir(checkpoint)[1],
                                 source=str(checkpoint))
        except (OSError, ValueError) as err:
            raise ConfigError(f"RESUME_FROM: {err}") from None
        state = read_trainer_state(checkpoint)
        # under FSDP each rank keeps its slice
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # A checkpoint from a run without fp16 has an empty scaler state; an fp16 run then starts a
        # fresh scale.
        if state["scaler"] or not self.gradscaler.is_enabled():
            self.gradscaler.load_state_dict(state["scaler"])
        # the same on every rank, so all skip or run the same steps
        self.progress = Progress.from_state(state)
        set_rng_state(state["rng"][self.dist.rank])
        self.resumed_from = checkpoint
        if os.path.normpath(checkpoint) == os.path.normpath(
                self.output_dir / f"{CHECKPOINT_PREFIX}{state['step']}"):
            # This step's checkpoint is on disk already: a stop right away, or the end of a finished
            # run, must not write it again. Compared as text, so that every rank of a multi-node run
            # decides the same.
            self._saved_step = self.progress.step
        for remark in resume_notes(manifest, self.total_steps, self.precision):
            note(remark, self.dist)

    def save_final_adapter(self) -> None:
        """The finished adapter, directly in OUTPUT_DIR (PeftModel.from_pretrained(base, OUTPUT_DIR)
        loads it), and the loss curve; the other ranks wait until both are on disk. A PiSSA adapter
        is written as a plain LoRA one of rank 2 x LORA_R for the original base
        (lora_model.pissa_to_lora); its checkpoints stay PiSSA's own, to resume from."""
        adapter = full_adapter_state(self.raw_model)  # every rank: FSDP gathers the shards
        if self.dist.is_master:
            self.raw_model.save_pretrained(self.output_dir, state_dict=adapter,
                                           initial_state_dict=self.pissa_initial)
            self.metrics.plot()
            self.metrics.close()
        if self.dist.distributed:
            torch_dist.barrier()


def try_longest_batch(trainer: Trainer) -> str:
    """One forward and backward pass on the BATCH_SIZE longest training examples, before the first
    step.

    A batch is padded to its longest example, and Alpaca's examples run from a few dozen tokens to
    MAX_LENGTH: a shape that does not fit in memory would otherwise fail whenever the loader first
        draws long examples, maybe
    hours into the run. The gradients are dropped and the random generators restored, so training is
    the same with or without it; it runs on the raw model, so DDP communicates nothing (FSDP gathers
    weights: every rank runs it).

    Returns:
        A line for the start banner: the shape tried and, on a GPU, the peak memory it took.
    """
    device, dataset = trainer.dist.device, trainer.train_loader.dataset
    longest = np.argsort(np.asarray(dataset["length"]), kind="stable")[-trainer.cfg.batch_size:]
    batch = trainer.train_loader.collate_fn([dataset[int(i)] for i in longest])
    batch = {k: v.to(device) for k, v in batch.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # as in a step: dropout and activation checkpointing are on in training mode only
    trainer.raw_model.train()
    # dropout draws from it
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        trainer.batch_loss(trainer.raw_model, batch).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    shape = f"longest batch {len(longest)} x {batch['input_ids'].shape[1]} tokens"
    if device.type != "cuda":
        return f"{shape}: forward and backward ran"
    peak, total = (torch.cuda.max_memory_allocated(device),
                   torch.cuda.get_device_properties(device).total_memory)
    # AdamW's state (allocated at the first step) is two floats per LoRA parameter: small beside
    # this.
    return (f"{shape}: peak {peak / 2**30:.1f} GiB of the GPU's {total / 2**30:.1f} GiB "
            "(forward and backward)")


def run(cfg: TrainConfig, dist: DistEnv, signals: StopSignals | None = None) -> dict:
    """Everything after set-up; returns the last evaluation's metrics. Errors in the data or
    settings (a damaged or incompatible RESUME_FROM included) surface before the model loads and
    before anything is written to OUTPUT_DIR; then the run takes the folder
    (output_dir.own_output_dir), still before the model loads. From the first step on, `signals`
    (main's; the caller releases them) turn SIGTERM and Ctrl-C into a checkpoint.

    Raises:
        TrainingStopped: a stop signal; the checkpoint is written.
    """
    started = time.perf_counter()
    for line in misspelled_settings() if dist.is_master else []:
        print(f"warning: {line}", flush=True)
    check_output_dir(cfg, dist)  # another run's folder: refused at once, nothing written
    if problem := missing_tracker(cfg.report_to_list):
        raise ConfigError(problem)
    seed_everything(cfg.seed)
    precision = resolve_precision(cfg.precision, dist.device, mixed=cfg.mix_prec_train)
    tokenizer = load_tokenizer(cfg.model_path)
    cfg = with_default_targets(cfg)
    train_set, valid_set, stats = prepare_datasets(cfg, tokenizer)
    answer_records = generation_records(cfg, tokenizer, len(valid_set), stats["fingerprint"])
    if cfg.packing:
        train_set, valid_set = pack_datasets(cfg, train_set, valid_set)
    identity = run_identity(cfg, dist.world_size, stats["fingerprint"])
    resume = resolve_resume(cfg, dist)
    if resume is not None:
        check_resumable(*resume, identity)
    # This run's folder from here until it ends (support/output_dir.py), before the model loads: of
    # two runs started together, the second stops here, not after loading the model and trying the
    # longest batch beside the first.
    with own_output_dir(cfg, dist):
        model = load_pretrained_model(cfg.model_path, dist.device,
                                      base_weight_dtype(precision, dist.device), cfg.quantize,
                                      precision)
        if cfg.fused_modules:
            # BLOOM's attention and GELU on fused kernels; other architectures: their own
            use_fused_modules(model)
        # same seed on every rank: identical LoRA init
        lora_model = build_lora_model(model, cfg, cfg.model_path)
        # Dropout masks should differ between ranks; the offset keeps each rank's stream
        # reproducible.
        torch.manual_seed(cfg.seed + dist.rank)
        trainer = Trainer(cfg, dist, lora_model, tokenizer, train_set, valid_set, precision,
                          identity, resume)
        trainer.answer_records = answer_records
        if dist.is_master:
            print_banner(cfg, dist, stats, trainer,
                         describe_precision(cfg, trainer.precision, dist.device))
        # An out-of-memory batch shape fails here, not steps into the run; a finished run has no
        # step to fail.
        fits = "nothing left to train" if trainer.finished else try_longest_batch(trainer)
        if dist.is_master:
            print(f"memory       {fits}", flush=True)
        if signals is not None:
            signals.catch(force_on_second_sigint=not dist.distributed)
        metrics = trainer.train(stop_signal=lambda: signals.received if signals else 0)
        trainer.save_final_adapter()
        if dist.is_master:
            print_summary(cfg, trainer, metrics, time.perf_counter() - started)
        return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (faults.exit_code): 0 finished, 1 a bad setting or a
    failed run, 128 + the signal's number when a signal stopped the run after a checkpoint. Every
    failure is one line on stderr; a bug keeps its traceback."""
    cfg = dist = None
    signals = StopSignals()
    try:
        cfg = load_config(argv)
        dist = setup_distributed(cfg)
        run(cfg, dist, signals)
        return 0
    except (Exception, KeyboardInterrupt) as err:
        code = faults.exit_code(err, cfg, dist)
        if code is None:
            raise
        return code
    finally:
        signals.release()  # only now: torchrun's SIGTERM to a survivor waits for its error line
        shutdown_distributed()


if __name__ == "__main__":
    raise SystemExit(main())
