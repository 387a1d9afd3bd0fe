"""Mixed precision in train.py, on the CPU and the shipped tiny BLOOM: which precision MIX_PREC_TRAIN picks, that
autocast really runs (training and evaluation), the GradScaler's step order and skipped steps, losses close to
float32, float32 adapters, and a non-finite loss or gradient stopping the run without touching the checkpoints.

The reference for the numbers is the same run in float32.
"""

import importlib.util
import json
import math
import re
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BloomModel

import train
from conftest import REPO, SAMPLE, TINY_BLOOM, adapter_tensors, metric_rows, tiny_settings
from support import precision
from support.config import TrainConfig, load_config


def run_settings(tmp_path: Path, data: Path, **overrides) -> dict:
    """conftest's tiny_settings, 5 steps."""
    return tiny_settings(tmp_path, data, **{"max_steps": 5, **overrides})


def set_env(monkeypatch, settings: dict) -> None:
    """Configure train.main() through the environment, as a user does."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MIX_PREC_TRAIN", "PRECISION",
                "DDP", "DEBUG"):
        monkeypatch.delenv(var, raising=False)
    for key, value in settings.items():
        monkeypatch.setenv(key.upper(), str(value))


def make_trainer(cfg: TrainConfig, precision: str) -> train.Trainer:
    dist = train.DistEnv()
    train.seed_everything(cfg.seed)
    tokenizer = train.load_tokenizer(cfg.model_path)
    train_set, valid_set, _ = train.prepare_datasets(cfg, tokenizer)
    model = train.build_lora_model(
        train.load_pretrained_model(cfg.model_path, dist.device, train.base_weight_dtype(precision, dist.device)),
        cfg, cfg.model_path)
    return train.Trainer(cfg, dist, model, tokenizer, train_set, valid_set, precision)


def step_rows(out: Path) -> list[dict]:
    return [row for row in metric_rows(out) if "loss" in row]


# --- which precision ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, device, native_bf16, expected", [
    ({"MIX_PREC_TRAIN": "true"}, "cpu", False, "bf16"),
    ({"MIX_PREC_TRAIN": "true"}, "cuda", True, "bf16"),    # A100/H100
    ({"MIX_PREC_TRAIN": "true"}, "cuda", False, "fp16"),   # T4/V100: bf16 only emulated, so fp16 + GradScaler
    ({}, "cuda", True, "fp32"),
    ({"MIX_PREC_TRAIN": "true", "PRECISION": "fp32"}, "cuda", True, "fp32"),
    ({"PRECISION": "fp16"}, "cpu", False, "fp16"),
    ({"MIX_PREC_TRAIN": "false", "PRECISION": "bf16"}, "cuda", False, "bf16"),
])
def test_mix_prec_train_picks_the_hardwares_precision_and_precision_overrides(fake_gpu, env, device, native_bf16,
                                                                             expected):
    fake_gpu(native_bf16)
    cfg = load_config([], env)
    assert train.resolve_precision(cfg.precision, torch.device(device), mixed=cfg.mix_prec_train) == expected


def test_base_weights_are_in_the_compute_dtype_but_not_fp16_on_a_cpu_and_the_banner_says_so():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert train.base_weight_dtype("fp16", cuda) == torch.float16
    assert train.base_weight_dtype("bf16", cuda) == torch.bfloat16
    assert train.base_weight_dtype("fp32", cuda) == torch.float32
    assert train.base_weight_dtype("bf16", cpu) == torch.bfloat16
    assert {train.base_weight_dtype(p, cpu) for p in ("fp16", "fp32")} == {torch.float32}
    t4 = train.describe_precision(load_config([], {"MIX_PREC_TRAIN": "true"}), "fp16", cuda)
    assert t4 == ("fp16 on cuda (MIX_PREC_TRAIN=true): fp16 autocast + GradScaler; base weights float16, "
                  "LoRA float32")
    assert train.describe_precision(load_config([], {"PRECISION": "bf16"}), "bf16", cpu) == (
        "bf16 on cpu (PRECISION): bf16 autocast; base weights bfloat16, LoRA float32")


def test_a_half_precision_base_keeps_float32_norms_and_residual_stream_and_its_loss():
    """bf16 base weights under bf16 autocast compute what float32 weights under autocast compute (autocast rounds
    the matmuls' weights to bf16 either way): only the embedding lookup is rounded in addition. The residual
    stream stays float32 (on a CPU layer_norm would otherwise follow half-precision embeddings into bf16)."""
    device = torch.device("cpu")
    batch = {k: v[:, :48] for k, v in json_batch().items()}
    losses, streams = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = train.load_pretrained_model(str(TINY_BLOOM), device, dtype)
        norms = [m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
        assert norms and set(norms) == {torch.float32}
        captured = []
        model.transformer.h[0].register_forward_hook(lambda module, args, out: captured.append(out[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            losses[dtype] = model(**batch).loss.item()
        streams[dtype] = captured[0]
    assert streams == {torch.float32: torch.float32, torch.bfloat16: torch.float32}
    assert abs(losses[torch.bfloat16] - losses[torch.float32]) <= 0.01 * losses[torch.float32]


def json_batch() -> dict:
    """Four Alpaca records, tokenized and right-padded, labels on every real token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_BLOOM)
    texts = [r["instruction"] + " " + r["output"] for r in json.loads(SAMPLE.read_text(encoding="utf-8"))[:4]]
    batch = tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


