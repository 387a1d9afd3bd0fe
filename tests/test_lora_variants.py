"""DoRA (`use_dora=True`) and PiSSA (`init_lora_weights="pissa"`, `"pissa_niter_N"`) against PEFT 0.21.

As in test_lora_model.py, PEFT only builds a twin: the same base weights (a deep copy) and the same adapter values
(copied across by parameter name), on a tiny BLOOM and a tiny Llama. B is random (init_lora_weights=False) and the
magnitude is moved off its initial value wherever the DoRA terms must matter. The end-to-end runs of train.py
(`USE_DORA=true`, `INIT_LORA_WEIGHTS=pissa`) are in the slow tier.
"""

import copy
import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

from lora_layer import Linear
from lora_model import LoraConfig, LoraModelForCasualLM

MAX_DIFF = 1e-5  # float32 bar for logits, gradients and PiSSA's factors against PEFT
VOCAB = 256
ARCHS = {
    "bloom": (lambda: BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
              ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, max_position_embeddings=64)),
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}


def tiny(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ARCHS[arch][0]().eval()


def batch(seed: int = 1, shape=(2, 12)) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def ours_name(peft_name: str) -> str:
    """PEFT's in-memory name -> ours (`lora_magnitude_vector.default.weight` is our parameter itself)."""
    name = peft_name.removeprefix("base_model.model.").replace(".default", "")
    return "model." + name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def lora_params(model: nn.Module, rename=lambda n: n) -> dict[str, torch.Tensor]:
    return {rename(n): p for n, p in model.named_parameters() if "lora_" in n}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def lora_kwargs(arch: str, **overrides) -> dict:
    # alpha / r = 3: a scaling that rounds, as in test_lora_model.py
    return {**dict(r=4, lora_alpha=12, lora_dropout=0.0, target_modules=ARCHS[arch][1], init_lora_weights=False,
                   use_dora=True), **overrides}


def dora_pair(arch: str, **overrides) -> tuple[LoraModelForCasualLM, peft.PeftModel]:
    """(ours, PEFT twin) with DoRA, random A and B, and a magnitude moved off ||W0 + s B A|| (so m / norm != 1)."""
    base = tiny(arch)
    base_copy = copy.deepcopy(base)
    kwargs = lora_kwargs(arch, **overrides)
    ours = LoraModelForCasualLM(base, LoraConfig(**kwargs))
    ref = peft.get_peft_model(base_copy, peft.LoraConfig(**kwargs))
    ours_params, ref_params = lora_params(ours), lora_params(ref, ours_name)
    assert ours_params.keys() == ref_params.keys()
    with torch.no_grad():
        for name, param in ours_params.items():
            if name.endswith("lora_magnitude_vector"):
                # Both initialised m = ||W0 + s B A|| from their own random A, B: compare after copying A, B.
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=torch.Generator().manual_seed(3)))
            ref_params[name].copy_(param)
    return ours, ref


def magnitude_layers(model: LoraModelForCasualLM) -> list[Linear]:
    return [layer for _, layer in model.lora_layers() if layer.use_dora]


# --- DoRA: forward, gradients, dropout ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_dora_logits_and_gradients_equal_peft(arch):
    ours, ref = dora_pair(arch)
    inputs = batch()
    base_logits = tiny(arch)(**inputs).logits
    ours.train()
    ref.train()
    out, ref_out = ours(**inputs), ref(**inputs)
    assert max_diff(out.logits, base_logits) > 1e-2, "the adapter must change the logits"
    assert max_diff(out.logits, ref_out.logits) <= MAX_DIFF
    out.loss.backward()
    ref_out.loss.backward()
    grads = {n: p.grad for n, p in lora_params(ours).items()}
    ref_grads = {n: p.grad for n, p in lora_params(ref, ours_name).items()}
    assert grads.keys() == ref_grads.keys()
    assert sum(n.endswith("lora_magnitude_vector") for n in grads) == 2 * len(ARCHS[arch][1])
    for name, grad in grads.items():
        assert grad is not None and grad.abs().max() > 0, name
        assert max_diff(grad, ref_grads[name]) <= MAX_DIFF, name
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)


