"""Layer-level tests of lora_layer.py against plain float64 math.

Every expected value is computed here from the definitions in the LoRA paper, in float64, from the layer's own
A, B and W0 tensors; nothing calls lora_layer.py to compute what lora_layer.py should return. Tests that touch
merging use random B (init_lora_weights=False), so B A != 0 and a merge that did nothing would fail.
"""

import math
import re

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from lora_layer import Embedding, Linear


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def linear_reference(x, weight, bias, lora_a, lora_b, scaling):
    """h = x W0^T + b + s (x A^T B^T), in float64; W0 is (out, in) as in nn.Linear."""
    x = f64(x)
    return x @ f64(weight).T + f64(bias) + scaling * (x @ f64(lora_a).T @ f64(lora_b).T)


def random_linear(in_features=48, out_features=40, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


# --- forward against fp64 math -----------------------------------------------------------------------------------

@pytest.mark.parametrize("use_rslora", [False, True])
def test_linear_forward_matches_fp64_math(use_rslora):
    base = random_linear()
    layer = Linear(base, r=4, lora_alpha=8, init_lora_weights=False, use_rslora=use_rslora)
    x = torch.randn(3, 5, 48)

    scaling = 8 / math.sqrt(4) if use_rslora else 8 / 4
    expected = linear_reference(x, base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight, scaling)
    base_only = f64(x) @ f64(base.weight).T + f64(base.bias)

    assert (expected - base_only).abs().max() > 0.1, "the update must be visible, or this test proves nothing"
    assert (layer(x).double() - expected).abs().max() <= 1e-5


def test_linear_reuses_the_base_weight_tensor():
    base = random_linear()
    layer = Linear(base, r=4)
    assert layer.base_layer is base
    assert layer.base_layer.weight.data_ptr() == base.weight.data_ptr()
    assert layer.lora_A.weight.shape == (4, 48) and layer.lora_B.weight.shape == (40, 4)


@pytest.mark.parametrize("r, alpha", [(16, 8), (4, 32)])
def test_rslora_scaling_is_alpha_over_sqrt_r(r, alpha):
    base = random_linear()
    assert Linear(base, r=r, lora_alpha=alpha, use_rslora=True).scaling == pytest.approx(alpha / math.sqrt(r))
    assert Linear(base, r=r, lora_alpha=alpha, use_rslora=False).scaling == pytest.approx(alpha / r)
    emb = nn.Embedding(10, 6)
    assert Embedding(emb, r=r, lora_alpha=alpha, use_rslora=True).scaling == pytest.approx(alpha / math.sqrt(r))


def random_conv1d(in_features=24, out_features=36, seed=0) -> Conv1D:
    torch.manual_seed(seed)
    conv = Conv1D(out_features, in_features)  # GPT-2's argument order: (nf=out, nx=in); weight is (in, out)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    return conv


def test_conv1d_fan_in_fan_out_forward_and_merge():
    conv = random_conv1d()
    assert conv.weight.shape == (24, 36)
    layer = Linear(conv, r=4, lora_alpha=8, fan_in_fan_out=True, init_lora_weights=False)
    w0 = conv.weight.detach().clone()
    a, b, s = f64(layer.lora_A.weight), f64(layer.lora_B.weight), 8 / 4
    assert a.shape == (4, 24) and b.shape == (36, 4)
    x = torch.randn(2, 7, 24)

    # Conv1D computes x W + b with W stored (in, out): no transpose on the base path.
    expected = f64(x) @ f64(w0) + f64(conv.bias) + s * (f64(x) @ a.T @ b.T)
    assert (layer(x).double() - expected).abs().max() <= 1e-5

    layer.merge()
    # The update has to be transposed into the (in, out) layout: W = W0 + s (B A)^T.
    assert (f64(conv.weight) - (f64(w0) + s * (b @ a).T)).abs().max() <= 1e-6
    assert (layer(x).double() - expected).abs().max() <= 1e-5
    layer.unmerge()
    assert (conv.weight - w0).abs().max() <= 1e-6


def test_conv1d_with_wrong_fan_in_fan_out_flag_is_corrected_with_a_warning():
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        layer = Linear(random_conv1d(), r=2, fan_in_fan_out=False)
    assert layer.fan_in_fan_out is True
    assert (layer.in_features, layer.out_features) == (24, 36)


def test_embedding_forward_matches_fp64_math():
    torch.manual_seed(0)
    base = nn.Embedding(50, 24)
    layer = Embedding(base, r=4, lora_alpha=8, init_lora_weights=False)
    ids = torch.randint(0, 50, (3, 7))
    a, b = f64(layer.lora_embedding_A), f64(layer.lora_embedding_B)
    assert a.shape == (4, 50) and b.shape == (24, 4)

    # E = E0 + s (B A)^T, looked up row by row: row i of (B A)^T is A[:, i]^T B^T.
    expected = f64(base.weight)[ids] + (8 / 4) * (a.T[ids] @ b.T)
    assert (expected - f64(base.weight)[ids]).abs().max() > 0.1
    assert (layer(ids).double() - expected).abs().max() <= 1e-5


def test_embedding_merge_and_unmerge():
    torch.manual_seed(0)
    base = nn.Embedding(50, 24)
    layer = Embedding(base, r=4, lora_alpha=8, init_lora_weights=False)
    with torch.no_grad():
        # N(0, 1) A and B give updates up to ~15, where one float32 ulp is already ~1e-6; a trained update is
        # far smaller than the table, so scale it to that regime for the 1e-6 restore bound.
        layer.lora_embedding_A.mul_(0.1)
    w0 = base.weight.detach().clone()
    ids = torch.randint(0, 50, (3, 7))
    unmerged = layer(ids).detach()
    layer.merge()
    expected_weight = f64(w0) + 2.0 * (f64(layer.lora_embedding_B) @ f64(layer.lora_embedding_A)).T
    assert (f64(base.weight) - expected_weight).abs().max() <= 1e-6
    assert (layer(ids) - unmerged).abs().max() <= 1e-5
    layer.unmerge()
    assert (base.weight - w0).abs().max() <= 1e-6


# --- initialisation -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", [True, "gaussian"])
def test_default_inits_start_exactly_at_the_base_layer(init):
    base = random_linear()
    layer = Linear(base, r=4, init_lora_weights=init)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.lora_A.weight) == layer.lora_A.weight.numel()
    x = torch.randn(5, 48)
    assert torch.equal(layer(x), base(x))

    emb = nn.Embedding(30, 16)
    emb_layer = Embedding(emb, r=4, init_lora_weights=init)
    # Roles swapped for embeddings: A is zero, B random.
    assert torch.count_nonzero(emb_layer.lora_embedding_A) == 0
    assert torch.count_nonzero(emb_layer.lora_embedding_B) == emb_layer.lora_embedding_B.numel()
    ids = torch.randint(0, 30, (4, 6))
    assert torch.equal(emb_layer(ids), emb(ids))