# --- autocast and the GradScaler -----------------------------------------------------------------------------------

@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                              ("fp32", torch.float32)])
@pytest.mark.slow  # whole training runs in half precision
def test_training_and_evaluation_run_under_the_same_autocast(tmp_path, small_data, precision, dtype):
    trainer = make_trainer(TrainConfig(**run_settings(tmp_path, small_data, max_steps=1)), precision)
    assert trainer.gradscaler.is_enabled() == (precision == "fp16")
    assert all(p.dtype == torch.float32 for p in trainer.trainable_parameters())  # LoRA stays float32
    seen = []
    qkv = trainer.raw_model.model.transformer.h[0].self_attention.query_key_value
    qkv.register_forward_hook(lambda module, args, output: seen.append((module.training, output.dtype)))
    trainer.train()  # one step, then the final evaluation
    assert {dtype} == {d for _, d in seen}
    assert {True, False} == {training for training, _ in seen}


@pytest.mark.slow  # two trainers, fp16 emulated on most CPUs
def test_fp16_step_order_is_scale_backward_unscale_clip_step_update(tmp_path, small_data, monkeypatch):
    trainer = make_trainer(TrainConfig(**run_settings(tmp_path, small_data, grad_accum_steps=2)), "fp16")
    scaler, calls, clipped = trainer.gradscaler, [], []
    assert scaler.get_scale() == 65536.0  # torch.amp.GradScaler("cpu"), loss scaling on

    def spy(name, real):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return wrapper

    for name in ("scale", "unscale_", "step", "update"):
        monkeypatch.setattr(scaler, name, spy(name, getattr(scaler, name)))
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(params, *args, **kwargs):
        calls.append("clip")
        params = list(params)
        clipped.append([p.grad.clone() for p in params])
        return real_clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    trainer.train_loader.sampler.set_epoch(0)
    micro_batches = [b for _, b in zip(range(2), trainer.train_loader)]
    trainer.optimizer_step(micro_batches)
    assert calls == ["scale", "scale", "unscale_", "clip", "step", "update"]  # one scale per micro-batch

    # Clipping sees unscaled gradients: about the float32 ones, not 65536 times larger.
    fp32 = make_trainer(TrainConfig(**run_settings(tmp_path / "fp32", small_data, grad_accum_steps=2)), "fp32")
    fp32.optimizer_step(micro_batches)
    assert len(clipped) == 2
    for half, full in zip(*clipped):
        assert (half - full).abs().max() <= 0.05 * full.abs().max()


# --- the runs: close to float32, float32 adapters ------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data) -> dict[str, Path]:
    """5 steps each of fp32, MIX_PREC_TRAIN=true (bf16 on the CPU) and PRECISION=fp16; name -> OUTPUT_DIR."""
    outputs = {}
    for name, extra in {"fp32": {}, "mix": {"mix_prec_train": True}, "fp16": {"precision": "fp16"}}.items():
        cfg = TrainConfig(**run_settings(tmp_path_factory.mktemp(name), small_data, **extra))
        train.run(cfg, train.DistEnv())
        outputs[name] = Path(cfg.output_dir)
    return outputs