def test_dora_without_the_detached_norm_would_differ_from_peft():
    """Positive control for the gradient bar: DoRA with the norm in the graph (the paper's eq. 5 without section
    4.3's detach) gives other gradients, so the equality above says something about the detach."""
    ours, ref = dora_pair("bloom")
    inputs = batch()
    layer = magnitude_layers(ours)[0]

    def norm_in_graph(x, result):
        weight = layer.base_layer.weight
        combined = weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
        factor = layer.lora_magnitude_vector / torch.linalg.norm(combined, dim=1)
        return nn.functional.linear(x, factor.view(-1, 1) * combined) - (result - layer.base_layer.bias)

    layer._dora_update = norm_in_graph
    ours(**inputs).loss.backward()
    ref(**inputs).loss.backward()
    ref_a = dict(lora_params(ref, ours_name))
    name = next(n for n, p in ours.named_parameters() if p is layer.lora_A.weight)
    assert max_diff(layer.lora_A.weight.grad, ref_a[name].grad) > 1e-4


@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_dora_with_dropout_equals_peft_under_the_same_masks(arch):
    """With dropout on, PEFT feeds the dropped-out input to both W0 and B A inside the DoRA term; the same seed gives
    both models the same masks (one draw per layer, in the same order), so the logits and gradients must agree."""
    ours, ref = dora_pair(arch, lora_dropout=0.3)
    inputs = batch()
    ours.train()
    ref.train()
    torch.manual_seed(11)
    out = ours(**inputs)
    torch.manual_seed(11)
    ref_out = ref(**inputs)
    assert max_diff(out.logits, ref_out.logits) <= MAX_DIFF
    out.loss.backward()
    ref_out.loss.backward()
    ref_grads = lora_params(ref, ours_name)
    for name, param in lora_params(ours).items():
        assert max_diff(param.grad, ref_grads[name].grad) <= MAX_DIFF, name
    torch.manual_seed(12)  # another mask: another output, so dropout is really on
    assert max_diff(ours(**inputs).logits, out.logits) > 1e-4
    ours.eval()
    ref.eval()
    assert max_diff(ours(**inputs).logits, ref(**inputs).logits) <= MAX_DIFF


@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_dora_default_init_equals_peft_and_starts_at_the_base_model(arch):
    base = tiny(arch)
    inputs = batch()
    base_logits = base(**inputs).logits
    kwargs = lora_kwargs(arch, init_lora_weights=True)
    torch.manual_seed(5)
    ours = LoraModelForCasualLM(copy.deepcopy(base), LoraConfig(**kwargs))
    torch.manual_seed(5)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ref_params = lora_params(ref, ours_name)
    for name, param in lora_params(ours).items():
        assert param.dtype == torch.float32
        assert max_diff(param, ref_params[name]) <= MAX_DIFF, name  # A from the same draws, B = 0, m = ||W0||
    for layer in magnitude_layers(ours):
        expected = torch.linalg.norm(layer.base_layer.weight.double(), dim=1)
        assert max_diff(layer.lora_magnitude_vector, expected) <= 1e-6
    assert max_diff(ours(**inputs).logits, base_logits) <= MAX_DIFF


# --- DoRA: merge, disable, half precision ---------------------------------------------------------------------

def base_weights(model: LoraModelForCasualLM) -> dict[str, torch.Tensor]:
    return {name: layer.base_layer.weight.detach().clone() for name, layer in model.lora_layers()}


def magnitudes(model: LoraModelForCasualLM) -> dict[str, torch.Tensor]:
    return {name: layer.lora_magnitude_vector.detach().clone() for name, layer in model.lora_layers()}


