"""Model-level tests of lora_model.py on tiny BLOOMs, with PEFT as the independent reference.

PEFT is never used to build what we test; it builds a twin: the same base weights (a deep copy) and the same A/B
values (copied across by parameter name), so logits, gradients, saved files, trainable sets and parameter counts
can be compared one to one. Adapters are random (init_lora_weights=False) wherever the update must be non-zero.
"""

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

import lora_model
from lora_layer import LoraLayer
from lora_model import LoraConfig, LoraModelForCasualLM

TINY = dict(vocab_size=256, hidden_size=32, n_layer=2, n_head=4)
LINEAR_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
EMBEDDING_TARGETS = ["word_embeddings"]
MAX_DIFF = 1e-5  # float32 bar for logits and gradients against PEFT


def tiny_bloom(seed: int = 0, **overrides) -> BloomForCausalLM:
    torch.manual_seed(seed)
    return BloomForCausalLM(BloomConfig(**{**TINY, **overrides})).eval()


def batch(seed: int = 1, vocab: int = TINY["vocab_size"], shape=(2, 12)) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def ours_name(peft_name: str) -> str:
    """PEFT's in-memory name -> ours: `base_model.model.X.lora_A.default.weight` -> `model.X.lora_A.weight`."""
    return "model." + peft_name.removeprefix("base_model.model.").replace(".default", "")


def lora_params(model: nn.Module, rename=lambda n: n) -> dict[str, torch.Tensor]:
    return {rename(n): p for n, p in model.named_parameters() if "lora_" in n}


def peft_twin(ours: LoraModelForCasualLM, base_copy: nn.Module, **peft_kwargs) -> peft.PeftModel:
    """PEFT on a copy of our base, with our adapter values copied in (so the comparison is not about init)."""
    ref = peft.get_peft_model(base_copy, peft.LoraConfig(**peft_kwargs))
    ref_params = lora_params(ref, ours_name)
    our_params = lora_params(ours)
    assert ref_params.keys() == our_params.keys()
    with torch.no_grad():
        for name, param in ref_params.items():
            param.copy_(our_params[name])
    return ref