@pytest.mark.slow  # whole training runs in half precision (slow on a CPU without AVX512-BF16/FP16)
@pytest.mark.parametrize("name", ["mix", "fp16"])
def test_mixed_precision_losses_stay_finite_and_close_to_fp32(runs, name):
    reference, rows = step_rows(runs["fp32"]), step_rows(runs[name])
    assert len(rows) == len(reference) == 5
    for row, ref in zip(rows, reference):
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        assert abs(row["loss"] - ref["loss"]) <= 0.02 * ref["loss"]
    assert rows[-1]["skipped_steps"] == 0
    evals, evals_fp32 = ([row["eval_loss"] for row in metric_rows(runs[run]) if "eval_loss" in row]
                         for run in (name, "fp32"))
    assert abs(evals[-1] - evals_fp32[-1]) <= 0.02 * evals_fp32[-1]


@pytest.mark.slow  # whole training runs in half precision (slow on a CPU without AVX512-BF16/FP16)
@pytest.mark.parametrize("precision, weights", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_base_weights_train_as_on_a_gpu(tmp_path, small_data, monkeypatch, runs, precision, weights):
    """What MIX_PREC_TRAIN=true runs on a GPU (T4: float16 base weights, fp16 autocast and GradScaler; A100/H100:
    bfloat16 weights, bf16 autocast), run on the CPU by giving it the GPU's weight dtype: the base stays frozen in
    half precision (its norms float32), only the float32 adapter trains, and the losses stay close to the float32
    run's."""
    monkeypatch.setattr(train, "base_weight_dtype", lambda precision, device: weights)
    built = []
    real_build = train.build_lora_model

    def build(model, *args, **kwargs):
        built.extend((name, p, p.detach().clone()) for name, p in model.named_parameters())  # the base alone
        return real_build(model, *args, **kwargs)

    monkeypatch.setattr(train, "build_lora_model", build)
    cfg = TrainConfig(**run_settings(tmp_path, small_data, precision=precision))
    train.run(cfg, train.DistEnv())

    assert built and all(not p.requires_grad and torch.equal(p, before) for _, p, before in built)
    assert {(name, p.dtype) for name, p, _ in built} == {
        (name, torch.float32 if "layernorm" in name or name.endswith(("ln_f.weight", "ln_f.bias")) else weights)
        for name, _, _ in built}
    reference, rows = step_rows(runs["fp32"]), step_rows(Path(cfg.output_dir))
    assert len(rows) == len(reference) == 5 and rows[-1]["skipped_steps"] == 0  # fp16; bf16 has no GradScaler
    for row, ref in zip(rows, reference):
        assert abs(row["loss"] - ref["loss"]) <= 0.01 * ref["loss"]
    saved = adapter_tensors(Path(cfg.output_dir))
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in saved.items())


@pytest.mark.slow  # whole training runs in half precision (slow on a CPU without AVX512-BF16/FP16)
@pytest.mark.parametrize("name", ["fp32", "mix", "fp16"])
def test_saved_adapters_are_float32_whatever_the_precision(runs, name):
    saved = adapter_tensors(runs[name])
    assert saved and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in saved.values())
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in saved.items())


# --- non-finite values ----------------------------------------------------------------------------------------------

