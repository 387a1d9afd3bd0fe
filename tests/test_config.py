"""Tests for support/config.py: one validated TrainConfig from env vars and flags, every bad value a one-line error
naming the variable, every setting classified for resume, and docs/options.md generated from it."""

import dataclasses
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FIELDS, ODD_VALUES, REPO
from support import config
from support.config import ConfigError, TrainConfig, load_config


def test_options_doc_is_generated_from_the_config():
    """A new or changed TrainConfig field must reach docs/options.md; the message says how to regenerate it."""
    assert (REPO / "docs" / "options.md").read_text() == config.options_markdown(), (
        "docs/options.md is out of date; regenerate it with "
        "python -c \"from support import config; print(config.options_markdown(), end='')\" > docs/options.md")


def test_env_and_flags_build_one_validated_config():
    cfg = load_config(["--batch-size", "2"], {"BATCH_SIZE": "16", "DEBUG": "yes", "LORA_R": "4",
                                             "MIX_PREC_TRAIN": "0", "TARGET_MODULES": "query_key_value,dense"})
    assert cfg.batch_size == 2  # the flag wins over the environment
    assert cfg.debug and not cfg.mix_prec_train and cfg.lora_r == 4
    assert cfg.target_module_list == ["query_key_value", "dense"]
    assert cfg.data_path.endswith("alpaca_sample.json") and cfg.num_epochs == 1  # DEBUG's defaults
    assert load_config([], {"DEBUG": "true", "NUM_EPOCHS": "2"}).num_epochs == 2  # explicit beats DEBUG


