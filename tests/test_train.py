"""train.py end to end on the shipped tiny BLOOM: configuration, bad input, gradient accumulation, determinism,
checkpoints and the offline quick start.

Numeric claims are checked against independent computations: the accumulated gradient against one plain
full-batch backward written out here, and the saved adapter against PEFT's loader.
"""

import json
import math
import os
import re
import shlex
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import train
from conftest import FIELDS, REPO, SAMPLE, TINY_BLOOM, adapter_tensors, metric_rows, tiny_settings, user_command
from support import checkpoint, distributed, model_loading, token_loss
from support.alpaca_data import IGNORE_INDEX
from support.checkpoint import checkpoint_dirs
from support.config import TrainConfig


@pytest.fixture(scope="module")
def records():
    return json.loads(SAMPLE.read_text(encoding="utf-8"))


def tiny_config(tmp_path: Path, data: Path, **overrides) -> TrainConfig:
    """conftest's tiny_settings as a TrainConfig."""
    return TrainConfig(**tiny_settings(tmp_path, data, **overrides))


def max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in a)


# --- bad input: one line, exit 1, nothing written -----------------------------------------------------------------

BAD_FILES = {
    "truncated.json": b'[{"instruction": "a", "input": "", "output": "b"}',
    "not_list.json": b'{"instruction": "a"}',
    "missing_output.json": b'[{"instruction": "a", "input": ""}]',
    "int_output.json": b'[{"instruction": "a", "input": "", "output": 3}]',
    "empty.json": b"[]",
    "latin1.json": '[{"instruction": "caf\u00e9", "input": "", "output": "b"}]'.encode("latin-1"),
}


@pytest.mark.parametrize("env", [
    *({"DATA_PATH": name} for name in BAD_FILES),
    {"DATA_PATH": "does_not_exist.json"},
    {"MODEL_PATH": "./no/such/model"},
    {"BATCH_SIZE": "abc"},
    {"GROUP_BY_LENGTH": "sometimes"},
    {"DDP": "true"},
], ids=lambda env: "-".join(f"{k}={v}" for k, v in env.items()))
def test_bad_input_is_one_line_exit_1_and_writes_nothing(tmp_path, monkeypatch, capsys, env):
    for name, content in BAD_FILES.items():
        (tmp_path / name).write_bytes(content)
    monkeypatch.chdir(tmp_path)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODEL_PATH", str(TINY_BLOOM))
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    assert train.main([]) == 1
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1, err_lines
    assert next(iter(env)) in err_lines[0] or Path(next(iter(env.values()))).name in err_lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # train.py in a process of its own