@pytest.mark.slow  # whole training runs in half precision (slow on a CPU without AVX512-BF16/FP16)
def test_nan_loss_without_a_scaler_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, small_data,
                                                                                     monkeypatch, capsys):
    """bf16 (MIX_PREC_TRAIN on the CPU) has no GradScaler: a NaN loss at step 3 must end the run, exit code 1."""
    calls = []
    real_loss = train.Trainer.batch_loss

    def nan_at_step_3(self, model, batch):
        # One call for try_longest_batch, then one per optimizer step (no accumulation, evaluation only at the end).
        calls.append(1)
        loss = real_loss(self, model, batch)
        return loss * float("nan") if len(calls) == 1 + 3 else loss

    monkeypatch.setattr(train.Trainer, "batch_loss", nan_at_step_3)
    settings = run_settings(tmp_path, small_data, save_steps=2, mix_prec_train="true")
    set_env(monkeypatch, settings)
    assert train.main([]) == 1

    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    out = Path(settings["output_dir"])
    # This machine's own answer: the banner warns of emulated bf16 exactly where the CPU lacks AVX512-BF16 and AMX.
    assert ("warning      bf16 on this CPU is emulated" in captured.out) == precision.cpu_emulates_bf16()
    assert err_lines == [f"error: loss is nan at step 3 with bf16; stopping before the update; the last complete "
                         f"checkpoint is {out / 'checkpoint-2'}; try a lower LEARNING_RATE or PRECISION=fp32"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "metrics.jsonl", "run.lock"]  # no final adapter
    kept = adapter_tensors(out / "checkpoint-2")
    assert all(torch.isfinite(t).all() for t in kept.values())
    state = torch.load(out / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    assert [row["step"] for row in step_rows(out)] == [1, 2]


def inf_gradient_at_step(monkeypatch, step: int) -> None:
    """Make one LoRA gradient infinite in the backward pass of optimizer step `step` (no accumulation)."""
    real_build = train.build_lora_model
    backwards = []

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        first_b = next(p for n, p in model.named_parameters() if "lora_B" in n)

        def hook(grad):
            backwards.append(1)  # the first backward pass is try_longest_batch's, before step 1
            return grad * float("inf") if len(backwards) == 1 + step else grad

        first_b.register_hook(hook)
        return model

    monkeypatch.setattr(train, "build_lora_model", build)


@pytest.mark.slow  # whole training runs in half precision (slow on a CPU without AVX512-BF16/FP16)
def test_inf_gradient_without_a_scaler_stops_before_the_update(tmp_path, small_data, monkeypatch, capsys):
    inf_gradient_at_step(monkeypatch, 2)
    settings = run_settings(tmp_path, small_data, save_steps=1, precision="bf16")
    set_env(monkeypatch, settings)
    assert train.main([]) == 1
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and err_lines[0].startswith("error: gradient norm is inf at step 2 with bf16")
    out = Path(settings["output_dir"])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "metrics.jsonl", "run.lock"]
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out / "checkpoint-1").values())


@pytest.mark.slow  # whole training runs in half precision (slow on a CPU without AVX512-BF16/FP16)
def test_fp16_inf_gradient_is_skipped_counted_and_shown(tmp_path, small_data, monkeypatch, capsys):
    inf_gradient_at_step(monkeypatch, 2)
    settings = run_settings(tmp_path, small_data, save_steps=1, max_steps=4, precision="fp16")
    set_env(monkeypatch, settings)
    assert train.main([]) == 0
    out = Path(settings["output_dir"])
    rows = step_rows(out)
    assert [row["skipped_steps"] for row in rows] == [0, 1, 1, 1]
    assert math.isinf(rows[1]["grad_norm"]) and all(math.isfinite(r["grad_norm"]) for r in rows[2:])
    # The skipped step left the adapter as it was; the others changed it.
    one, two, three = (adapter_tensors(out / f"checkpoint-{k}") for k in (1, 2, 3))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(two[k], three[k]) for k in two)
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out).values())
    scaler_state = torch.load(out / "checkpoint-4" / "trainer_state.pt", weights_only=True)["scaler"]
    assert scaler_state["scale"] == 65536.0 / 2  # backed off once
    captured = capsys.readouterr()
    assert "adapter saved to" in captured.out and "1 of 4 fp16 steps skipped by the GradScaler" in captured.out
    assert "skipped=1" in captured.err  # the progress bar's postfix


# --- the benchmark --------------------------------------------------------------------------------------------------

TOY_SHAPE = ["--hidden", "64", "--layers", "1", "--heads", "4", "--vocab", "256", "--seq", "32", "--threads", "1"]