def make_pair(targets, seed=0, model_overrides=None, **lora_kwargs):
    """(ours, PEFT twin) on identical tiny BLOOMs with identical random adapters."""
    base = tiny_bloom(seed, **(model_overrides or {}))
    base_copy = copy.deepcopy(base)
    # alpha / r = 3 (rsLoRA: 6), not a power of two: ours scales B, PEFT scales the layer output, and only a
    # scaling that rounds shows the two orders agree within the bar rather than bit for bit.
    kwargs = dict(r=4, lora_alpha=12, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    kwargs.update(lora_kwargs)
    ours = LoraModelForCasualLM(base, LoraConfig(**kwargs))
    return ours, peft_twin(ours, base_copy, **kwargs)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def wrapped_names(model: nn.Module) -> set[str]:
    """Names of the LoRA-wrapped modules, relative to the transformers model, for ours and PEFT alike."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) or isinstance(module, peft.tuners.lora.LoraLayer):
            names.add(name.removeprefix("base_model.model.").removeprefix("model."))
    return names


# --- 1. interop with PEFT: logits and gradients ---------------------------------------------------------------

@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("targets", [LINEAR_TARGETS, EMBEDDING_TARGETS], ids=["linear", "embedding"])
def test_logits_and_gradients_equal_peft(targets, use_rslora):
    ours, ref = make_pair(targets, use_rslora=use_rslora)
    inputs = batch()
    base_logits = tiny_bloom()(**inputs).logits
    ours.train()
    ref.train()

    out, ref_out = ours(**inputs), ref(**inputs)
    assert max_diff(out.logits, base_logits) > 1e-2, "the adapters must change the logits"
    assert max_diff(out.logits, ref_out.logits) <= MAX_DIFF

    out.loss.backward()
    ref_out.loss.backward()
    grads = {n: p.grad for n, p in lora_params(ours).items()}
    ref_grads = {n: p.grad for n, p in lora_params(ref, ours_name).items()}
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert grad is not None and grad.abs().max() > 0, name
        assert max_diff(grad, ref_grads[name]) <= MAX_DIFF, name
    # Nothing but the adapter gets a gradient.
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)


def test_dropout_is_off_in_eval_mode_and_on_in_train_mode():
    ours, ref = make_pair(LINEAR_TARGETS, lora_dropout=0.3)
    inputs = batch()
    ours.eval()
    ref.eval()
    assert max_diff(ours(**inputs).logits, ref(**inputs).logits) <= MAX_DIFF
    ours.train()
    first, second = ours(**inputs).logits, ours(**inputs).logits
    assert max_diff(first, second) > 1e-4, "train mode must draw fresh dropout masks"


def test_peft_lora_config_is_accepted():
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["query_key_value"],
                             use_rslora=True, init_lora_weights=False)
    base = tiny_bloom()
    ref = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    ours = LoraModelForCasualLM(base, config)
    assert wrapped_names(ours) == wrapped_names(ref)
    for name, module in ref.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            layer = ours.model.get_submodule(name.removeprefix("base_model.model."))
            assert layer.r == module.r["default"]
            assert layer.scaling == pytest.approx(module.scaling["default"])
            assert layer.lora_dropout.p == module.lora_dropout["default"].p
    with torch.no_grad():
        for name, param in lora_params(ref, ours_name).items():
            param.copy_(lora_params(ours)[name])
    inputs = batch()
    assert max_diff(ours.eval()(**inputs).logits, ref.eval()(**inputs).logits) <= MAX_DIFF


def test_peft_features_we_do_not_implement_are_refused():
    with pytest.raises(ValueError, match="lora_bias"):
        LoraModelForCasualLM(tiny_bloom(), peft.LoraConfig(r=4, target_modules=["query_key_value"], lora_bias=True))


# --- targets, trainable sets, disabling ------------------------------------------------------------------------

@pytest.mark.parametrize("targets", [None, "all-linear", r".*\.h\.1\.mlp\.dense_.*", ["dense", "word_embeddings"]],
                         ids=["default", "all-linear", "regex", "list"])
def test_wrapped_modules_equal_peft(targets):
    base = tiny_bloom()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=targets))
    ours = LoraModelForCasualLM(base, LoraConfig(r=4, target_modules=targets))
    assert wrapped_names(ours) == wrapped_names(ref)
    assert "lm_head" not in wrapped_names(ours)
    if targets is None:  # BLOOM's default target
        assert wrapped_names(ours) == {"transformer.h.0.self_attention.query_key_value",
                                       "transformer.h.1.self_attention.query_key_value"}


def test_missing_target_lists_the_models_layers():
    with pytest.raises(ValueError, match="q_proj") as info:
        LoraModelForCasualLM(tiny_bloom(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    for name in ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "word_embeddings", "lm_head"]:
        assert name in str(info.value)


def test_target_that_is_not_a_layer_is_refused():
    with pytest.raises(ValueError, match="self_attention.*BloomAttention"):
        LoraModelForCasualLM(tiny_bloom(), LoraConfig(target_modules=["self_attention"]))


@pytest.mark.parametrize("kwargs, field", [
    ({"bias": "some"}, "bias"), ({"target_modules": []}, "target_modules"),
    ({"target_modules": ["query_key_value", ""]}, "target_modules"), ({"target_modules": 5}, "target_modules"),
    ({"r": 0}, "r"), ({"lora_alpha": -8}, "lora_alpha"), ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"init_lora_weights": "olora"}, "init_lora_weights"),
])
def test_bad_config_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_trainable_parameters_and_saved_keys_equal_peft(bias, tmp_path):
    ours, ref = make_pair(["query_key_value", "dense_4h_to_h"], bias=bias)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    ref_trainable = {ours_name(n) for n, p in ref.named_parameters() if p.requires_grad}
    assert trainable == ref_trainable
    assert any("bias" in n for n in trainable) == (bias != "none")
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()

    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    ref_saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert saved.keys() == ref_saved.keys()


def test_disable_adapter_gives_exactly_the_base_logits():
    inputs = batch()
    base_logits = tiny_bloom()(**inputs).logits
    ours = LoraModelForCasualLM(tiny_bloom(), LoraConfig(r=4, target_modules=LINEAR_TARGETS + EMBEDDING_TARGETS,
                                                         init_lora_weights=False))
    adapted = ours(**inputs).logits
    assert max_diff(adapted, base_logits) > 1e-2
    with ours.disable_adapter():
        assert torch.equal(ours(**inputs).logits, base_logits)
    assert torch.equal(ours(**inputs).logits, adapted)


def test_disable_adapter_unmerges_a_merged_model_first():
    inputs = batch()
    base_logits = tiny_bloom()(**inputs).logits
    ours = LoraModelForCasualLM(tiny_bloom(), LoraConfig(r=4, target_modules=LINEAR_TARGETS,
                                                         init_lora_weights=False))
    ours.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging"), ours.disable_adapter():
        assert max_diff(ours(**inputs).logits, base_logits) <= MAX_DIFF


# --- 2. saving and loading, both directions --------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny BLOOM saved to disk, so that models loaded from it carry name_or_path like a hub model."""
    path = tmp_path_factory.mktemp("tiny-bloom")
    tiny_bloom().save_pretrained(path)
    return path


def load_base(path: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


ALL_TARGETS = LINEAR_TARGETS + EMBEDDING_TARGETS


def test_adapter_saved_by_us_loads_in_peft(base_dir, tmp_path):
    ours = LoraModelForCasualLM(load_base(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=ALL_TARGETS,
                                                               init_lora_weights=False)).eval()
    ours.save_pretrained(tmp_path / "adapter")

    ref = peft.PeftModel.from_pretrained(load_base(base_dir), tmp_path / "adapter").eval()
    inputs = batch()
    assert max_diff(ours(**inputs).logits, ref(**inputs).logits) <= MAX_DIFF
    for name, param in lora_params(ref, ours_name).items():
        assert torch.equal(param, lora_params(ours)[name]), name

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert set(config["target_modules"]) == set(ALL_TARGETS)


def test_saved_file_holds_only_adapter_tensors_under_peft_keys(base_dir, tmp_path):
    ours = LoraModelForCasualLM(load_base(base_dir), LoraConfig(r=4, target_modules=ALL_TARGETS))
    ours.save_pretrained(tmp_path / "ours")
    ref = peft.get_peft_model(load_base(base_dir), peft.LoraConfig(r=4, target_modules=ALL_TARGETS))
    ref.save_pretrained(tmp_path / "peft")

    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert saved.keys() == load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    assert "base_model.model.transformer.h.0.self_attention.query_key_value.lora_A.weight" in saved
    assert "base_model.model.transformer.word_embeddings.lora_embedding_B" in saved
    # 2 layers x 4 linear targets + 1 embedding, two factors each; no base weight sneaks in.
    assert len(saved) == 2 * (2 * 4 + 1)
    assert all(".lora_" in key and "base_layer" not in key for key in saved)
    assert all(t.dtype == torch.float32 for t in saved.values())
    adapter_numel = sum(t.numel() for t in saved.values())
    assert adapter_numel == ours.get_nb_trainable_parameters()[0]


def test_adapter_saved_by_peft_loads_in_ours(base_dir, tmp_path):
    ref = peft.get_peft_model(load_base(base_dir), peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL_TARGETS,
                                                                  use_rslora=True, init_lora_weights=False)).eval()
    ref.save_pretrained(tmp_path / "adapter")

    ours = LoraModelForCasualLM.from_pretrained(load_base(base_dir), tmp_path / "adapter")
    inputs = batch()
    assert max_diff(ours(**inputs).logits, ref(**inputs).logits) <= MAX_DIFF
    assert max_diff(ours(**inputs).logits, load_base(base_dir)(**inputs).logits) > 1e-2
    assert not ours.training
    assert not any(p.requires_grad for p in ours.parameters())

    resumed = LoraModelForCasualLM.from_pretrained(load_base(base_dir), tmp_path / "adapter", is_trainable=True)
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == set(lora_params(resumed))


@pytest.fixture
def saved_adapter(base_dir, tmp_path) -> Path:
    ours = LoraModelForCasualLM(load_base(base_dir), LoraConfig(r=4, target_modules=["query_key_value"],
                                                               init_lora_weights=False))
    ours.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_missing_and_unexpected_keys_are_named(base_dir, saved_adapter):
    weights = saved_adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    dropped = "base_model.model.transformer.h.1.self_attention.query_key_value.lora_B.weight"
    extra = "base_model.model.transformer.h.1.self_attention.dense.lora_A.weight"
    tensors[extra] = tensors.pop(dropped)
    save_file(tensors, weights)
    with pytest.raises(ValueError) as info:
        LoraModelForCasualLM.from_pretrained(load_base(base_dir), saved_adapter)
    message = str(info.value)
    assert "missing" in message and dropped in message
    assert "unexpected" in message and extra in message


def test_adapter_with_another_rank_is_refused_naming_the_key(base_dir, saved_adapter):
    ours = LoraModelForCasualLM(load_base(base_dir), LoraConfig(r=8, target_modules=["query_key_value"]))
    with pytest.raises(ValueError, match=r"h\.0\.self_attention\.query_key_value\.lora_A\.weight.*shape"):
        ours.load_adapter_weights(load_file(saved_adapter / "adapter_model.safetensors"))


def test_adapter_for_another_model_size_is_refused_naming_the_keys(saved_adapter):
    with pytest.raises(ValueError, match=r"query_key_value\.lora_[AB]\.weight has shape"):
        LoraModelForCasualLM.from_pretrained(tiny_bloom(hidden_size=64), saved_adapter)
    with pytest.raises(ValueError, match=r"missing .*h\.2\.self_attention\.query_key_value\.lora_A\.weight"):
        LoraModelForCasualLM.from_pretrained(tiny_bloom(n_layer=3), saved_adapter)


def test_missing_adapter_folder_raises_file_not_found(tmp_path):
    missing = tmp_path / "no-such-adapter"
    with pytest.raises(FileNotFoundError, match="no-such-adapter.*does not exist"):
        LoraModelForCasualLM.from_pretrained(tiny_bloom(), missing)
    missing.mkdir()
    (missing / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["query_key_value"]}))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        LoraModelForCasualLM.from_pretrained(tiny_bloom(), missing)