def test_gaussian_init_has_std_one_over_r():
    torch.manual_seed(0)
    r, in_features = 8, 2048
    layer = Linear(nn.Linear(in_features, 64), r=r, init_lora_weights="gaussian")
    a = f64(layer.lora_A.weight)
    n = a.numel()
    # Sample std of n normal draws has relative standard error ~ 1/sqrt(2n) = 0.8% here; allow 5%.
    assert a.std().item() == pytest.approx(1 / r, rel=0.05)
    assert abs(a.mean().item()) < 5 * (1 / r) / math.sqrt(n)
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_default_init_is_kaiming_uniform_like_nn_linear():
    torch.manual_seed(0)
    in_features = 1024
    a = f64(Linear(nn.Linear(in_features, 64), r=8).lora_A.weight)
    # kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), whose std is bound / sqrt(3).
    bound = 1 / math.sqrt(in_features)
    assert a.abs().max().item() <= bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


# --- validation ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"r": 0}, "r"), ({"r": -2}, "r"), ({"r": 2.5}, "r"), ({"r": True}, "r"),
    ({"lora_alpha": 0}, "lora_alpha"), ({"lora_alpha": -1.0}, "lora_alpha"), ({"lora_alpha": "8"}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"), ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"init_lora_weights": "olora"}, "init_lora_weights"),
    ({"init_lora_weights": "pissa_niter_"}, "init_lora_weights"),
])
def test_bad_options_raise_value_error_naming_the_field(kwargs, field):
    value = next(iter(kwargs.values()))
    pattern = rf"\b{field}\b.*{re.escape(repr(value))}"
    with pytest.raises(ValueError, match=pattern):
        Linear(random_linear(), **kwargs)
    with pytest.raises(ValueError, match=pattern):
        Embedding(nn.Embedding(10, 4), **kwargs)


def test_unsupported_base_layers_are_refused():
    with pytest.raises(ValueError, match="Conv2d"):
        Linear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="Linear"):
        Embedding(random_linear())


# --- merge ------------------------------------------------------------------------------------------------------

