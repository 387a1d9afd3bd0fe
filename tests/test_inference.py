"""inference.py on the shipped tiny BLOOM with an adapter trained here by train.py (the quick-start path).

References are independent of inference.py: PEFT's PeftModel for the adapter, plain transformers for the exported
model, one-prompt-at-a-time generation for the batch.
"""

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BloomConfig, BloomForCausalLM

import inference
import train
from conftest import REPO, SAMPLE, TINY_BLOOM, one_torch_thread
from lora_model import LoraConfig, LoraModelForCasualLM
from prompter import Prompter
from support import generation, precision
from support.config import TrainConfig

INSTRUCTIONS = ["Give three tips for staying healthy.", "What are the three primary colors?",
                "Describe the structure of an atom.", "Translate the sentence into French."]
INPUTS = [None, "", "n/a", "I like cheese very much."]  # the first three all mean "no input"
GREEDY = {"max_new_tokens": 16, "device": "cpu"}  # short, so the suite stays fast


@pytest.fixture(autouse=True, scope="module")
def one_thread_and_an_empty_cache_after():
    with one_torch_thread():
        yield
    inference.clear_cache()


def peft_reference(adapter_dir: Path, instructions: list[str], inputs: list) -> list[str]:
    """PEFT + transformers, written out without inference.py: one prompt at a time, greedy."""
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(TINY_BLOOM)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_BLOOM), adapter_dir).eval()
    return [_greedy_one(model, tokenizer, Prompter().generate_prompt(i, None if u in (None, "", "n/a") else u))
            for i, u in zip(instructions, inputs)]


def _greedy_one(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=GREEDY["max_new_tokens"], do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return Prompter().get_response(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))


# --- 1. a response, and the model loaded once ----------------------------------------------------------------------

def test_returns_the_response_and_loads_the_model_once(adapter, monkeypatch):
    inference.clear_cache()
    calls = []
    real_loader = inference.load_base_model
    monkeypatch.setattr(inference, "load_base_model", lambda *a, **k: calls.append(a) or real_loader(*a, **k))

    first = inference.generate_inference(instruction=INSTRUCTIONS[0], user_inp="", model_path=str(TINY_BLOOM),
                                         lora_weights_path=str(adapter), **GREEDY)
    assert isinstance(first, str) and first.strip() == first and first
    assert "### Response" not in first and "Below is an instruction" not in first
    again = inference.generate_inference(INSTRUCTIONS[0], "n/a", str(TINY_BLOOM), adapter, **GREEDY)
    assert again == first  # greedy: reproducible; "n/a" is the no-input template too
    assert len(calls) == 1  # the second call reused the loaded model


def test_model_path_defaults_to_the_adapters_base(adapter):
    loaded = inference.load_model(None, adapter, device="cpu")
    assert loaded.model.name_or_path == str(TINY_BLOOM)  # train.py recorded it in adapter_config.json
    assert loaded.merged and loaded.precision == "fp32" and loaded.tokenizer.padding_side == "left"


# --- 2. merged == unmerged == PEFT ---------------------------------------------------------------------------------

@pytest.mark.slow  # generates with four models
def test_greedy_text_is_the_same_merged_unmerged_and_in_peft(adapter, tmp_path):
    from peft import PeftModel

    merged = inference.generate_inference(INSTRUCTIONS, INPUTS, None, adapter, **GREEDY)
    assert inference.load_model(None, adapter, device="cpu").merged
    unmerged = inference.generate_inference(INSTRUCTIONS, INPUTS, None, adapter, merge=False, **GREEDY)
    assert isinstance(inference.load_model(None, adapter, merge=False, device="cpu").model, LoraModelForCasualLM)
    reference = peft_reference(adapter, INSTRUCTIONS, INPUTS)
    assert merged == unmerged == reference

    base = inference.generate_inference(INSTRUCTIONS, INPUTS, str(TINY_BLOOM), None, **GREEDY)
    assert base != merged  # the adapter changes the text, so the comparisons above mean something

    # An adapter saved by PEFT itself loads the same.
    peft_dir = tmp_path / "peft-adapter"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_BLOOM), adapter).save_pretrained(peft_dir)
    assert inference.generate_inference(INSTRUCTIONS, INPUTS, str(TINY_BLOOM), peft_dir, **GREEDY) == merged