def test_cli_error_has_no_traceback(tmp_path):
    env = {**os.environ, "BATCH_SIZE": "abc", "OUTPUT_DIR": str(tmp_path / "out")}
    result = subprocess.run([sys.executable, "train.py"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: BATCH_SIZE must be an integer, got 'abc'"
    assert not (tmp_path / "out").exists()


LONG_PROMPTS = [{"instruction": " ".join(["word"] * 900), "input": "", "output": "An answer."}] * 12


def test_a_file_whose_every_answer_is_cut_away_is_refused_naming_max_length(tmp_path, monkeypatch, capsys):
    """The defaults (TRAIN_ON_INPUTS=true, MAX_LENGTH=512): prompts of 900 words would train on the prompt alone."""
    (tmp_path / "long.json").write_text(json.dumps(LONG_PROMPTS), encoding="utf-8")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MAX_LENGTH", "TRAIN_ON_INPUTS"):
        monkeypatch.delenv(var, raising=False)
    for key, value in {"MODEL_PATH": str(TINY_BLOOM), "DATA_PATH": str(tmp_path / "long.json"),
                       "OUTPUT_DIR": str(tmp_path / "out"), "CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    assert train.main([]) == 1
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")] == [
        f"error: {tmp_path / 'long.json'}: no example keeps a response token within MAX_LENGTH=512 tokens: every "
        "prompt is at least that long; raise MAX_LENGTH or shorten the prompts"]
    assert not (tmp_path / "out").exists()


def test_a_local_looking_model_path_that_does_not_exist_fails_before_any_hub_call(monkeypatch):
    """`MODEL_PATH=models/tiny-blom` (a typo): "models" is a folder here, so it is a path, not a hub id, and fails at
    once naming it, without the minute of hub retries."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(model_loading, "hub_unreachable", lambda: pytest.fail("the hub was asked"))
    for auto in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", lambda *a, **k: pytest.fail("transformers was asked"))
    for load in (model_loading.load_tokenizer, model_loading.default_target_modules,
                 lambda path, name: model_loading.load_base_model(path, torch.device("cpu"), name=name)):
        with pytest.raises(FileNotFoundError) as e:
            load("models/tiny-blom", name="MODEL_PATH")
        assert str(e.value) == ("MODEL_PATH='models/tiny-blom': no such model folder (did you mean "
                                "models/tiny-bloom?); pass a local model folder or a hub id such as "
                                "'bigscience/bloom-1b7'")
    assert not model_loading.looks_like_missing_folder("bigscience/bloom-1b7")  # no folder "bigscience" here


def test_an_unreachable_hub_fails_at_once_with_the_offline_hint(monkeypatch):
    """No network and no HF_HUB_OFFLINE: one short look at the hub, then only the download cache (huggingface_hub
    would retry each file five times, about a minute). Name resolution is counted."""
    import huggingface_hub.constants
    import socket

    resolved = []

    def no_dns(host, *args, **kwargs):
        resolved.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    model_loading.hub_unreachable.cache_clear()
    try:
        with pytest.raises(FileNotFoundError) as e:
            model_loading.load_tokenizer("bigscience/no-such-model", name="MODEL_PATH")
    finally:
        model_loading.hub_unreachable.cache_clear()
    assert str(e.value) == ("MODEL_PATH='bigscience/no-such-model': not a local folder, not downloaded yet, and the "
                            "hub cannot be reached (cannot resolve huggingface.co); connect to the internet to "
                            "download it once, or point it at a local model folder such as models/tiny-bloom "
                            "(HF_HUB_OFFLINE=1 skips the hub)")
    # Ours, and huggingface_hub's one request for its agent registry (no retries); a file's download retries would
    # resolve the host six times.
    assert resolved[0] == "huggingface.co" and len(resolved) <= 2, resolved


@pytest.mark.slow  # train.py in a process of its own
def test_a_model_path_typo_without_hf_hub_offline_is_one_line(tmp_path):
    """The issue's case as typed: `MODEL_PATH=models/tiny-blom python train.py`, HF_HUB_OFFLINE unset."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in FIELDS and k != "HF_HUB_OFFLINE"}
    result = subprocess.run([sys.executable, "train.py"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**env, "MODEL_PATH": "models/tiny-blom", "OUTPUT_DIR": str(tmp_path / "out")})
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: MODEL_PATH='models/tiny-blom': no such model folder (did you mean "
                                     "models/tiny-bloom?); pass a local model folder or a hub id such as "
                                     "'bigscience/bloom-1b7'")


def test_the_summary_says_what_ran_and_its_command_survives_a_shell(tmp_path, small_data, capsys, monkeypatch):
    """An OUTPUT_DIR with a space: the printed command, parsed by a real shell, hands inference.py the folder as one
    argument. One step is "1 step"; a misspelled setting in the environment gets a line naming the real one."""
    monkeypatch.setenv("LORA_RANK", "16")
    cfg = tiny_config(tmp_path, small_data, output_dir=str(tmp_path / "my runs" / "it's one"), max_steps=1)
    train.run(cfg, train.DistEnv())
    printed = capsys.readouterr().out.splitlines()
    assert "warning: LORA_RANK is not a setting of train.py and is ignored; did you mean LORA_R?" in printed
    assert re.fullmatch(r"done         1 step in 0 min \d+ s; eval loss .*", next(line for line in printed
                                                                               if line.startswith("done")))
    command = printed[-1]
    shell = subprocess.run(["sh", "-c", command.replace("python ", "printf '%s\\n' ", 1)], capture_output=True,
                           text=True, check=True)
    assert shell.stdout.splitlines() == ["inference.py", "--lora-weights", cfg.output_dir, "--instruction",
                                         "Give three tips for staying healthy."]


@pytest.mark.slow  # inference.py in a process of its own
def test_the_printed_try_it_command_runs_in_a_shell_for_a_folder_with_a_space(tmp_path, small_data, capsys):
    cfg = tiny_config(tmp_path, small_data, output_dir=str(tmp_path / "my runs" / "out 1"), max_steps=1)
    train.run(cfg, train.DistEnv())
    command = capsys.readouterr().out.splitlines()[-1]
    assert command.startswith("python inference.py --lora-weights ")
    # This interpreter for `python`, and a short answer; the rest exactly as printed, parsed by sh.
    result = subprocess.run(["sh", "-c", f"{shlex.quote(sys.executable)}{command[len('python'):]} --max-new-tokens 4"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"+ adapter {cfg.output_dir} (merged)" in result.stderr and result.stdout.strip()


def test_the_banner_counts_the_examples_that_lost_their_answer(tmp_path, records, capsys):
    """Some prompts fill MAX_LENGTH=96, others leave room for their answer: the banner says how many lost it,
    counted here with the tokenizer and the template."""
    from prompter import Prompter

    tokenizer = train.load_tokenizer(str(TINY_BLOOM))
    prompts = [Prompter().generate_prompt(r["instruction"], r["input"]) for r in records[:48] if r["output"].strip()]
    cut = sum(len(tokenizer(p)["input_ids"]) >= 96 for p in prompts)
    assert 0 < cut < len(prompts)
    (tmp_path / "data.json").write_text(json.dumps(records[:48]), encoding="utf-8")
    train.run(tiny_config(tmp_path, tmp_path / "data.json", max_length=96, max_steps=1), train.DistEnv())
    assert (f"warning      {cut} of {len(prompts)} examples lost their whole answer to MAX_LENGTH=96 (the prompt "
            "alone fills it) and train on the prompt only") in capsys.readouterr().out


def test_files_are_written_with_the_users_umask(tmp_path, small_data):
    """safetensors writes its files 0600; everything a run writes gets what the umask gives (here 027: 0640), so
    another user of a shared machine can read the adapter where the umask lets them read its config."""
    previous = os.umask(0o027)
    try:
        train.run(tiny_config(tmp_path, small_data, max_steps=1), train.DistEnv())
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert {"adapter_model.safetensors", "adapter_config.json", "checkpoint-1/adapter_model.safetensors",
            "checkpoint-1/trainer_state.pt"} <= modes.keys()
    assert set(modes.values()) == {0o640}, modes


# --- the numbers ----------------------------------------------------------------------------------------------------

def tiny_trainer(cfg: TrainConfig) -> train.Trainer:
    """A float32, one-process Trainer on the tiny BLOOM, built as train.run builds one."""
    dist = train.DistEnv()
    train.seed_everything(cfg.seed)
    tokenizer = train.load_tokenizer(cfg.model_path)
    train_set, valid_set, _ = train.prepare_datasets(cfg, tokenizer)
    model = train.build_lora_model(train.load_pretrained_model(cfg.model_path, dist.device, torch.float32), cfg,
                                   cfg.model_path)
    return train.Trainer(cfg, dist, model, tokenizer, train_set, valid_set, "fp32")


def captured_step_gradients(cfg: TrainConfig) -> tuple:
    """Run one optimizer step through the Trainer and return the gradients the optimizer was given."""
    trainer = tiny_trainer(cfg)
    model = trainer.raw_model
    with torch.no_grad():  # B away from zero, so that A's gradient is not trivially zero
        generator = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    initial_adapter = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    grads = []
    # A step pre-hook sees the gradients the optimizer is about to use (replacing optimizer.step instead would make
    # the LR scheduler warn that the step was overridden).
    trainer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: grads.extend(
        p.grad.detach().clone() for p in trainer.trainable_parameters()))
    trainer.train_loader.sampler.set_epoch(0)
    micro_batches = [b for _, b in zip(range(cfg.grad_accum_steps), trainer.train_loader)]
    trainer.optimizer_step(micro_batches)
    model.load_adapter_weights(initial_adapter)  # back to the weights the gradients were taken at
    return grads, trainer, model, micro_batches


@pytest.mark.slow  # whole training runs
def test_gradient_accumulation_equals_one_big_batch_and_a_plain_reference(tmp_path, small_data):
    accumulated, *_ = captured_step_gradients(
        tiny_config(tmp_path / "a", small_data, batch_size=2, grad_accum_steps=4, max_grad_norm=0))
    big, trainer, model, batches = captured_step_gradients(
        tiny_config(tmp_path / "b", small_data, batch_size=8, grad_accum_steps=1, max_grad_norm=0))
    assert len(accumulated) == len(big) > 0
    for a, b in zip(accumulated, big):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()

    # Independent reference, with nothing from train.py: each example alone (no padding at all), its summed
    # next-token loss; the sum over the 8 examples divided by their label-token count, one backward.
    model.zero_grad(set_to_none=True)
    batch = batches[0]
    total, tokens = 0.0, 0
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        ids, labels = ids[mask == 1][None], labels[mask == 1][None]
        logits = model(input_ids=ids).logits
        total = total + torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX,
                                                          reduction="sum")
        tokens += int((labels[0, 1:] != IGNORE_INDEX).sum())
    (total / tokens).backward()
    for reference, b in zip((p.grad for p in trainer.trainable_parameters()), big):
        assert (reference - b).abs().max() <= 1e-5 * b.abs().max()


def test_each_micro_batch_frees_its_logits_before_the_next_forward_pass(tmp_path, small_data, monkeypatch):
    """With gradient accumulation (and in evaluation), a micro-batch's logits, 1 GiB at BLOOM's 250,880-token
    vocabulary for 4 x 512 tokens in half precision, are freed before the next forward pass starts: a step's peak
    memory is then one micro-batch's, the one try_longest_batch measures. This is the logits path, which models
    other than the plain ones take (the test below: those never hold the logits whole)."""
    monkeypatch.setattr(token_loss, "PLAIN_OUTPUT_LAYER_MODEL_TYPES", frozenset())
    trainer = tiny_trainer(tiny_config(tmp_path, small_data, grad_accum_steps=3))
    model = trainer.raw_model
    earlier_logits, alive_at_forward = [], []
    model.model.register_forward_pre_hook(
        lambda *_: alive_at_forward.append(sum(ref() is not None for ref in earlier_logits)))
    model.model.register_forward_hook(lambda module, args, output: earlier_logits.append(weakref.ref(output.logits)))
    trainer.train_loader.sampler.set_epoch(0)
    trainer.optimizer_step([b for _, b in zip(range(3), trainer.train_loader)])
    assert alive_at_forward == [0, 0, 0]
    earlier_logits.clear(), alive_at_forward.clear()
    trainer.evaluate()  # 8 validation examples: 2 batches of 4
    assert alive_at_forward == [0, 0]


def test_a_step_and_an_evaluation_never_hold_the_whole_logits(tmp_path, small_data, monkeypatch):
    """BLOOM's path (token_loss.sum_linear_token_loss): no operation of a training step or an evaluation makes a
    tensor of a micro-batch's logits' size, only blocks of a few rows; the loss is the logits path's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in (t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)):
                LargestOutput.largest = max(LargestOutput.largest, tensor.numel())
            return out

    monkeypatch.setattr(token_loss, "CHUNK_ELEMENTS", 16 * 4096)  # 16 rows of the tiny BLOOM's vocabulary
    trainer = tiny_trainer(tiny_config(tmp_path, small_data, grad_accum_steps=2))
    trainer.train_loader.sampler.set_epoch(0)
    batches = [b for _, b in zip(range(2), trainer.train_loader)]
    logits_size = min(b["input_ids"].numel() for b in batches) * trainer.raw_model.config.vocab_size
    with LargestOutput():
        trainer.optimizer_step(batches)
        trainer.evaluate()
    assert 16 * 4096 <= LargestOutput.largest < logits_size / 2

    trainer.raw_model.eval()  # no dropout: the same function twice
    fused_loss = sum(trainer.batch_loss(trainer.raw_model, b) for b in batches)
    monkeypatch.setattr(token_loss, "PLAIN_OUTPUT_LAYER_MODEL_TYPES", frozenset())
    logits_loss = sum(trainer.batch_loss(trainer.raw_model, b) for b in batches)
    assert abs(fused_loss.item() - logits_loss.item()) <= 1e-5 * logits_loss.item()


def test_a_mean_of_micro_batch_means_would_fail_that_check(tmp_path, small_data):
    """The equivalence above is not vacuous: weighting micro-batches equally gives another gradient."""
    grads, trainer, model, batches = captured_step_gradients(
        tiny_config(tmp_path, small_data, batch_size=2, grad_accum_steps=4, max_grad_norm=0))
    model.zero_grad(set_to_none=True)
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mean = token_loss.sum_token_loss(logits, train.next_token_labels(batch)) / train.count_label_tokens(batch)
        (mean / len(batches)).backward()
    diffs = [((p.grad - g).abs().max() / g.abs().max()).item() for p, g in zip(trainer.trainable_parameters(), grads)]
    assert max(diffs) > 1e-3


@pytest.mark.slow  # three whole training runs
def test_same_seed_gives_the_same_adapter_and_training_changes_it(tmp_path, small_data):
    first = tiny_config(tmp_path / "1", small_data, lora_dropout=0.05)
    second = tiny_config(tmp_path / "2", small_data, lora_dropout=0.05)
    other_seed = tiny_config(tmp_path / "3", small_data, lora_dropout=0.05, seed=7)
    for cfg in (first, second, other_seed):
        train.run(cfg, train.DistEnv())
    a, b, c = (adapter_tensors(Path(cfg.output_dir)) for cfg in (first, second, other_seed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)  # B left zero-init: it trained


@pytest.mark.slow  # whole training runs
def test_gradient_checkpointing_recomputes_and_trains_the_same_adapter(tmp_path, small_data, monkeypatch):
    """GRADIENT_CHECKPOINTING=true runs every adapted layer's forward twice per micro-batch (once more in the
    backward pass, which is the memory saving), and, with dropout on, trains the adapter the plain run trains:
    the recomputation replays the same dropout masks."""
    forward_calls = []
    build = train.build_lora_model

    def counting_build(*args, **kwargs):
        lora_model = build(*args, **kwargs)
        for _, layer in lora_model.lora_layers():
            layer.register_forward_hook(lambda *_: forward_calls.append(torch.is_grad_enabled()))
        return lora_model

    monkeypatch.setattr(train, "build_lora_model", counting_build)
    runs = {}
    for checkpointing in (False, True):
        cfg = tiny_config(tmp_path / str(checkpointing), small_data, lora_dropout=0.05, max_steps=2,
                          gradient_checkpointing=checkpointing)
        forward_calls.clear()
        train.run(cfg, train.DistEnv())
        runs[checkpointing] = (adapter_tensors(Path(cfg.output_dir)), len(forward_calls))
    (plain, plain_calls), (checkpointed, checkpointed_calls) = runs[False], runs[True]
    # The tiny BLOOM's query_key_value layers; 2 steps x 1 micro-batch, and try_longest_batch's pass before them.
    layers, micro_batches = 4, 3
    eval_calls = plain_calls - layers * micro_batches
    assert checkpointed_calls - eval_calls == 2 * layers * micro_batches
    assert max_rel_diff(checkpointed, plain) <= 1e-6
    assert any(k.endswith("lora_B.weight") and plain[k].abs().max() > 0 for k in plain)


def test_older_libraries_get_the_old_option_names(monkeypatch):
    """A notebook's preinstalled transformers / torch may predate the renames train.py uses (transformers 5.23:
    activation_checkpointing_enable; torch 2.13: DDP's forward_sync_buffers): then the old names are used."""
    class OlderModel:  # transformers before 5.23
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.enabled_with = gradient_checkpointing_kwargs

    model = OlderModel()
    model_loading.enable_activation_checkpointing(model, {"use_reentrant": False})
    assert model.enabled_with == {"use_reentrant": False}

    assert distributed.no_buffer_sync_before_forward() == {"forward_sync_buffers": False}  # the pinned torch

    class OlderDDP:  # torch before 2.13
        def __init__(self, module, device_ids=None, broadcast_buffers=True):
            pass

    monkeypatch.setattr(distributed, "DistributedDataParallel", OlderDDP)
    assert distributed.no_buffer_sync_before_forward() == {"broadcast_buffers": False}


def test_longest_batch_is_tried_before_training_and_leaves_no_trace(tmp_path, small_data):
    """try_longest_batch runs one forward and backward pass on the BATCH_SIZE longest training examples (the
    largest activations any step can have) and changes nothing: adapter, gradients and random generator are as
    before, so the run that follows is the one without it. Dropout on: the forward pass draws random numbers."""
    cfg = tiny_config(tmp_path, small_data, lora_dropout=0.1)
    trainer = tiny_trainer(cfg)
    model, train_set = trainer.raw_model, trainer.train_loader.dataset
    seen, gradients = [], []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["attention_mask"].sum(1).tolist(), module.training,
                                                  torch.is_grad_enabled())), with_kwargs=True)
    for param in trainer.trainable_parameters():
        param.register_hook(lambda grad: gradients.append(grad.abs().sum().item()))
    adapter_before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    rng_before = torch.get_rng_state()

    line = train.try_longest_batch(trainer)

    longest = sorted(train_set["length"])[-cfg.batch_size:]
    assert [(sorted(lengths), training, grad) for lengths, training, grad in seen] == [(longest, True, True)]
    assert line == f"longest batch {cfg.batch_size} x {longest[-1]} tokens: forward and backward ran"
    assert len(gradients) == len(trainer.trainable_parameters()) and any(g > 0 for g in gradients)
    assert all(p.grad is None for p in trainer.trainable_parameters())
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(v, adapter_before[k]) for k, v in model.adapter_state_dict().items())


