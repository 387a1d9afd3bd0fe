"""What train.py says at the start and at the end of a run (rank 0 prints it): the banner, and the
summary with the command that tries the adapter."""

from __future__ import annotations

import shlex

import torch.distributed as torch_dist

from support.alpaca_data import answer_cut_warning, data_stats_line
from support.atomic import human_bytes
from support.config import TrainConfig
from support.distributed import DistEnv
from support.model_loading import base_model_bytes
from support.packing import packing_line
from support.precision import emulated_bf16_warning


def print_banner(cfg: TrainConfig, dist: DistEnv, stats: dict, trainer,
                 precision_line: str) -> None:
    """The start of a run: what it trains, on what, how, and where it writes (`trainer`: a
    train.Trainer)."""
    trainable, total = trainer.raw_model.get_nb_trainable_parameters()
    effective_batch = cfg.batch_size * cfg.grad_accum_steps * dist.world_size
    train_set, valid_set = trainer.train_loader.dataset, trainer.valid_loader.dataset.dataset
    lines = [
        f"model        {cfg.model_path}",
        f"data         {cfg.data_path}: {data_stats_line(stats)}",
        f"examples     {example_count(train_set):,} train / {example_count(valid_set):,} "
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
        + (f" ({'FSDP' if dist.fsdp else 'DDP'}, {torch_dist.get_backend()})" if dist.distributed
           else ""),
        f"batch        {cfg.batch_size} x {cfg.grad_accum_steps} accumulation x {dist.world_size} "
        f"processes = {effective_batch} {'packed rows' if cfg.packing else 'examples'} per "
        f"optimizer step; {trainer.total_steps:,} steps, the first "
        f"{trainer.warmup_steps:,} warming up ({trainer.warmup_reason})"
        + ("; gradient checkpointing" if cfg.gradient_checkpointing else ""),
        f"output       {cfg.output_dir}",
        "checkpoints  " + (f"every {cfg.save_steps} steps, " if cfg.save_steps else "")
        + "at each epoch's end and at the last step; " + (f"the newest {cfg.save_total_limit} kept"
                                                          if cfg.save_total_limit else "all kept"),
    ]
    if cfg.packing:
        lines.insert(3, f"packing      {packing_line(train_set, valid_set, cfg.max_length)}")
    if trainer.resumed_from is not None:
        progress = trainer.progress
        position = ("the run had finished (raise NUM_EPOCHS or MAX_STEPS to train on)"
                    if trainer.finished else
                    f"epoch {progress.epoch + 1}, {progress.batches_done} of its "
                    f"{trainer.micro_batches_per_epoch} micro-batches done")
        lines.append(f"resumed      from {trainer.resumed_from}: step {progress.step}, {position}")
    if cut := answer_cut_warning(stats, cfg.max_length):
        lines.append(f"warning      {cut}")
    if trainer.warmup_reason == "WARMUP_STEPS" and trainer.warmup_steps >= trainer.total_steps:
        lines.append(f"warning      WARMUP_STEPS={cfg.warmup_steps} is not shorter than the run "
                     f"({trainer.total_steps} steps): the learning rate never reaches "
                     f"LEARNING_RATE={cfg.learning_rate:g}")
    if slow := emulated_bf16_warning(trainer.precision, cfg.quantize, dist.device):
        lines.append(f"warning      {slow}")
    print("\n".join(lines), flush=True)


def example_count(dataset) -> int:
    """Examples in a dataset of examples, or of packed rows (each knows how many it holds)."""
    return sum(dataset["examples"]) if "examples" in getattr(dataset, "column_names",
                                                             ()) else len(dataset)


def base_memory_line(model, parameters: int) -> str:
    """The base's weights in memory, measured (model_loading.base_model_bytes), and beside float32's
    4 bytes for each of its `parameters` (4-bit weights counted unpacked)."""
    held, float32 = base_model_bytes(model), 4 * parameters
    return (f"{human_bytes(held)} of weights in memory ({held / float32:.2f} x float32's "
            f"{human_bytes(float32)})")


def print_summary(cfg: TrainConfig, trainer, metrics: dict, seconds: float) -> None:
    """The end of a run: how long, how good, where the adapter is and the command that tries it
    (shell-quoted, so that it can be pasted whatever OUTPUT_DIR holds)."""
    progress, minutes = trainer.progress, f"{int(seconds // 60)} min {seconds % 60:.0f} s"
    evaluation = (f"eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_ppl']:.2f}"
                  if metrics
                  else "no validation set")
    if "eval_rouge_l" in metrics:  # EVAL_GENERATE
        evaluation += (f"; on {metrics['eval_generated']} validation answers ROUGE-L "
                       f"{metrics['eval_rouge_l']:.4f} (base {metrics['eval_base_rouge_l']:.4f}), "
                       f"exact match {metrics['eval_exact_match']:.3f} "
                       f"(base {metrics['eval_base_exact_match']:.3f})")
    skipped = (f"; {progress.skipped_steps} of {progress.step} fp16 steps skipped by the "
               "GradScaler (inf/NaN gradients)" if trainer.gradscaler.is_enabled() else "")
    trained = progress.step - trainer.first_step
    if trained == 0:
        done = (f"no step to train: the run had already finished at step {progress.step:,} "
                f"({minutes})")
    elif trainer.first_step:
        done = (f"{steps(trained)} in {minutes}, from step {trainer.first_step:,} to "
                f"{progress.step:,}")
    else:
        done = f"{steps(trained)} in {minutes}"
    command = ["python", "inference.py", "--lora-weights", cfg.output_dir, "--instruction",
               "Give three tips for staying healthy."]
    print(f"done         {done}; {evaluation}{skipped}\n"
          f"adapter saved to {cfg.output_dir}; try it:\n{shlex.join(command)}", flush=True)


def steps(count: int) -> str:
    return f"{count:,} step{'' if count == 1 else 's'}"