@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_dora_merge_equals_unmerged_and_peft_and_unmerge_restores_w0(arch):
    ours, ref = dora_pair(arch)
    inputs = batch()
    w0, m0 = base_weights(ours), magnitudes(ours)
    unmerged = ours(**inputs).logits
    ours.merge_adapter()
    ref.merge_adapter()
    merged = ours(**inputs).logits
    assert max_diff(merged, unmerged) <= MAX_DIFF
    assert max(max_diff(w0[n], w) for n, w in base_weights(ours).items()) > 1e-3, "merging changed the weights"
    ref_weights = {n.removeprefix("base_model.model."): m.base_layer.weight for n, m in ref.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, weight in base_weights(ours).items():
        assert max_diff(weight, ref_weights[name]) <= MAX_DIFF, name
    with pytest.warns(UserWarning, match="already merged"):
        ours.merge_adapter()  # idempotent: a second merge changes nothing
    assert torch.equal(ours(**inputs).logits, merged)
    ours.unmerge_adapter()
    for name, weight in base_weights(ours).items():
        assert max_diff(weight, w0[name]) <= 1e-6, name
    for name, magnitude in magnitudes(ours).items():
        assert torch.equal(magnitude, m0[name]), name
    with pytest.warns(UserWarning, match="not merged"):
        ours.unmerge_adapter()
    assert max_diff(ours(**inputs).logits, unmerged) <= MAX_DIFF


def test_dora_merge_and_disable_on_gpt2_conv1d_layout():
    """Conv1D stores W0 as (in x out): the norm and m / norm must follow the output features there too."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    kwargs = dict(r=4, lora_alpha=12, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                  init_lora_weights=False, use_dora=True)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    base_logits = base(**batch()).logits
    ours = LoraModelForCasualLM(base, LoraConfig(**kwargs))
    with torch.no_grad():
        for name, param in lora_params(ref, ours_name).items():
            param.copy_(lora_params(ours)[name])
    inputs = batch()
    logits = ours(**inputs).logits
    assert max_diff(logits, ref(**inputs).logits) <= MAX_DIFF
    with ours.disable_adapter():
        assert torch.equal(ours(**inputs).logits, base_logits)
    ours.merge_adapter()
    assert max_diff(ours(**inputs).logits, logits) <= MAX_DIFF


def test_dora_disable_adapter_gives_exactly_the_base_logits():
    ours, _ = dora_pair("llama")
    inputs = batch()
    base_logits = tiny("llama")(**inputs).logits
    assert max_diff(ours(**inputs).logits, base_logits) > 1e-2
    with ours.disable_adapter():
        assert torch.equal(ours(**inputs).logits, base_logits)
    ours.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging"), ours.disable_adapter():
        assert max_diff(ours(**inputs).logits, base_logits) <= MAX_DIFF


def test_dora_on_a_bfloat16_base_keeps_float32_adapter_and_follows_peft():
    base = tiny("bloom").to(torch.bfloat16)
    kwargs = lora_kwargs("bloom")
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = LoraModelForCasualLM(base, LoraConfig(**kwargs))
    with torch.no_grad():
        for name, param in lora_params(ref, ours_name).items():
            param.copy_(lora_params(ours)[name])
    assert {p.dtype for p in lora_params(ours).values()} == {torch.float32}
    inputs = batch()
    out = ours(**inputs)
    assert out.logits.dtype == torch.bfloat16
    assert max_diff(out.logits, ref(**inputs).logits) <= 2e-2  # bf16 logits of size ~1: a few ulps
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_params(ours).values())


def test_dora_is_refused_on_embeddings_and_quantized_bases():
    with pytest.raises(ValueError, match="use_dora=True is implemented for Linear layers only"):
        LoraModelForCasualLM(tiny("bloom"), LoraConfig(r=4, target_modules=["word_embeddings"], use_dora=True))
    with pytest.raises(ValueError, match="PiSSA.*Linear layers only"):
        LoraModelForCasualLM(tiny("bloom"), LoraConfig(r=4, target_modules=["word_embeddings"],
                                                        init_lora_weights="pissa"))


# --- DoRA: saved adapters --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for arch in ARCHS:
        folders[arch] = tmp_path_factory.mktemp(f"base-{arch}")
        tiny(arch).save_pretrained(folders[arch])
    return folders


def load_base(path: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_dora_adapter_saved_by_us_loads_in_peft_and_peft_s_in_ours(arch, base_dirs, tmp_path):
    base_dir = base_dirs[arch]
    inputs = batch()
    ours, ref = dora_pair(arch)
    # the pair's base is tiny(arch), the same weights as base_dir's
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    saved, ref_saved = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert saved.keys() == ref_saved.keys()
    assert any(key.endswith(".lora_magnitude_vector") for key in saved)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["use_dora"], config["init_lora_weights"]) == (True, False)

    logits = ours.eval()(**inputs).logits
    loaded_in_peft = peft.PeftModel.from_pretrained(load_base(base_dir), tmp_path / "ours").eval()
    assert max_diff(loaded_in_peft(**inputs).logits, logits) <= MAX_DIFF
    loaded_in_ours = LoraModelForCasualLM.from_pretrained(load_base(base_dir), tmp_path / "peft")
    assert max_diff(loaded_in_ours(**inputs).logits, ref.eval()(**inputs).logits) <= MAX_DIFF
    assert max_diff(loaded_in_ours(**inputs).logits, logits) <= MAX_DIFF


def test_dora_adapter_without_its_magnitude_is_refused_naming_the_key(base_dirs, tmp_path):
    from safetensors.torch import save_file

    ours, _ = dora_pair("bloom")
    ours.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    dropped = next(key for key in tensors if key.endswith("lora_magnitude_vector"))
    del tensors[dropped]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"missing \\[.*{dropped}"):
        LoraModelForCasualLM.from_pretrained(load_base(base_dirs["bloom"]), tmp_path)


# --- PiSSA ----------------------------------------------------------------------------------------------------

def sign_aligned(ours: torch.Tensor, ref: torch.Tensor, dim: int) -> torch.Tensor:
    """`ours` with each singular vector (row of A: dim=1, column of B: dim=0) flipped to the sign of `ref`'s."""
    signs = torch.sign((ours * ref).sum(dim=dim, keepdim=True))
    return ours * signs


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_pissa_factors_and_residual_equal_peft(arch, init):
    """Same base and the same torch seed before each: A, B and the residual weight equal PEFT's. svd_lowrank draws
    its random start from torch's generator, and both draw the same numbers before it (A and B's nn.Linear init)."""
    base = tiny(arch)
    inputs = batch()
    base_logits = base(**inputs).logits
    kwargs = lora_kwargs(arch, init_lora_weights=init, use_dora=False)
    torch.manual_seed(7)
    ours = LoraModelForCasualLM(copy.deepcopy(base), LoraConfig(**kwargs))
    torch.manual_seed(7)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ref_params = lora_params(ref, ours_name)
    for name, param in lora_params(ours).items():
        assert param.abs().max() > 1e-3, name  # not the default B = 0
        assert max_diff(param, ref_params[name]) <= MAX_DIFF, name
    ref_weights = {n.removeprefix("base_model.model."): m.base_layer.weight for n, m in ref.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    original = dict(base.named_modules())
    for name, layer in ours.lora_layers():
        assert max_diff(layer.base_layer.weight, ref_weights[name]) <= MAX_DIFF, name
        assert max_diff(layer.base_layer.weight, original[name].weight) > 1e-3, "the weight is now the residual"
    # W_res + s B A = W0: the PiSSA model starts at the base model.
    assert max_diff(ours(**inputs).logits, base_logits) <= MAX_DIFF


def test_pissa_full_svd_gives_the_top_singular_triplets():
    """Independent of PEFT: s B A is W0's best rank-r approximation (fp64 SVD), and A's rows are orthogonal."""
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    w0 = base.weight.detach().double().clone()
    layer = Linear(base, r=4, lora_alpha=12, init_lora_weights="pissa")
    u, s, vh = torch.linalg.svd(w0)
    best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    ba = layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    assert max_diff(ba, best) <= 1e-5
    assert max_diff(layer.base_layer.weight, w0 - best) <= 1e-5
    gram = layer.lora_A.weight.double() @ layer.lora_A.weight.double().T
    assert max_diff(gram, torch.diag(s[:4] / layer.scaling)) <= 1e-5


def trained(model: nn.Module, seed: int = 4) -> None:
    """Move A, B (and a DoRA magnitude) as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(lora_params(model).items()):
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_pissa_converted_adapter_on_the_original_base_gives_the_pissa_logits(arch, base_dirs, tmp_path):
    """PEFT's recipe: save the adapter right after init, train, save with path_initial_model_for_weight_conversion.
    The rank-2r LoRA adapter then loads on the ORIGINAL base, in PEFT and in ours, with the trained PiSSA model's
    logits; and it equals the adapter PEFT's own conversion writes from the same model."""
    inputs = batch()
    kwargs = lora_kwargs(arch, init_lora_weights="pissa", use_dora=False)
    ours = LoraModelForCasualLM(load_base(base_dirs[arch]), LoraConfig(**kwargs))
    ref = peft.get_peft_model(load_base(base_dirs[arch]), peft.LoraConfig(**kwargs))
    ours.save_pretrained(tmp_path / "init")
    ref.save_pretrained(tmp_path / "peft-init")
    trained(ours)
    trained(ref, seed=4)
    pissa_logits = ours(**inputs).logits
    ours.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_pretrained(tmp_path / "peft-lora", path_initial_model_for_weight_conversion=tmp_path / "peft-init")

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    ref_config = json.loads((tmp_path / "peft-lora" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "init_lora_weights"):
        assert config[field] == ref_config[field], field
    assert (config["r"], config["init_lora_weights"]) == (8, True)
    saved, ref_saved = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("lora", "peft-lora"))
    assert saved.keys() == ref_saved.keys()
    for key, tensor in saved.items():
        assert max_diff(tensor, ref_saved[key]) <= MAX_DIFF, key

    in_peft = peft.PeftModel.from_pretrained(load_base(base_dirs[arch]), tmp_path / "lora").eval()
    assert max_diff(in_peft(**inputs).logits, pissa_logits) <= MAX_DIFF
    in_ours = LoraModelForCasualLM.from_pretrained(load_base(base_dirs[arch]), tmp_path / "lora")
    assert max_diff(in_ours(**inputs).logits, pissa_logits) <= MAX_DIFF
    assert max_diff(pissa_logits, load_base(base_dirs[arch])(**inputs).logits) > 1e-2  # training did something


def test_pissa_with_dora_converts_with_its_magnitude(base_dirs, tmp_path):
    """DoRA's norm is of W_res + s B A = W0 + s (B A - B0 A0), the converted adapter's weight: the magnitude
    carries over unchanged (PEFT's conversion drops it, so this is checked against our unconverted model)."""
    inputs = batch()
    kwargs = lora_kwargs("bloom", init_lora_weights="pissa_niter_2")
    ours = LoraModelForCasualLM(load_base(base_dirs["bloom"]), LoraConfig(**kwargs))
    initial = {k: v.clone() for k, v in ours.adapter_state_dict().items()}
    trained(ours)
    logits = ours(**inputs).logits
    ours.save_pretrained(tmp_path, initial_state_dict=initial)
    loaded = LoraModelForCasualLM.from_pretrained(load_base(base_dirs["bloom"]), tmp_path)
    assert max_diff(loaded(**inputs).logits, logits) <= MAX_DIFF


def test_pissa_conversion_with_another_initial_adapter_is_refused(base_dirs, tmp_path):
    ours = LoraModelForCasualLM(load_base(base_dirs["bloom"]), LoraConfig(**lora_kwargs(
        "bloom", init_lora_weights="pissa", use_dora=False)))
    other = LoraModelForCasualLM(load_base(base_dirs["bloom"]), LoraConfig(r=2, target_modules=["dense"]))
    other.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="initial adapter.*does not fit.*lora_A.weight"):
        ours.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "out").exists()