@pytest.mark.slow  # whole training runs
def test_resume_from_checkpoint_continues_exactly(tmp_path, small_data):
    """Stopping after step 2 and resuming from checkpoint-2 ends where the uninterrupted run ends (dropout on, so
    the RNG state must be restored too)."""
    straight = tiny_config(tmp_path / "straight", small_data, max_steps=4, save_steps=2, lora_dropout=0.05)
    train.run(straight, train.DistEnv())
    checkpoint = Path(straight.output_dir) / "checkpoint-2"
    assert (checkpoint / "trainer_state.pt").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    resumed = tiny_config(tmp_path / "resumed", small_data, max_steps=4, save_steps=2, lora_dropout=0.05,
                          resume_from=str(checkpoint))
    train.run(resumed, train.DistEnv())
    a, b = adapter_tensors(Path(straight.output_dir)), adapter_tensors(Path(resumed.output_dir))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    rows = metric_rows(Path(resumed.output_dir))
    steps = [row["step"] for row in rows if "loss" in row]
    assert steps == [3, 4]


@pytest.mark.slow  # whole training runs
def test_a_latest_resume_hashes_each_checkpoint_file_once(tmp_path, small_data, monkeypatch):
    """RESUME_FROM=latest finds, verifies and loads the newest checkpoint reading each of its files' SHA-256 once
    (it used to be resolved and verified in three places)."""
    train.run(tiny_config(tmp_path, small_data, max_steps=2, save_steps=0), train.DistEnv())
    checkpoint_folder = tmp_path / "out" / "checkpoint-2"
    hashed = []
    real_digest = checkpoint.file_digest
    monkeypatch.setattr(checkpoint, "file_digest", lambda path: hashed.append(Path(path)) or real_digest(path))
    train.run(tiny_config(tmp_path, small_data, max_steps=3, save_steps=0, resume_from="latest"), train.DistEnv())
    read = sorted(path.name for path in hashed if path.parent == checkpoint_folder)
    assert read == sorted(path.name for path in checkpoint_folder.iterdir() if path.name != "manifest.json")


