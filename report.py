"""What train.py says at the start and at the end of a run (rank 0 prints it): the banner, and the summary with the
command that tries the adapter."""

from __future__ import annotations

import torch.distributed as torch_dist

from alpaca_data import data_stats_line
from config import TrainConfig
from distributed import DistEnv
from model_loading import base_model_bytes


def print_banner(cfg: TrainConfig, dist: DistEnv, stats: dict, trainer, precision_line: str) -> None:
    """The start of a run: what it trains, on what, how, and where it writes (`trainer`: a train.Trainer)."""
    trainable, total = trainer.raw_model.get_nb_trainable_parameters()
    effective_batch = cfg.batch_size * cfg.grad_accum_steps * dist.world_size
    lines = [
        f"model        {cfg.model_path}",
        f"data         {cfg.data_path}: {data_stats_line(stats)}",
        f"examples     {len(trainer.train_loader.dataset):,} train / {len(trainer.valid_loader.dataset.dataset):,} "
        f"validation ({stats['valid_reason']})",
        f"LoRA         r={cfg.lora_r}, alpha={cfg.lora_alpha:g}, dropout={cfg.lora_dropout:g}, "
        + ("DoRA, " if cfg.use_dora else "")
        + (f"init {cfg.init_lora_weights}, " if cfg.init_lora_weights != "true" else "")
        + f"targets={cfg.target_modules}; trainable {trainable:,} of {total:,} "
        f"({100 * trainable / total:.4f}%)",
        f"precision    {precision_line}",
        f"base         {base_memory_line(trainer.raw_model, total - trainable)}"
        + (" in each process (FSDP shards it)" if dist.fsdp else ""),
        f"processes    {dist.world_size}"
        + (f" ({'FSDP' if dist.fsdp else 'DDP'}, {torch_dist.get_backend()})" if dist.ddp else ""),
        f"batch        {cfg.batch_size} x {cfg.grad_accum_steps} accumulation x {dist.world_size} processes = "
        f"{effective_batch} examples per optimizer step; {trainer.total_steps:,} steps, the first "
        f"{trainer.warmup_steps:,} warming up ({trainer.warmup_reason})"
        + ("; gradient checkpointing" if cfg.gradient_checkpointing else ""),
        f"output       {cfg.output_dir}",
        "checkpoints  " + (f"every {cfg.save_steps} steps, " if cfg.save_steps else "")
        + "at each epoch's end and at the last step; " + (f"the newest {cfg.save_total_limit} kept"
                                                          if cfg.save_total_limit else "all kept"),
    ]
    if trainer.resumed_from is not None:
        progress = trainer.progress
        position = ("the run had finished (raise NUM_EPOCHS or MAX_STEPS to train on)" if trainer.finished else
                    f"epoch {progress.epoch + 1}, {progress.batches_done} of its {trainer.micro_batches_per_epoch} "
                    "micro-batches done")
        lines.append(f"resumed      from {trainer.resumed_from}: step {progress.step}, {position}")
    if trainer.warmup_reason == "WARMUP_STEPS" and trainer.warmup_steps >= trainer.total_steps:
        lines.append(f"warning      WARMUP_STEPS={cfg.warmup_steps} is not shorter than the run ({trainer.total_steps} "
                     f"steps): the learning rate never reaches LEARNING_RATE={cfg.learning_rate:g}")
    print("\n".join(lines), flush=True)


def base_memory_line(model, parameters: int) -> str:
    """The base's weights in memory, measured (model_loading.base_model_bytes), and beside float32's 4 bytes for
    each of its `parameters` (4-bit weights counted unpacked)."""
    held, float32 = base_model_bytes(model), 4 * parameters
    return f"{human_bytes(held)} of weights in memory ({held / float32:.2f} x float32's {human_bytes(float32)})"


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.2f} {unit}"
        count /= 1024


def print_summary(cfg: TrainConfig, trainer, metrics: dict, seconds: float) -> None:
    """The end of a run: how long, how good, where the adapter is and the command that tries it."""
    progress, minutes = trainer.progress, f"{int(seconds // 60)} min {seconds % 60:.0f} s"
    evaluation = (f"eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_ppl']:.2f}" if metrics
                  else "no validation set")
    skipped = (f"; {progress.skipped_steps} of {progress.step} fp16 steps skipped by the GradScaler (inf/NaN "
               "gradients)" if trainer.gradscaler.is_enabled() else "")
    print(f"done         {progress.step:,} steps in {minutes}; {evaluation}{skipped}\n"
          f"adapter saved to {cfg.output_dir}; try it:\n"
          f"python inference.py --lora-weights {cfg.output_dir} --instruction \"Give three tips for staying healthy.\"",
          flush=True)