def test_pissa_is_refused_on_a_non_float_weight():
    base = nn.Linear(8, 8)
    base.weight.data = base.weight.data.to(torch.float64)
    with pytest.raises(ValueError, match="PiSSA needs a float32/float16/bfloat16 base weight"):
        Linear(base, r=2, init_lora_weights="pissa")


# --- train.py end to end (slow) -------------------------------------------------------------------------------

def check_variant_run(out: Path, pissa: bool) -> dict:
    """A finished `DEBUG=true` run in `out`: its eval loss fell, and PEFT loads its adapter (on the original base)
    with our model's logits. Ours: the adapter loaded by from_pretrained, or for PiSSA the trained PiSSA model itself
    (the residual base + the last checkpoint's A and B, rebuilt as a resumed run would), which the converted adapter
    must reproduce, to MAX_DIFF relative to the largest logit. Returns the figures (bench/results and the report
    quote them)."""
    from conftest import TINY_BLOOM, metric_rows

    evals = [row["eval_loss"] for row in metric_rows(out) if "eval_loss" in row]
    assert len(evals) >= 2 and evals[-1] < evals[0], evals
    checkpoint = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    ids = torch.tensor([[1, 100, 200, 300, 400, 500, 600]])
    with torch.no_grad():
        base_logits = load_base(TINY_BLOOM)(input_ids=ids).logits
        in_peft = peft.PeftModel.from_pretrained(load_base(TINY_BLOOM), out).eval()(input_ids=ids).logits
        ours = LoraModelForCasualLM.from_pretrained(load_base(TINY_BLOOM), checkpoint if pissa else out)
        our_logits = ours(input_ids=ids).logits
    # Relative to the logits' scale: for PiSSA the two sides round differently (residual base + B·A vs the
    # original base + the rank-2r adapter), and the absolute float32 rounding of logits near 10 varies with the
    # thread count and the order of the reductions (6e-6 to 1.5e-5 seen).
    scale = our_logits.abs().max().item()
    figures = {"evals": evals, "peft_vs_ours": max_diff(in_peft, our_logits) / scale,
               "adapter_vs_base": max_diff(our_logits, base_logits)}
    assert figures["peft_vs_ours"] <= MAX_DIFF, figures
    assert figures["adapter_vs_base"] > 1e-4, figures  # the adapter did something
    return figures