def test_an_optimizer_step_reads_its_numbers_from_the_device_once(tmp_path, small_data, monkeypatch):
    """One host sync per fp32/bf16 optimizer step: the loss, gradient norm and stop signals come back together.
    Counted as train.py's own reads of tensor values (a batch's token counts are read on the CPU, before the batch
    moves to the device; AdamW's CPU step counter is torch's)."""
    trainer = tiny_trainer(tiny_config(tmp_path, small_data, grad_accum_steps=2, batch_size=2))
    trainer.train_loader.sampler.set_epoch(0)
    micro_batches = [b for _, b in zip(range(2), trainer.train_loader)]
    reads = []

    def counting(method):
        real = getattr(torch.Tensor, method)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename == train.__file__ and caller.co_name != "<listcomp>":  # not the CPU batch counts
                reads.append(f"{caller.co_name}: {method}")
            return real(self, *args, **kwargs)
        return read

    for method in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, method, counting(method))
    metrics = trainer.optimizer_step(micro_batches)
    monkeypatch.undo()
    assert reads == ["optimizer_step: tolist"] and math.isfinite(metrics["loss"]) and metrics["step"] == 1


@pytest.mark.slow  # whole training runs
def test_a_run_ended_by_max_steps_is_checkpointed_and_a_longer_run_extends_it(tmp_path, small_data, capsys,
                                                                              monkeypatch):
    """MAX_STEPS ending a run mid-epoch (10 steps per epoch here) still leaves a checkpoint of its last step, even
    with SAVE_STEPS=0 (epoch ends only); the same run with a larger MAX_STEPS and RESUME_FROM=latest continues
    from it: steps 3 and 4 only, as one metrics file. The banner says when checkpoints are written."""
    out = tmp_path / "out"
    train.run(tiny_config(tmp_path, small_data, max_steps=2, save_steps=0), train.DistEnv())
    assert checkpoint_dirs(out) == [out / "checkpoint-2"]
    capsys.readouterr()
    train.run(tiny_config(tmp_path, small_data, max_steps=4, save_steps=0, resume_from="latest"), train.DistEnv())
    printed = capsys.readouterr().out
    assert "checkpoints  at each epoch's end and at the last step; all kept" in printed
    assert re.search(rf"resumed\s+from {re.escape(str(out / 'checkpoint-2'))}: step 2", printed)
    assert "the run now ends at step 4 instead of 2" in printed
    assert re.search(r"^done         2 steps in 0 min \d+ s, from step 2 to 4; eval", printed, re.MULTILINE)
    rows = metric_rows(out)
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4]
    assert checkpoint_dirs(out) == [out / "checkpoint-4", out / "checkpoint-2"]

    # The same command once more: the run has finished, and its last checkpoint is left as it is, not written again;
    # its last evaluation is neither run nor logged again, and is what the run returns; no batch is tried.
    written = (out / "checkpoint-4").stat().st_ino
    logged = (out / "metrics.jsonl").read_text()
    monkeypatch.setattr(train, "try_longest_batch", lambda trainer: pytest.fail("a finished run tries a batch"))
    metrics = train.run(tiny_config(tmp_path, small_data, max_steps=4, save_steps=0, resume_from="latest"),
                        train.DistEnv())
    assert (out / "checkpoint-4").stat().st_ino == written
    assert checkpoint_dirs(out) == [out / "checkpoint-4", out / "checkpoint-2"]
    assert (out / "metrics.jsonl").read_text() == logged
    printed = capsys.readouterr().out
    assert "checkpoint-4: step 4, the run had finished (raise NUM_EPOCHS or MAX_STEPS" in printed
    assert "memory       nothing left to train" in printed
    assert re.search(r"^done         no step to train: the run had already finished at step 4 \(0 min \d+ s\); eval",
                     printed, re.MULTILINE)
    last_logged = {k: v for k, v in [row for row in rows if "eval_loss" in row][-1].items() if k != "time"}
    assert metrics == last_logged and metrics["step"] == 4