def test_seed_hyper_parameters_are_the_defaults():
    cfg = load_config([], {})
    assert (cfg.learning_rate, cfg.max_length, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (
        3e-4, 512, 8, 16, 0.05)
    assert cfg.model_path == "bigscience/bloom-1b7" and cfg.weight_decay > 0
    # Warm-up and validation size follow the run and the data; on the full Alpaca (52,002 records: ~50,000 train
    # examples, 3 epochs of 32-example steps) they are the assignment's 100 steps and 2,000 examples.
    assert cfg.resolve_warmup_steps(3 * math.ceil(50_000 / 32)) == (100, "10 % of 4,689 steps, at most 100")
    assert cfg.resolve_valid_size(51_990) == (2000, "10 % of 51,990 examples, at most 2,000")


def test_small_data_and_short_runs_get_defaults_that_fit_them():
    cfg = load_config([], {})
    assert cfg.resolve_valid_size(300) == (30, "10 % of 300 examples, at most 2,000")
    assert cfg.resolve_warmup_steps(10) == (1, "10 % of 10 steps, at most 100")
    assert cfg.resolve_valid_size(9)[0] == 0  # too few to spare any: no validation set
    explicit = load_config([], {"SIZE_VALID_SET": "0.25", "WARMUP_STEPS": "100"})
    assert explicit.resolve_valid_size(300) == (0.25, "SIZE_VALID_SET")
    assert explicit.resolve_warmup_steps(10) == (100, "WARMUP_STEPS")
    assert load_config([], {"DEBUG": "true"}).resolve_warmup_steps(60) == (10, "WARMUP_STEPS")  # DEBUG's own


def test_yes_no_flags_work_bare_and_with_a_value():
    assert load_config(["--debug"], {}).debug and load_config(["--debug", "--ddp", "no"], {}).ddp is False
    assert load_config(["--mix-prec-train"], {}).mix_prec_train
    assert load_config(["--debug", "false"], {"DEBUG": "true"}).debug is False
    with pytest.raises(ConfigError, match="--debug must be one of 1/0/true/false/yes/no, got 'maybe'"):
        load_config(["--debug", "maybe"], {})


def test_data_fields_map_alpaca_names_to_the_data_columns():
    cfg = load_config([], {"DATA_FIELDS": " instruction=prompt, output=completion "})
    assert cfg.data_field_map == {"instruction": "prompt", "output": "completion"}
    for bad in ("prompt", "question=prompt", "instruction=", "instruction=a,instruction=b"):
        with pytest.raises(ConfigError, match="DATA_FIELDS must be like instruction=prompt,output=completion"):
            load_config([], {"DATA_FIELDS": bad})


@pytest.mark.parametrize("env, message", [
    ({"BATCH_SIZE": "abc"}, "BATCH_SIZE must be an integer, got 'abc'"),
    ({"DEBUG": "maybe"}, "DEBUG must be one of 1/0/true/false/yes/no, got 'maybe'"),
    ({"LEARNING_RATE": "fast"}, "LEARNING_RATE must be a number"),
    ({"LEARNING_RATE": "nan"}, "LEARNING_RATE must be a finite number"),
    ({"BATCH_SIZE": "0"}, "BATCH_SIZE must be > 0"),
    ({"LORA_DROPOUT": "1.5"}, "LORA_DROPOUT must be in [0, 1)"),
    ({"PRECISION": "fp8"}, "PRECISION must be one of fp32, bf16, fp16"),
    ({"MAX_STEPS": "0"}, "MAX_STEPS must be a positive step count or -1"),
    ({"SIZE_VALID_SET": "2.5"}, "SIZE_VALID_SET must be a whole count or a fraction"),
    ({"RESUME_FROM": "latest", "OVERWRITE_OUTPUT_DIR": "true"}, "RESUME_FROM='latest' continues a run and "
                                                                "OVERWRITE_OUTPUT_DIR=true starts a new one"),
])
def test_bad_setting_names_the_variable(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([], env)


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config(["--help"], {})
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for name in ("DEBUG", "MIX_PREC_TRAIN", "DDP", "BATCH_SIZE", "TRAIN_ON_INPUTS", "GROUP_BY_LENGTH", "RESUME_FROM"):
        assert name in help_text
    assert "LEARNING_RATE, default 0.0003)" in help_text
    assert "15-35 % slower" in help_text and "{" not in help_text and "%%" not in help_text
    assert "DEBUG=true changes these defaults: NUM_EPOCHS=1, SIZE_VALID_SET=100" in help_text


def test_every_setting_is_classified_for_resume():
    """A new setting must be placed in one of the three groups (must match, may change with a note, free)."""
    groups = config.RESUME_MUST_MATCH + config.RESUME_MAY_CHANGE_WITH_NOTE + config.RESUME_FREE
    assert sorted(groups) == sorted(f.name for f in dataclasses.fields(TrainConfig))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(env=st.dictionaries(st.sampled_from(FIELDS).map(str.upper), ODD_VALUES, max_size=4),
       flags=st.dictionaries(st.sampled_from(FIELDS), ODD_VALUES, max_size=2))
def test_config_parsing_accepts_or_refuses_in_one_line(env, flags):
    argv = [f"--{name}={value}" for name, value in flags.items()]
    try:
        cfg = load_config(argv, env)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err)
        return
    assert cfg.batch_size > 0 and 0 <= cfg.seed < 2**32  # an accepted config is a valid one


def test_a_misspelled_setting_gets_a_did_you_mean_line():
    """Only upper-case names with an underscore, close to a setting, and not another program's variable ending in a
    setting's name (PIP_CACHE_DIR) or the launcher's (LOCAL_RANK)."""
    environ = {"LORA_RANK": "16", "MAX_STEP": "2", "LORA_R": "8", "PIP_CACHE_DIR": "/tmp", "LOCAL_RANK": "0",
               "HOME": "/root", "lora_rank": "16", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    assert config.misspelled_settings(environ) == [
        "LORA_RANK is not a setting of train.py and is ignored; did you mean LORA_R?",
        "MAX_STEP is not a setting of train.py and is ignored; did you mean MAX_STEPS?"]
    assert config.misspelled_settings({}) == []