@pytest.mark.slow
@pytest.mark.parametrize("setting", [{"USE_DORA": "true"}, {"INIT_LORA_WEIGHTS": "pissa"}], ids=["dora", "pissa"])
def test_debug_run_with_a_variant_learns_and_its_adapter_loads_in_peft(tmp_path, setting):
    """`USE_DORA=true DEBUG=true MODEL_PATH=models/tiny-bloom python train.py` (and INIT_LORA_WEIGHTS=pissa), as
    typed, shortened to 10 steps of 2 x 4 examples of at most 128 tokens, evaluated at steps 5 and 10 on 32
    examples: exit 0, the eval loss falls, the adapter in OUTPUT_DIR loads in PEFT with our logits (PiSSA: converted
    to a rank-16 LoRA adapter for the original base)."""
    from test_train import user_command

    result = user_command(tmp_path, DEBUG="true", MODEL_PATH="models/tiny-bloom", MAX_STEPS="10", EVAL_FREQ="5",
                          WARMUP_STEPS="2", SIZE_VALID_SET="32", MAX_LENGTH="128", GRAD_ACCUM_STEPS="2", **setting)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "outputs" / "debug"
    config = json.loads((out / "adapter_config.json").read_text())
    pissa = "INIT_LORA_WEIGHTS" in setting
    assert (config["use_dora"], config["r"], config["init_lora_weights"]) == (not pissa, 16 if pissa else 8, True)
    check_variant_run(out, pissa)