@pytest.mark.slow  # a whole training run
def test_trains_on_a_file_the_repo_has_never_seen(tmp_path):
    """DATA_PATH=<any Alpaca-format file> MAX_STEPS=20 python train.py (a .jsonl written here)."""
    lines = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(40)]
    lines += [{"instruction": "Repeat the word.", "input": f"word{i}", "output": f"word{i} word{i}"} for i in range(40)]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in lines), encoding="utf-8")
    cfg = tiny_config(tmp_path, data, max_steps=20, num_epochs=3, batch_size=4, size_valid_set=8, eval_freq=10,
                      learning_rate=3e-3)
    metrics = train.run(cfg, train.DistEnv())
    out = Path(cfg.output_dir)
    rows = metric_rows(out)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))
    # EVAL_FREQ=10, the end of epoch 1 (18 steps of 4 from 72 examples) and the end of the run.
    assert [r["step"] for r in rows if "eval_loss" in r] == [10, 18, 20]
    assert evals[-1] < evals[0] and metrics["eval_loss"] == evals[-1]
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "adapter_config.json").is_file() and (out / "checkpoint-18").is_dir()  # 72 examples / 4


@pytest.mark.slow
def test_offline_quick_start_learns_and_its_adapter_loads_in_peft(quick_start_run):
    """The README's quick start, `DEBUG=true MODEL_PATH=models/tiny-bloom python train.py`, as a user runs it (from a
    folder with the repo's models/, nothing else set); everything it prints is ours; PEFT loads the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, result = quick_start_run
    assert result.returncode == 0, result.stderr[-2000:]
    assert not foreign_lines(result.stdout + result.stderr)
    assert "python inference.py --lora-weights outputs/debug --instruction" in result.stdout
    out = folder / "outputs" / "debug"
    rows = metric_rows(out)
    evals = [row["eval_loss"] for row in rows if "eval_loss" in row]
    assert len(evals) >= 2 and evals[-1] < evals[0]

    ids = torch.tensor([[1, 100, 200, 300, 400]])
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(TINY_BLOOM)(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_BLOOM), out).eval()
        ours = train.LoraModelForCasualLM.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_BLOOM), out)
        assert (peft_model(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max() <= 1e-5
        assert (peft_model(input_ids=ids).logits - base_logits).abs().max() > 1e-4  # the adapter did something


# --- a user's own commands --------------------------------------------------------------------------------------------

# What train.py itself prints: the banner's and summary's keys, its progress bar, its evaluation lines.
OUR_LINE = re.compile(r"(model|data|examples|packing|LoRA|precision|base|processes|batch|output|checkpoints|memory"
                      r"|resumed|warning|done) {2,}|note: |warning: |train: |step \d+: eval loss |adapter saved to "
                      r"|python inference\.py ")


def foreign_lines(output: str) -> list[str]:
    """The lines of `output` (progress-bar redraws included) that train.py did not print."""
    lines = (line.strip() for line in re.split(r"[\r\n]", output))
    return [line for line in lines if line and not OUR_LINE.match(line)]


@pytest.mark.slow
@pytest.mark.parametrize("data, examples, valid", [("my300.json", 300, 30), ("data/alpaca_sample.json", 1996, 199)])
def test_own_data_trains_with_the_defaults(tmp_path, records, data, examples, valid):
    """`MODEL_PATH=models/tiny-bloom DATA_PATH=<300 records | the shipped sample> MAX_STEPS=10 python train.py`, as
    typed: the validation set and the warm-up fit the data and the run (with the assignment's full-Alpaca values,
    2,000 and 100 steps, they would leave nothing to train on, or never finish warming up), and the banner says so."""
    with_output = [record for record in records if record["output"].strip()]  # none dropped: 300 examples
    (tmp_path / "my300.json").write_text(json.dumps(with_output[1000:1300]), encoding="utf-8")
    result = user_command(tmp_path, MODEL_PATH="models/tiny-bloom", DATA_PATH=data, MAX_STEPS="10")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"examples     {examples - valid:,} train / {valid} validation (10 % of {examples:,} examples, at most "
            "2,000)") in result.stdout
    assert "10 steps, the first 1 warming up (10 % of 10 steps, at most 100)" in result.stdout
    rows = metric_rows(tmp_path / "outputs" / "lora-alpaca")
    # 9 steps to an epoch of 270 examples (4 x 8 per step): step 10 is the first of epoch 2, counted from 1.
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 11))
    assert (rows[0]["epoch"], rows[-1]["epoch"]) == ((1, 2) if examples == 300 else (1, 1))
    assert {"time", "eval_loss"} <= rows[-1].keys() and rows[1]["lr"] == pytest.approx(3e-4)  # warmed up at step 2


def test_a_warm_up_as_long_as_the_run_is_a_one_line_warning(tmp_path, small_data, capsys):
    train.run(tiny_config(tmp_path, small_data, warmup_steps=5, max_steps=3), train.DistEnv())
    warnings_printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert warnings_printed == ["warning      WARMUP_STEPS=5 is not shorter than the run (3 steps): the learning rate "
                                "never reaches LEARNING_RATE=0.0003"]


def test_the_schedule_is_transformers_cosine_with_warm_up_to_the_last_bit():
    """train.py writes alpaca-lora's schedule out (importing transformers' pulls in PEFT and bitsandbytes); it must
    give the same learning rate at every step, bit for bit."""
    from transformers import get_cosine_schedule_with_warmup

    for warmup, total in [(0, 10), (10, 60), (3, 5), (100, 10), (7, 7), (100, 4689)]:
        rates = []
        for make in (train.cosine_schedule_with_warmup, get_cosine_schedule_with_warmup):
            optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-4)
            schedule, lrs = make(optimizer, warmup, total), []
            for _ in range(total + 2):
                lrs.append(schedule.get_last_lr()[0])
                optimizer.step()
                schedule.step()
            rates.append(lrs)
        assert rates[0] == rates[1], (warmup, total)