# --- 3. a batch == one prompt at a time ----------------------------------------------------------------------------

def test_a_left_padded_batch_gives_the_single_prompt_answers(adapter):
    batch = inference.generate_inference(INSTRUCTIONS, INPUTS, None, adapter, **GREEDY)
    singles = [inference.generate_inference(i, u, None, adapter, **GREEDY) for i, u in zip(INSTRUCTIONS, INPUTS)]
    tokenizer = inference.load_model(None, adapter, device="cpu").tokenizer
    lengths = {len(tokenizer(generation.build_prompt(inference.PROMPTER, i, u))["input_ids"])
               for i, u in zip(INSTRUCTIONS, INPUTS)}
    assert len(lengths) > 1  # prompts of different lengths: the batch really is padded
    assert batch == singles


# --- 4. the exported merged model ----------------------------------------------------------------------------------

def test_exported_model_loads_with_plain_transformers_and_generates_the_same(adapter, tmp_path):
    out = inference.export_merged_model(adapter, tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging folder left behind
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(out)
    exported = [_greedy_one(model, tokenizer, generation.build_prompt(inference.PROMPTER, i, u))
                for i, u in zip(INSTRUCTIONS, INPUTS)]
    assert exported == inference.generate_inference(INSTRUCTIONS, INPUTS, None, adapter, **GREEDY)

    with pytest.raises(FileExistsError, match="already exists"):
        inference.export_merged_model(adapter, out)


# --- which precision -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device, native_bf16, expected", [
    ("cpu", False, "fp32"),
    ("cuda", True, "bf16"),   # A100/H100
    ("cuda", False, "fp16"),  # T4/V100: torch says bf16 is supported there (emulated), but fp16 is the fast one
])
def test_auto_precision_is_bf16_only_where_the_gpu_has_it_natively(fake_gpu, device, native_bf16, expected):
    fake_gpu(native_bf16)
    assert precision.resolve_precision("auto", torch.device(device), mixed=device == "cuda") == expected
    assert precision.has_native_bf16(torch.device(device)) == (device == "cpu" or native_bf16)


# --- 5. errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"top_p": 128, "do_sample": True}, r"top_p must be in \(0, 1\], got 128"),
    ({"temperature": 0, "do_sample": True}, "temperature must be > 0, got 0"),
    ({"temperature": 0.7}, "temperature=0.7 only applies when sampling: pass do_sample=True"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    ({"num_beams": 2.5}, "num_beams must be an integer >= 1, got 2.5"),
    ({"top_k": -1, "do_sample": True}, "top_k must be an integer >= 0, got -1"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0, got 0"),
    ({"do_sample": "yes"}, "do_sample must be True or False, got 'yes'"),
    ({"max_length": 10}, "unknown generation option.*max_length"),
])
def test_bad_generation_options_are_named_before_anything_loads(options, message):
    with pytest.raises(ValueError, match=message):
        inference.generate_inference("Say hi.", None, "no/such-model", "/no/such/adapter", **options)


def test_whole_numbers_are_accepted_where_transformers_wants_floats(adapter):
    """temperature=2 passes our check as 2.0 does; transformers' own warper refuses an int, so we pass floats."""
    kwargs = inference.GenerationOptions(do_sample=True, temperature=2, top_p=1, repetition_penalty=2).generate_kwargs()
    assert [type(kwargs[name]) for name in ("temperature", "top_p", "repetition_penalty")] == [float, float, float]
    torch.manual_seed(0)
    assert isinstance(inference.generate_inference("Say hi.", None, str(TINY_BLOOM), adapter, do_sample=True,
                                                   temperature=2, **GREEDY), str)