def test_linear_merge_equals_unmerged_and_unmerge_restores_w0():
    base = random_linear()
    layer = Linear(base, r=4, lora_alpha=8, init_lora_weights=False)
    w0 = base.weight.detach().clone()
    x = torch.randn(3, 5, 48)
    unmerged = layer(x).detach()

    layer.merge()
    assert layer.merged
    expected_weight = f64(w0) + 2.0 * f64(layer.lora_B.weight) @ f64(layer.lora_A.weight)
    assert (f64(base.weight) - expected_weight).abs().max() <= 1e-6
    assert (layer(x) - unmerged).abs().max() <= 1e-5

    layer.unmerge()
    assert not layer.merged
    assert (base.weight - w0).abs().max() <= 1e-6
    assert (layer(x) - unmerged).abs().max() <= 1e-5


def test_merge_twice_warns_and_changes_nothing():
    base = random_linear()
    layer = Linear(base, r=4, init_lora_weights=False)
    layer.merge()
    merged_weight = base.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(base.weight, merged_weight)
    layer.unmerge()
    restored = base.weight.detach().clone()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    assert torch.equal(base.weight, restored)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_merge_refuses_non_finite_update_and_leaves_w0_untouched(bad):
    base = random_linear()
    layer = Linear(base, r=4, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_B.weight[3, 1] = bad
    w0 = base.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge()
    assert torch.equal(base.weight, w0)
    assert not layer.merged


def test_merge_into_fp16_weight_rounds_once():
    base = random_linear().half()
    layer = Linear(base, r=4, lora_alpha=8, init_lora_weights=False)
    w0 = f64(base.weight)
    exact = w0 + 2.0 * f64(layer.lora_B.weight) @ f64(layer.lora_A.weight)
    layer.merge()
    assert base.weight.dtype == torch.float16
    # One rounding of the exact sum to fp16: relative error <= 2^-11 for normal numbers (plus a hair for the
    # float32 intermediate), absolute <= 2^-25 for fp16 subnormals.
    error = (f64(base.weight) - exact).abs()
    assert (error <= exact.abs() * (2**-11 + 2**-20) + 2**-25).all()


# --- dropout --------------------------------------------------------------------------------------------------

def identity_adapter(p: float) -> tuple[Linear, nn.Linear]:
    """in = out = r = 8 and A = B = I, alpha = r: the adapter adds exactly dropout(x) to the base output."""
    base = random_linear(8, 8)
    layer = Linear(base, r=8, lora_alpha=8, lora_dropout=p)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.eye(8))
        layer.lora_B.weight.copy_(torch.eye(8))
    return layer, base


def test_dropout_applies_to_the_adapter_path_only_in_train_mode():
    p = 0.5
    layer, base = identity_adapter(p)
    torch.manual_seed(0)
    x = torch.rand(64, 8) + 1.0  # bounded away from zero so dropped and kept entries are told apart
    layer.train()
    added = (layer(x) - base(x)).detach()
    # If dropout touched the base path, `added` would contain W0 (mask * x - x) terms, not just 0 or x / (1 - p).
    dropped = added.abs() <= 1e-6
    kept = (added - x / (1 - p)).abs() <= 1e-5
    assert torch.all(dropped | kept)
    assert 0.35 < dropped.float().mean().item() < 0.65

    layer.eval()
    assert (layer(x) - base(x) - x).abs().max() <= 1e-5


def test_zero_dropout_is_no_op_in_train_mode():
    layer, base = identity_adapter(0.0)
    layer.train()
    x = torch.rand(16, 8) + 1.0
    assert (layer(x) - base(x) - x).abs().max() <= 1e-5


# --- dtypes ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_base_keeps_fp32_adapter_and_base_output_dtype(dtype):
    base = random_linear().to(dtype)
    layer = Linear(base, r=4, lora_alpha=8, init_lora_weights=False)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    x = torch.randn(4, 48).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    expected = linear_reference(x, base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight, 2.0)
    # Only the base matmul and the final cast are in low precision.
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=5e-2)
    out.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32

    emb = nn.Embedding(30, 16).to(dtype)
    emb_layer = Embedding(emb, r=4, init_lora_weights=False)
    assert emb_layer.lora_embedding_A.dtype == torch.float32
    assert emb_layer(torch.randint(0, 30, (2, 5))).dtype == dtype


def test_autocast_fp16_output_dtype_and_fp32_gradients():
    base = random_linear().half()
    base.requires_grad_(False)
    layer = Linear(base, r=4, init_lora_weights=False)
    x = torch.randn(4, 48, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.float16):
        out = layer(x)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32
    assert layer.lora_B.weight.grad.dtype == torch.float32