def load_bench_precision():
    spec = importlib.util.spec_from_file_location("bench_precision", REPO / "bench" / "bench_precision.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow  # the benchmark end to end
def test_bench_precision_runs_and_writes_its_table(tmp_path, capsys):
    """bench/bench_precision.py end to end on a toy shape (the real run takes minutes): every variant timed and its
    loss checked against fp32, the table written with its command on top; memory measured in a fresh process."""
    bench = load_bench_precision()
    out = tmp_path / "precision.md"
    argv = [*TOY_SHAPE, "--repeats", "1", "--warmup", "0", "--variants",
            "fp32,bf16 autocast,fp16 autocast,fp32 + checkpointing", "--out", str(out)]
    bench.main([*argv, "--no-memory"])
    table = out.read_text()
    assert table.strip() in capsys.readouterr().out  # printed as written
    assert table.splitlines()[2].startswith("Reproduce: `python bench/bench_precision.py --hidden 64 ")
    assert "'fp32,bf16 autocast,fp16 autocast,fp32 + checkpointing'" in table.splitlines()[2]  # quoted for the shell
    rows = [line for line in table.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| fp32", "| bf16 autocast", "| fp16 autocast",
                                                     "| fp32 + checkpointing"]
    assert all(abs(float(row.split(" | ")[6])) < 0.02 for row in rows)  # loss vs fp32
    saved = {row.split(" | ")[0]: float(row.split(" | ")[7].replace(",", "")) for row in rows}
    assert 0 < saved["| fp32 + checkpointing"] < saved["| fp32"] / 2  # activations recomputed, not kept
    assert not list(tmp_path.glob("*.tmp"))

    from bench.common import memory_in_fresh_process

    memory = memory_in_fresh_process(bench.__file__, argv, "fp16 autocast")
    assert memory["method"] in ("vmhwm", "ru_maxrss") and memory["peak"] > 100 * 2**20


@pytest.mark.slow  # the benchmark end to end
@pytest.mark.parametrize("runs_out_in", ["building", "stepping"])
def test_bench_precision_times_model_by_model_when_the_models_do_not_fit_together(tmp_path, monkeypatch, capsys,
                                                                                  runs_out_in):
    """As BLOOM-1b7's shape on a 16 GB T4: the variants' two models do not fit in memory together, either at once
    (building the second while the first is alive runs out of memory) or once a step's activations come on top.
    The benchmark must free every model of its first try and time each model's variants in turn: every variant
    still gets its row, and the table says how it was timed."""
    bench = load_bench_precision()
    real_build, real_interleave, built = bench.build_base, bench.interleave, []
    room = 1 if runs_out_in == "building" else 2  # models that fit at once

    def build_where_there_is_room(args, device, dtype):
        if sum(model() is not None for model in built) >= room:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        model = real_build(args, device, dtype)
        built.append(weakref.ref(model))
        return model

    def interleave_one_model_at_most(steps, *args, **kwargs):
        if len(bench.model_groups(list(steps))) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated: activations)")
        return real_interleave(steps, *args, **kwargs)

    monkeypatch.setattr(bench, "build_base", build_where_there_is_room)
    monkeypatch.setattr(bench, "interleave", interleave_one_model_at_most)
    out = tmp_path / "precision.md"
    bench.main([*TOY_SHAPE, "--repeats", "2", "--warmup", "0", "--variants", "fp32,bf16 autocast,fp32 + checkpointing",
                "--no-memory", "--out", str(out)])
    table = out.read_text()
    assert "one model at a time" in capsys.readouterr().err
    assert len(built) == {"building": 3, "stepping": 4}[runs_out_in]  # the first try's models, then one per group
    assert "did not fit in memory together" in table
    rows = {line.split(" | ")[0]: line.split(" | ") for line in table.splitlines()
            if line.startswith("| ") and "variant" not in line}
    assert list(rows) == ["| fp32", "| bf16 autocast", "| fp32 + checkpointing"]
    assert all(abs(float(row[6])) < 0.02 for row in rows.values())  # loss vs fp32, across the two models
    assert float(rows["| fp32 + checkpointing"][6]) == 0.0  # the same weights and adapter, recomputed activations


def test_bench_precision_out_of_memory_with_one_model_is_one_line(tmp_path, monkeypatch):
    bench = load_bench_precision()

    def build_nothing(args, device, dtype):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench, "build_base", build_nothing)
    with pytest.raises(SystemExit, match=r"^error: out of memory on cpu even with one model at a time, at batch "
                                         r"4 x 32: try a smaller --batch or --seq$"):
        bench.main([*TOY_SHAPE, "--variants", "fp32", "--no-memory", "--out", str(tmp_path / "precision.md")])
    assert not list(tmp_path.iterdir())  # no table written


def test_bench_precision_with_no_variant_that_can_run_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: none of --variants can run on cpu: fp16 weights: train.py keeps "
                                         r"float32 base weights for fp16 on a CPU$"):
        load_bench_precision().main([*TOY_SHAPE, "--variants", "fp16 weights", "--out", str(tmp_path / "p.md")])
    assert not list(tmp_path.iterdir())


def test_bench_device_that_is_not_there_is_one_line(tmp_path, monkeypatch):
    from bench.common import parse_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"^error: --device 'cuda': torch sees no CUDA GPU here \(torch .+\)$"):
        load_bench_precision().main([*TOY_SHAPE, "--device", "cuda", "--out", str(tmp_path / "p.md")])
    with pytest.raises(SystemExit, match=r"^error: --device 'gpu' is not a device \(cpu, cuda, cuda:1, \.\.\.\)$"):
        parse_device("gpu")
    assert parse_device("cpu") == torch.device("cpu")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # a whole train.main run