def test_bad_arguments_are_one_line_errors_that_say_what_to_do(adapter, tmp_path):
    def error(exc_type, **kwargs) -> str:
        with pytest.raises(exc_type) as info:
            inference.generate_inference(**{"instruction": "Say hi.", "device": "cpu", "max_new_tokens": 2, **kwargs})
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "does not exist; pass the folder that save_pretrained wrote" in error(
        FileNotFoundError, lora_weights_path=tmp_path / "missing")
    assert "no such model folder" in error(FileNotFoundError, model_path="./no/such/model", lora_weights_path=adapter)
    assert "cannot load it from the hub" in error(  # HF_HUB_OFFLINE=1 (conftest)
        FileNotFoundError, model_path="nobody-here/no-such-model", lora_weights_path=adapter)
    assert "user_inp must be None or a list of 2" in error(ValueError, instruction=["a", "b"], user_inp="x",
                                                           lora_weights_path=adapter)

    # An adapter for a BLOOM of another width: every shape is wrong.
    other = BloomForCausalLM(BloomConfig(vocab_size=4096, hidden_size=64, n_layer=4, n_head=4))
    LoraModelForCasualLM(other, LoraConfig(target_modules=["query_key_value"],
                                           base_model_name_or_path=str(TINY_BLOOM))).save_pretrained(tmp_path / "x")
    message = error(ValueError, lora_weights_path=tmp_path / "x")
    assert "does not fit base model" in message and "shape" in message and "pass the model_path it was trained on" \
        in message


@pytest.mark.slow  # generates with two models
def test_adapter_that_cannot_merge_stays_unmerged_with_a_warning(tmp_path):
    # An adapter on BLOOM's word embeddings, which are tied to the output layer: merging would change lm_head too.
    model = AutoModelForCausalLM.from_pretrained(TINY_BLOOM)
    lora = LoraModelForCasualLM(model, LoraConfig(target_modules=["word_embeddings"], init_lora_weights=False,
                                                  base_model_name_or_path=str(TINY_BLOOM)))
    lora.save_pretrained(tmp_path / "embedding-adapter")
    with pytest.warns(UserWarning, match="adapter kept unmerged: .*tied to the output layer"):
        asked_merged = inference.generate_inference(INSTRUCTIONS[:2], None, None, tmp_path / "embedding-adapter",
                                                    **GREEDY)
    assert not inference.load_model(None, tmp_path / "embedding-adapter", device="cpu").merged
    assert asked_merged == inference.generate_inference(INSTRUCTIONS[:2], None, None, tmp_path / "embedding-adapter",
                                                        merge=False, **GREEDY)