# --- train.py's settings -------------------------------------------------------------------------------------

def test_settings_are_validated_and_passed_on_and_part_of_the_run_identity():
    from support.checkpoint import resume_conflicts, run_identity
    from support.config import ConfigError, load_config

    cfg = load_config([], {"USE_DORA": "yes", "INIT_LORA_WEIGHTS": "PiSSA_niter_4"})
    assert (cfg.use_dora, cfg.init_lora_weights, cfg.lora_init) == (True, "pissa_niter_4", "pissa_niter_4")
    assert load_config([], {}).lora_init is True  # the default LoRA init, as before
    assert load_config(["--init-lora-weights", "gaussian"], {}).lora_init == "gaussian"
    for bad in ("olora", "pissa_niter_", "pissa_niter_x", "false"):
        with pytest.raises(ConfigError, match=f"^INIT_LORA_WEIGHTS must be true, gaussian, pissa or "
                                              f"pissa_niter_<N> .*got '{bad}'"):
            load_config([], {"INIT_LORA_WEIGHTS": bad})
    with pytest.raises(ConfigError, match="^USE_DORA must be one of"):
        load_config([], {"USE_DORA": "maybe"})
    for setting, named in (({"USE_DORA": "true"}, "USE_DORA=true"),
                           ({"INIT_LORA_WEIGHTS": "pissa"}, "INIT_LORA_WEIGHTS=pissa")):
        with pytest.raises(ConfigError, match=f"^QUANTIZE=4bit and {named}: DoRA and PiSSA need"):
            load_config([], {"QUANTIZE": "4bit", **setting})

    plain = run_identity(load_config([], {}), 1, "data")
    dora = run_identity(cfg, 1, "data")
    assert resume_conflicts(plain, dora) == ["USE_DORA is True here but False in the checkpoint",
                                             "INIT_LORA_WEIGHTS is 'pissa_niter_4' here but 'true' in the "
                                             "checkpoint"]
    older = {k: v for k, v in plain.items() if k not in ("use_dora", "init_lora_weights")}
    assert resume_conflicts(older, plain) == []  # a checkpoint from before these settings had the defaults