def test_out_of_memory_is_one_line_with_what_to_change(tmp_path, small_data, monkeypatch, capsys):
    """A (CUDA) out-of-memory error in step 2 ends the run with one line that names the settings to change and the
    last complete checkpoint, exit 1, no traceback."""
    real_step = train.Trainer.optimizer_step

    def step_that_runs_out_of_memory(self, micro_batches):
        if self.progress.step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.96 GiB")
        return real_step(self, micro_batches)

    monkeypatch.setattr(train.Trainer, "optimizer_step", step_that_runs_out_of_memory)
    settings = run_settings(tmp_path, small_data, save_steps=1)
    set_env(monkeypatch, settings)
    assert train.main([]) == 1
    err = capsys.readouterr().err
    err_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and "Traceback" not in err
    assert err_lines[0].startswith(f"error: out of memory with BATCH_SIZE={settings['batch_size']} x MAX_LENGTH=")
    assert "GRAD_ACCUM_STEPS" in err_lines[0] and "GRADIENT_CHECKPOINTING=true" in err_lines[0]
    assert f"the last complete checkpoint is {Path(settings['output_dir']) / 'checkpoint-1'} (RESUME_FROM=latest " \
           "continues from it with GRADIENT_CHECKPOINTING=true or MIX_PREC_TRAIN=true;" in err_lines[0]

    # What the message promises: GRADIENT_CHECKPOINTING=true resumes from that checkpoint; a new BATCH_SIZE does not.
    monkeypatch.setattr(train.Trainer, "optimizer_step", real_step)
    set_env(monkeypatch, {**settings, "resume_from": "latest", "gradient_checkpointing": True})
    assert train.main([]) == 0
    assert re.search(r"resumed\s+from \S*checkpoint-1: step 1", capsys.readouterr().out)
    set_env(monkeypatch, {**settings, "resume_from": str(Path(settings["output_dir"]) / "checkpoint-1"),
                          "batch_size": settings["batch_size"] * 2})
    assert train.main([]) == 1
    assert "BATCH_SIZE" in capsys.readouterr().err


@pytest.mark.slow  # two whole train.main runs
def test_a_batch_shape_that_does_not_fit_fails_before_the_first_step(tmp_path, small_data, monkeypatch, capsys):
    """A stand-in for a GPU that holds the short batches but not the longest: a training forward pass at the longest
    example's length raises torch.OutOfMemoryError. The run fails at its very first training forward pass
    (try_longest_batch), with the one-line advice, before any step is logged or checkpointed, instead of whenever
    the data loader first draws that example."""
    settings = run_settings(tmp_path, small_data, save_steps=1, max_length=512)
    cfg = TrainConfig(**settings)
    train_set, _, _ = train.prepare_datasets(cfg, train.load_tokenizer(cfg.model_path))
    too_long = max(train_set["length"])
    assert sorted(train_set["length"])[-2] < too_long  # one example alone does not fit
    training_forwards = []
    real_forward = BloomModel.forward  # the body every training forward pass runs, the logits path or not

    def forward_short_of_memory(self, *args, **kwargs):
        if torch.is_grad_enabled():
            training_forwards.append(kwargs["input_ids"].shape[1])
            if kwargs["input_ids"].shape[1] >= too_long:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.96 GiB")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(BloomModel, "forward", forward_short_of_memory)
    set_env(monkeypatch, settings)
    assert train.main([]) == 1
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: out of memory with BATCH_SIZE={settings['batch_size']} x MAX_LENGTH={settings['max_length']}: "
        "halve BATCH_SIZE and double GRAD_ACCUM_STEPS (the same optimizer step), set GRADIENT_CHECKPOINTING=true, "
        "or lower MAX_LENGTH; there is no complete checkpoint yet"]
    padded = math.ceil(too_long / 8) * 8  # every batch is padded to a multiple of 8
    assert training_forwards == [padded]
    assert not Path(settings["output_dir"]).exists() or not any(Path(settings["output_dir"]).iterdir())

    # The same data on a GPU that holds every batch: the longest batch is tried, then the run trains.
    monkeypatch.setattr(BloomModel, "forward", real_forward)
    assert train.main([]) == 0
    assert f"memory       longest batch {settings['batch_size']} x {padded} tokens" in capsys.readouterr().out