@pytest.mark.slow  # bitsandbytes' 8-bit CPU path
def test_8bit_base_keeps_the_adapter_unmerged(adapter):
    pytest.importorskip("bitsandbytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # bitsandbytes' own torch.jit warnings
        with pytest.warns(UserWarning, match="8bit weights cannot absorb the update"):
            text = inference.generate_inference(INSTRUCTIONS[0], None, None, adapter, precision="8bit", **GREEDY)
    assert text and not inference.load_model(None, adapter, precision="8bit", device="cpu").merged
    inference.clear_cache()


# --- the command line ----------------------------------------------------------------------------------------------

def test_cli_streams_the_answer_and_the_interactive_loop_reads_until_eof(adapter, monkeypatch, capsys):
    args = ["--lora-weights", str(adapter), "--device", "cpu", "--max-new-tokens", "16"]
    assert inference.main([*args, "--instruction", INSTRUCTIONS[1]]) == 0
    expected = inference.generate_inference(INSTRUCTIONS[1], None, None, adapter, **GREEDY)
    assert capsys.readouterr().out.strip() == expected

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{INSTRUCTIONS[0]}\n\n{INSTRUCTIONS[3]}\n{INPUTS[3]}\n"))
    assert inference.main(args) == 0
    out = capsys.readouterr().out
    for instruction, user_inp in ((INSTRUCTIONS[0], None), (INSTRUCTIONS[3], INPUTS[3])):
        assert inference.generate_inference(instruction, user_inp, None, adapter, **GREEDY) in out


@pytest.mark.slow  # inference.py in a process of its own
def test_cli_user_errors_exit_1_with_one_line(tmp_path, capsys):
    assert inference.main(["--lora-weights", str(tmp_path), "--instruction", "hi", "--top-p", "128",
                           "--sample"]) == 1
    assert capsys.readouterr().err == "error: top_p must be in (0, 1], got 128.0\n"
    assert inference.main(["--instruction", "hi", "--num-beams", "x"]) == 1
    assert capsys.readouterr().err.count("\n") == 1

    result = subprocess.run([sys.executable, "inference.py", "--lora-weights", str(tmp_path / "missing"),
                             "--instruction", "hi"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert result.stderr.startswith("error: adapter folder") and result.stderr.count("\n") == 1, result.stderr


def test_cli_export(adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    assert inference.main(["export", "--lora-weights", str(adapter), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and str(out) in capsys.readouterr().out
    assert inference.main(["export", "--lora-weights", str(adapter), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


# --- the benchmark still runs --------------------------------------------------------------------------------------

def test_generation_benchmark_runs_and_writes_its_table(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import bench_generate

    out = tmp_path / "generate.md"
    bench_generate.main(["--hidden", "64", "--layers", "1", "--heads", "4", "--vocab", "256", "--new-tokens", "4",
                         "--repeats", "1", "--warmup", "0", "--out", str(out)])
    table = out.read_text()
    assert table.startswith("# ") and "python bench/bench_generate.py" in table and "merged / base" in table


# --- adapters that travel ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # a whole training run
def test_an_adapter_trained_from_the_repo_root_loads_from_any_folder(tmp_path, monkeypatch):
    """Trained with MODEL_PATH=models/tiny-bloom from the repo root, the adapter records its base as an absolute
    path, so generate_inference(model_path=None) finds it from another working folder (a notebook's)."""
    data = tmp_path / "small.json"
    data.write_text(json.dumps(json.loads(SAMPLE.read_text(encoding="utf-8"))[:24]), encoding="utf-8")
    monkeypatch.chdir(REPO)
    cfg = TrainConfig(model_path="models/tiny-bloom", data_path=str(data), output_dir=str(tmp_path / "out"),
                      cache_dir=str(tmp_path / "cache"), max_length=128, batch_size=4, grad_accum_steps=1,
                      size_valid_set=4, num_epochs=1, max_steps=2)
    train.run(cfg, train.DistEnv())
    recorded = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(TINY_BLOOM)
    elsewhere = tmp_path / "notebook"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    answer = inference.generate_inference("Name three primary colors.", None, None, "../out", **GREEDY)
    assert answer == inference.generate_inference("Name three primary colors.", None, str(TINY_BLOOM),
                                                  tmp_path / "out", **GREEDY)


def test_a_base_folder_that_does_not_exist_fails_at_once_without_asking_the_hub(adapter, tmp_path, monkeypatch):
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (moved / name).write_bytes((adapter / name).read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone/tiny-bloom"}))
    for loader in (AutoModelForCausalLM, AutoTokenizer):  # no download attempt (its retries take most of a minute)
        monkeypatch.setattr(loader, "from_pretrained", lambda *a, **k: pytest.fail("asked transformers to load it"))
    with pytest.raises(FileNotFoundError) as info:
        inference.generate_inference("Say hi.", None, None, moved, **GREEDY)
    assert str(info.value) == ("model_path='/gone/tiny-bloom': no such model folder; pass a local model folder or "
                               "a hub id such as 'bigscience/bloom-1b7'")


@pytest.mark.slow  # the CLI in a process of its own
def test_the_cli_says_which_base_and_adapter_it_loaded(adapter):
    result = subprocess.run([sys.executable, "inference.py", "--lora-weights", str(adapter), "--instruction", "Hi.",
                             "--max-new-tokens", "4", "--device", "cpu", "--no-stream"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"loaded {TINY_BLOOM} (fp32 on cpu) + adapter {adapter} (merged)" in result.stderr