def test_save_is_atomic(tmp_path, monkeypatch):
    ours = LoraModelForCasualLM(tiny_bloom(), LoraConfig(r=4, target_modules=["query_key_value"],
                                                         init_lora_weights=False))
    target = tmp_path / "adapter"
    ours.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with torch.no_grad():
        for param in lora_params(ours).values():
            param.add_(1.0)

    def write_that_dies_midway(filename, data):  # the serialized safetensors file, half written
        Path(filename).write_bytes(bytes(data)[:len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(lora_model, "write_bytes", write_that_dies_midway)
    with pytest.raises(OSError, match="disk full"):
        ours.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert list(tmp_path.iterdir()) == [target], "no temporary folders may be left behind"

    monkeypatch.undo()
    ours.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} != before
    assert list(tmp_path.iterdir()) == [target]
    # The folder gets the same permissions as one made by mkdir (a 0700 temp folder would hide it from others).
    (tmp_path / "reference").mkdir()
    assert target.stat().st_mode == (tmp_path / "reference").stat().st_mode


# --- 3. merging ------------------------------------------------------------------------------------------------

def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def untied_lora_model() -> LoraModelForCasualLM:
    # Untied so that word_embeddings can be merged too (see test_merge_refused_on_tied_embedding).
    model = LoraModelForCasualLM(tiny_bloom(tie_word_embeddings=False),
                                 LoraConfig(r=4, lora_alpha=8, target_modules=ALL_TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for layer in (m for _, m in model.lora_layers() if hasattr(m, "lora_embedding_A")):
            layer.lora_embedding_A.mul_(0.05)  # a trained-size update, not N(0, 1) x N(0, 1)
    return model


def test_merge_equals_unmerged_and_unmerge_restores_w0():
    model = untied_lora_model()
    assert model.lm_head.weight is not model.transformer.word_embeddings.base_layer.weight
    inputs = batch()
    unmerged = model(**inputs).logits
    w0 = base_weights(model)

    model.merge_adapter()
    assert all(layer.merged for _, layer in model.lora_layers())
    changed = {n for n, w in base_weights(model).items() if not torch.equal(w, w0[n])}
    assert len(changed) == 2 * 4 + 1, "every targeted weight (and nothing else) must change"
    assert max_diff(model(**inputs).logits, unmerged) <= MAX_DIFF

    merged_weights = base_weights(model)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    assert all(torch.equal(w, merged_weights[n]) for n, w in base_weights(model).items())

    model.unmerge_adapter()
    for name, weight in base_weights(model).items():
        assert max_diff(weight, w0[name]) <= 1e-6, name
    assert max_diff(model(**inputs).logits, unmerged) <= MAX_DIFF


def test_nan_in_b_refuses_to_merge_and_leaves_every_w0_untouched():
    model = untied_lora_model()
    with torch.no_grad():
        model.transformer.h[1].mlp.dense_4h_to_h.lora_B.weight[0, 0] = float("nan")
    w0 = base_weights(model)
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="NaN or inf"):
            merge()
        assert all(torch.equal(w, w0[n]) for n, w in base_weights(model).items())
        assert not any(layer.merged for _, layer in model.lora_layers())
        assert len(list(model.lora_layers())) == 2 * 4 + 1


@pytest.mark.parametrize("tied", [True, False], ids=["tied-linear", "untied-linear-and-embedding"])
def test_merge_and_unload_saves_a_plain_model_with_the_same_logits(tied, tmp_path):
    if tied:
        model = LoraModelForCasualLM(tiny_bloom(), LoraConfig(r=4, target_modules=LINEAR_TARGETS,
                                                              init_lora_weights=False))
    else:
        model = untied_lora_model()
    inputs = batch()
    adapted = model(**inputs).logits
    plain = model.merge_and_unload()
    assert isinstance(plain, BloomForCausalLM)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert not any("lora_" in key or "base_layer" in key for key in plain.state_dict())
    plain.save_pretrained(tmp_path / "merged")
    reloaded = load_base(tmp_path / "merged")
    assert max_diff(reloaded(**inputs).logits, adapted) <= MAX_DIFF


def test_merge_refused_on_tied_embedding():
    # BLOOM ties lm_head to word_embeddings: one tensor serves as both. Unmerged, the adapter only changes the
    # input lookup; merged into the shared tensor it would change the output projection as well, so the merged
    # model would compute something else. PEFT warns; we refuse.
    model = LoraModelForCasualLM(tiny_bloom(), LoraConfig(r=4, target_modules=["query_key_value"] + EMBEDDING_TARGETS,
                                                          init_lora_weights=False))
    assert model.lm_head.weight is model.transformer.word_embeddings.base_layer.weight
    w0 = base_weights(model)
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="tied"):
            merge()
        assert all(torch.equal(w, w0[n]) for n, w in base_weights(model).items())
        assert not any(layer.merged for _, layer in model.lora_layers())


# --- 4. mixed precision and quantized bases --------------------------------------------------------------------

def test_fp16_base_with_autocast_and_grad_scaler_trains():
    model = LoraModelForCasualLM(tiny_bloom(hidden_size=64).half(),
                                 LoraConfig(r=4, lora_alpha=8, target_modules=ALL_TARGETS))
    adapter = [p for p in model.parameters() if p.requires_grad]
    assert adapter and all(p.dtype == torch.float32 for p in adapter)
    assert all(p.dtype == torch.float16 for n, p in model.named_parameters() if "lora_" not in n)
    output_dtypes = set()
    for _, layer in model.lora_layers():
        layer.register_forward_hook(lambda module, args, out: output_dtypes.add(out.dtype))
    frozen = base_weights(model)
    start = [p.detach().clone() for p in adapter]

    optimizer = torch.optim.AdamW(adapter, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    inputs = batch(shape=(2, 16))
    losses, finite_steps = [], 0
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**inputs).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # raises "Attempting to unscale FP16 gradients" for fp16 adapters
        assert all(p.grad.dtype == torch.float32 for p in adapter)
        # The first step may overflow at the initial scale of 2**16; the scaler then skips it and halves the scale.
        finite_steps += all(torch.isfinite(p.grad).all() for p in adapter)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert finite_steps >= 3
    assert output_dtypes == {torch.float16}, "each LoRA layer returns the base layer's dtype"
    assert all(p.dtype == torch.float32 for p in adapter)
    assert any(not torch.equal(p, s) for p, s in zip(adapter, start)), "the optimizer must have stepped"
    assert all(torch.equal(w, frozen[n]) for n, w in base_weights(model).items())
    assert losses[-1] < losses[0]

    # The check above can fail: fp16 adapters make the same step raise.
    model.half()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(**inputs).loss
    scaler.scale(loss).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))