@pytest.mark.slow  # three whole training runs
def test_resume_of_a_dora_pissa_run_continues_exactly(tmp_path):
    """A run with USE_DORA=true and INIT_LORA_WEIGHTS=pissa_niter_2 (a randomized SVD: the resumed run must draw
    the same start from SEED) stopped after step 2 and resumed from checkpoint-2 ends where the straight run ends:
    the same checkpoint (PiSSA's own A, B and the magnitude) and the same converted final adapter (rank 2r)."""
    import train
    from conftest import SAMPLE, adapter_tensors
    from test_train import tiny_config

    data = tmp_path / "small.json"
    data.write_text(json.dumps(json.loads(SAMPLE.read_text(encoding="utf-8"))[:40]), encoding="utf-8")
    settings = dict(max_steps=4, save_steps=2, lora_dropout=0.05, use_dora=True,
                    init_lora_weights="pissa_niter_2")
    straight = tiny_config(tmp_path / "straight", data, **settings)
    train.run(straight, train.DistEnv())
    checkpoint = Path(straight.output_dir) / "checkpoint-2"
    resumed = tiny_config(tmp_path / "resumed", data, resume_from=str(checkpoint), **settings)
    train.run(resumed, train.DistEnv())
    for folder in ("checkpoint-4", "."):
        a = adapter_tensors(Path(straight.output_dir) / folder)
        b = adapter_tensors(Path(resumed.output_dir) / folder)
        assert a.keys() == b.keys() and any("magnitude" in k for k in a)
        assert max(max_diff(a[k], b[k]) for k in a) <= 1e-6, folder
    final = json.loads((Path(resumed.output_dir) / "adapter_config.json").read_text())
    assert (final["r"], final["init_lora_weights"], final["use_dora"]) == (16, True, True)