def test_make_random_bloom_writes_a_model_folder_train_py_loads(tmp_path, monkeypatch):
    """bench/make_random_bloom.py (shrunk here: BLOOM-1b7's real layers take 7 GB on a CPU) writes a folder that
    train.py loads like a downloaded model: BLOOM's vocabulary size, float16 weights, the tiny tokenizer with BLOOM's
    special-token ids; nothing half-written; an existing folder, or a tokenizer folder without a tokenizer, refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_random_bloom", REPO / "bench" / "make_random_bloom.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    monkeypatch.setitem(maker.BLOOM_1B7, "hidden_size", 32)
    monkeypatch.setitem(maker.BLOOM_1B7, "n_layer", 1)
    monkeypatch.setitem(maker.BLOOM_1B7, "n_head", 4)
    out = tmp_path / "bloom-random"
    maker.main(["--out", str(out)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bloom-random"]  # no staging folder left
    tokenizer = train.load_tokenizer(str(out))
    model = train.load_pretrained_model(str(out), torch.device("cpu"), torch.float32)
    assert model.config.vocab_size == 250880 and model.config.n_layer == 1
    assert load_file(out / "model.safetensors")["transformer.word_embeddings.weight"].dtype == torch.float16
    ids = tokenizer("Give three tips for staying healthy.")["input_ids"]
    assert max(ids) < 4096 and tokenizer.pad_token_id == model.config.pad_token_id == 3
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), 250880)
    with pytest.raises(SystemExit):
        maker.main(["--out", str(out)])
    with pytest.raises(SystemExit):  # checked before any weight is built
        maker.main(["--out", str(tmp_path / "other"), "--tokenizer", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bloom-random"]


@pytest.mark.parametrize("device, native_bf16, half", [("cpu", False, "bf16"), ("cuda", True, "bf16"),
                                                       ("cuda", False, "fp16")])
def test_one_resolver_for_training_and_inference_only_mixed_decides_auto(fake_gpu, device, native_bf16, half):
    """Training and inference pick with the same rule: unset or "auto" is the hardware's half precision when mixed
    precision is asked for (MIX_PREC_TRAIN=true; inference on a GPU), fp32 otherwise; a name is kept as it is."""
    fake_gpu(native_bf16)
    device = torch.device(device)
    for unset in (None, "", "auto"):
        assert precision.resolve_precision(unset, device, mixed=True) == half
        assert precision.resolve_precision(unset, device, mixed=False) == "fp32"
    for name in precision.INFERENCE_PRECISIONS[1:]:
        assert precision.resolve_precision(name, device, mixed=False) == name
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16, 8bit, 4bit, got 'fp8'"):
        precision.resolve_precision("fp8", device, mixed=True)
    assert set(precision.PRECISIONS) == set(precision.DTYPES) and precision.autocast_dtype("fp32") is None


@pytest.mark.parametrize("avx512_bf16, amx", [(False, False), (True, False), (False, True)])
def test_bf16_on_a_cpu_that_emulates_it_gets_a_banner_warning(monkeypatch, avx512_bf16, amx):
    """Without AVX512-BF16 and AMX torch runs bf16 matmuls in software: MIX_PREC_TRAIN's bf16 and QUANTIZE's
    bf16 layers are then several times slower than fp32, and the banner says so; with either, nothing."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    emulated = not (avx512_bf16 or amx)
    assert precision.cpu_emulates_bf16() == emulated
    warning = precision.emulated_bf16_warning
    bf16, quantized = warning("bf16", "", cpu), warning("fp32", "4bit", cpu)
    assert (bf16 is not None, quantized is not None) == (emulated, emulated)
    if emulated:
        assert bf16.startswith("bf16 on this CPU is emulated") and bf16.endswith("PRECISION=fp32 trains faster here")
        assert quantized.startswith("QUANTIZE=4bit on this CPU computes its 16-bit layers in bf16")
    assert warning("fp32", "", cpu) is warning("fp16", "", cpu) is warning("bf16", "", cuda) is None


def test_a_torch_without_the_cpu_feature_checks_is_assumed_to_have_bf16(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert not precision.cpu_emulates_bf16()
    assert precision.emulated_bf16_warning("bf16", "", torch.device("cpu")) is None