def quantize(model: nn.Module, names: list[str], kind: str) -> nn.Module:
    """Swap the named nn.Linear layers for bitsandbytes ones; `.to("cpu")` quantizes their weights."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if not any(name.endswith("." + target) for target in names):
            continue
        if kind == "int8":
            new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                      has_fp16_weights=False, threshold=0.0)
        else:
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                    compute_dtype=torch.float32, quant_type="nf4")
        new.load_state_dict(module.state_dict())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new.to("cpu"))
    return model


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_base_trains_and_refuses_to_merge(kind):
    import bitsandbytes as bnb

    targets = ["query_key_value", "dense_h_to_4h"]
    model = quantize(tiny_bloom(hidden_size=64), targets, kind)
    quantized_type = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    assert sum(isinstance(m, quantized_type) for m in model.modules()) == 4
    expected_weight_dtype = torch.int8 if kind == "int8" else torch.uint8
    assert model.transformer.h[0].self_attention.query_key_value.weight.dtype == expected_weight_dtype

    lora = LoraModelForCasualLM(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    assert all(isinstance(layer.base_layer, quantized_type) for _, layer in lora.lora_layers())
    adapter = [p for p in lora.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(adapter, lr=1e-2)
    inputs = batch(shape=(2, 16))
    losses = []
    for _ in range(6):
        loss = lora(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02, losses

    w0 = {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_" not in n}
    for merge in (lora.merge_adapter, lora.merge_and_unload):
        with pytest.raises(ValueError, match="quantized"):
            merge()
    assert all(torch.equal(p, w0[n]) for n, p in lora.named_parameters() if "lora_" not in n)
    assert len(list(lora.lora_layers())) == 4


# --- 5. parameter counts at BLOOM-1b7's real shape -------------------------------------------------------------

def test_parameter_counts_and_printout_equal_peft_for_bloom_1b7(capsys):
    config = BloomConfig(vocab_size=250880, hidden_size=2048, n_layer=24, n_head=16)
    with torch.device("meta"):  # shapes only: no download, no memory
        ours = LoraModelForCasualLM(BloomForCausalLM(config), LoraConfig(r=8, target_modules=["query_key_value"]))
        ref = peft.get_peft_model(BloomForCausalLM(config), peft.LoraConfig(r=8, target_modules=["query_key_value"]))
    # 24 layers x (A: 8 x 2048 + B: 6144 x 8) = 24 x 65,536.
    assert ours.get_nb_trainable_parameters()[0] == 1_572_864
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()

    capsys.readouterr()
    ref.print_trainable_parameters()
    expected = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == expected
    assert expected.startswith("trainable params: 1,572,864 || all params: ")


# --- the benchmark still runs ----------------------------------------------------------------------------------------

def test_bench_lora_runs_and_writes_its_table(tmp_path, capsys):
    """bench/bench_lora.py end to end on a toy shape: ours and PEFT agree, every variant is timed, the table (with
    the spread of the per-round ratios) is written with its command on top."""
    from bench import bench_lora

    out = tmp_path / "lora.md"
    bench_lora.main(["--hidden", "32", "--layers", "1", "--heads", "4", "--vocab", "64", "--batch", "1", "--seq",
                     "8", "--repeats", "4", "--layer-repeats", "4", "--warmup", "0", "--threads", "1",
                     "--out", str(out)])
    table = out.read_text()
    assert table.strip() in capsys.readouterr().out
    assert "Reproduce: `python bench/bench_lora.py --hidden 32 " in table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| fp32") or line.startswith("| bf16")]
    assert len(rows) == 4  # whole model and one layer, two precisions each
    for row in rows:
        low, high = (float(v) for v in row[5].split("-"))
        assert 0 < low <= float(row[4]) <= high  # the median lies in the middle half
    assert not list(tmp_path.glob("*.tmp"))


def test_bench_lora_vs_full_runs_and_writes_its_table(tmp_path, capsys):
    """bench/bench_lora_vs_full.py on a toy shape: both variants timed; LoRA's gradients and AdamW state are a small
    fraction of full fine-tuning's."""
    from bench import bench_lora_vs_full

    out = tmp_path / "lora_vs_full.md"
    bench_lora_vs_full.main(["--hidden", "32", "--layers", "1", "--heads", "4", "--vocab", "64", "--batch", "1",
                             "--seq", "8", "--repeats", "2", "--warmup", "0", "--threads", "1", "--out", str(out)])
    table = out.read_text()
    assert table.strip() in capsys.readouterr().out
    assert "Reproduce: `python bench/bench_lora_vs_full.py --hidden 32 " in table
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines()
            if line.startswith("| full") or line.startswith("| lora")}
    assert set(rows) == {"full", "lora"}
    full_grads, lora_grads = (float(rows[name][3].replace(",", "")) for name in ("full", "lora"))
    assert lora_grads < full_grads / 5 and full_grads > 0  # MiB with one decimal: LoRA's may print as 0.0
    assert "LoRA r=8 on query_key_value trains 1,572,864 parameters" in table  # BLOOM-1.7B, on the meta device
