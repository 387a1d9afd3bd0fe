"""Our LoRA layers against loralib (microsoft/LoRA), the LoRA paper authors' own implementation.

test_lora_layer.py checks lora_layer.py against float64 math written in the test, and the PEFT tests check it
against PEFT; but PEFT's LoRA layers are a rewrite by other people, and our layers copy PEFT's parameter names and
layout, so a convention we both got wrong would pass both. loralib is the code the paper's results were produced
with, written independently of PEFT and of us, with conventions of its own (its layers *are* the nn.Linear /
nn.Embedding instead of wrapping one, it merges on `eval()`, and its MergedLinear gives a fused qkv projection one
rank-r update per enabled group). Agreeing with it therefore pins down the paper's arithmetic itself:
h = W0 x + (alpha / r) B A x, with A (r x in), B (out x r).

Every test builds a loralib layer with the same base weight, A and B as ours (B non-zero, so nothing passes
trivially; dropout 0 unless the test is about dropout) and compares forward outputs, gradients of A, B and the
input, the merged weight, and the weight after unmerging, in float32 and float64. loralib is only a test reference:
lora_layer.py never imports it. Run with `-s` to see the measured differences.
"""

import loralib as lora
import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from lora_layer import Embedding, Linear

R, ALPHA = 4, 12  # scaling alpha / r = 3: not a power of two, so its rounding is exercised; off by 3x if forgotten

# Allowed max |ours - loralib| / max |loralib|: 1e-6 is ~8 float32 ulps of the largest value (measured: <= 5e-7
# over 40 seeds); float64 measures <= 1e-15, so 1e-12 only fails on a real difference or a float32 detour.
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]

def assert_matches(ours: torch.Tensor, reference: torch.Tensor, what: str) -> float:
    """Max difference relative to the reference's magnitude (all compared values here are O(0.1) to O(10))."""
    ours, reference = ours.detach(), reference.detach()
    assert ours.shape == reference.shape, f"{what}: shape {tuple(ours.shape)} vs loralib {tuple(reference.shape)}"
    assert ours.dtype == reference.dtype, f"{what}: dtype {ours.dtype} vs loralib {reference.dtype}"
    scale = reference.double().abs().max().item()
    assert scale > 0, f"{what}: loralib's value is all zeros, so the comparison proves nothing"
    difference = (ours.double() - reference.double()).abs().max().item() / scale
    print(f"{what} [{reference.dtype}]: max |ours - loralib| / max |loralib| = {difference:.1e}")
    assert difference <= TOLERANCE[reference.dtype], f"{what}: relative difference {difference:.2e}"
    return difference


def forward_backward(module: nn.Module, x: torch.Tensor, grad_output_seed: int = 1):
    """Output and input gradient for the loss sum(output * G), G random, so that every gradient is non-trivial."""
    if x.is_floating_point():
        x = x.detach().clone().requires_grad_(True)
    out = module(x)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_output_seed), dtype=out.dtype)
    out.backward(grad_output)
    return out.detach(), x.grad


# --- building the same layer in both libraries ------------------------------------------------------------------

def make_linear_pair(dtype, in_features, out_features, fan_in_fan_out=False, lora_dropout=0.0, seed=0):
    """Our Linear around an nn.Linear (or, with fan_in_fan_out, a GPT-2 Conv1D) and loralib's Linear, same weights."""
    torch.manual_seed(seed)
    if fan_in_fan_out:
        base = Conv1D(out_features, in_features)  # GPT-2's argument order; weight stored (in, out)
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.1)  # Conv1D starts its bias at zero
    else:
        base = nn.Linear(in_features, out_features)
    base = base.to(dtype)
    # init_lora_weights=False: A and B both random (nn.Linear's init), so B A != 0.
    ours = Linear(base, r=R, lora_alpha=ALPHA, lora_dropout=lora_dropout, fan_in_fan_out=fan_in_fan_out,
                  init_lora_weights=False).to(dtype)
    lib = lora.Linear(in_features, out_features, r=R, lora_alpha=ALPHA, lora_dropout=lora_dropout,
                      fan_in_fan_out=fan_in_fan_out, dtype=dtype)
    with torch.no_grad():
        # loralib's Linear is the base layer itself. With fan_in_fan_out it transposed its own weight to (in, out)
        # at init, Conv1D's layout, so in both cases the base weight is copied as stored; ours reuses the base's.
        lib.weight.copy_(base.weight)
        lib.bias.copy_(base.bias)
        # Same A (r x in) and B (out x r) orientation in both; our A and B are the weights of nn.Linear modules.
        lib.lora_A.copy_(ours.lora_A.weight)
        lib.lora_B.copy_(ours.lora_B.weight)
    assert ours.scaling == lib.scaling == ALPHA / R  # loralib: lora_alpha / r, our default (not rsLoRA)
    return ours, lib


def make_embedding_pair(dtype, vocab=50, dim=24, padding_idx=0, seed=0):
    torch.manual_seed(seed)
    base = nn.Embedding(vocab, dim, padding_idx=padding_idx).to(dtype)
    ours = Embedding(base, r=R, lora_alpha=ALPHA, init_lora_weights=False).to(dtype)  # A and B both N(0, 1)
    with torch.no_grad():
        # N(0, 1) A and B make updates up to ~15, where a float32 ulp is already ~1e-6; a trained update is far
        # smaller than the table (as in test_lora_layer.py), so scale it to that regime.
        ours.lora_embedding_A.mul_(0.1)
    lib = lora.Embedding(vocab, dim, r=R, lora_alpha=ALPHA, padding_idx=padding_idx, dtype=dtype)
    with torch.no_grad():
        lib.weight.copy_(base.weight)
        # Same orientation as ours, no transpose: A is r x vocab, B is dim x r, and the table's update is
        # (B A)^T (vocab x dim). Both libraries swap only the init roles relative to Linear (A zeros, B normal).
        lib.lora_A.copy_(ours.lora_embedding_A)
        lib.lora_B.copy_(ours.lora_embedding_B)
    assert ours.scaling == lib.scaling == ALPHA / R
    return ours, lib


def merged_blocks(lib: lora.MergedLinear):
    """For each enabled group of loralib's MergedLinear: (rows of the fused output, columns of our rank-k*r B,
    rows of loralib's B). The output is split into len(enable_lora) equal contiguous groups of m rows; the g-th
    enabled group uses rows g*r:(g+1)*r of A and rows g*m:(g+1)*m of B (F.conv1d with groups=k in `merge_AB`)."""
    m = lib.out_features // len(lib.enable_lora)
    enabled = [group for group, on in enumerate(lib.enable_lora) if on]
    return [(slice(group * m, (group + 1) * m), slice(g * lib.r, (g + 1) * lib.r), slice(g * m, (g + 1) * m))
            for g, group in enumerate(enabled)]


def make_merged_qkv_pair(dtype, enable_lora, fan_in_fan_out, hidden=24, seed=0):
    """loralib's MergedLinear on a fused qkv projection, and the same update as one of our Linears.

    Mapping: MergedLinear(rank r, k = sum(enable_lora) enabled groups) adds, to each enabled group's rows, its own
    rank-r product B_g A_g scaled by alpha / r: a block-structured update of rank k*r. That is our Linear of rank
    k*r with A = loralib's A (k*r x in, unchanged), B (out x k*r) zero except block (group g's rows, columns
    g*r:(g+1)*r) = loralib's B_g, and lora_alpha = k * alpha so that our alpha / (k*r) equals loralib's alpha / r.
    The forward, gradients and merge then agree exactly; but our layer would also train B's zero blocks (their
    gradients are not zero), so as a training set-up ours is the unconstrained superset of loralib's.
    """
    torch.manual_seed(seed)
    out_features = 3 * hidden
    lib = lora.MergedLinear(hidden, out_features, r=R, lora_alpha=ALPHA, enable_lora=enable_lora,
                            fan_in_fan_out=fan_in_fan_out, dtype=dtype)
    with torch.no_grad():
        nn.init.normal_(lib.lora_B, std=0.5)  # loralib starts B at zero: every comparison would be trivial
    base = Conv1D(out_features, hidden) if fan_in_fan_out else nn.Linear(hidden, out_features)
    base = base.to(dtype)
    with torch.no_grad():
        base.weight.copy_(lib.weight)  # both (in, out) with fan_in_fan_out, both (out, in) without
        base.bias.copy_(lib.bias)
    k = sum(enable_lora)
    ours = Linear(base, r=k * R, lora_alpha=k * ALPHA, fan_in_fan_out=fan_in_fan_out,
                  init_lora_weights=False).to(dtype)
    with torch.no_grad():
        ours.lora_A.weight.copy_(lib.lora_A)
        ours.lora_B.weight.zero_()
        for out_rows, our_columns, lib_rows in merged_blocks(lib):
            ours.lora_B.weight[out_rows, our_columns] = lib.lora_B[lib_rows]
    assert ours.scaling == lib.scaling == ALPHA / R
    return ours, lib


# GPT-2's c_attn output is q | k | v, three contiguous blocks: enable_lora=[True, False, True] adapts q and v.
# BLOOM's query_key_value is interleaved per head (view(..., heads, 3, head_dim)), so the same q/v choice there
# needs one group per head and role: [True, False, True] * heads (here 2 heads of 12), a rank-r update per head.
QKV_LAYOUTS = {"gpt2_q_k_v": [True, False, True], "bloom_per_head_qkv": [True, False, True] * 2}


# --- forward and gradients --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_features, out_features, fan_in_fan_out", [
    (48, 40, False),  # nn.Linear
    (32, 32, False),  # square: A and B swapped would still have valid shapes here
    (24, 36, True),  # GPT-2 Conv1D, weight (in, out)
    (32, 32, True),
], ids=["linear", "linear_square", "conv1d", "conv1d_square"])
def test_linear_forward_and_gradients_match_loralib(dtype, in_features, out_features, fan_in_fan_out):
    ours, lib = make_linear_pair(dtype, in_features, out_features, fan_in_fan_out)
    x = torch.randn(3, 5, in_features, dtype=dtype)
    out, x_grad = forward_backward(ours, x)
    lib_out, lib_x_grad = forward_backward(lib, x)

    base_only = ours.base_layer(x).detach()
    assert (lib_out - base_only).abs().max() > 0.1, "the update must be visible, or this test proves nothing"
    assert_matches(out, lib_out, "forward")
    assert_matches(ours.lora_A.weight.grad, lib.lora_A.grad, "grad A")
    assert_matches(ours.lora_B.weight.grad, lib.lora_B.grad, "grad B")
    assert_matches(x_grad, lib_x_grad, "grad x")


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_forward_and_gradients_match_loralib(dtype):
    ours, lib = make_embedding_pair(dtype)
    ids = torch.randint(0, 50, (3, 7))
    ids[0, :2] = 0  # the padding index: its row of A^T gets no gradient in either library
    out, _ = forward_backward(ours, ids)
    lib_out, _ = forward_backward(lib, ids)

    assert (lib_out - ours.base_layer(ids)).abs().max() > 0.1
    assert_matches(out, lib_out, "forward")
    assert_matches(ours.lora_embedding_A.grad, lib.lora_A.grad, "grad A")
    assert_matches(ours.lora_embedding_B.grad, lib.lora_B.grad, "grad B")
    assert torch.count_nonzero(lib.lora_A.grad[:, 0]) == 0
    assert torch.count_nonzero(ours.lora_embedding_A.grad[:, 0]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("layout", QKV_LAYOUTS)
def test_fused_qkv_matches_loralib_merged_linear(dtype, fan_in_fan_out, layout):
    ours, lib = make_merged_qkv_pair(dtype, QKV_LAYOUTS[layout], fan_in_fan_out)
    x = torch.randn(2, 6, 24, dtype=dtype)
    out, x_grad = forward_backward(ours, x)
    lib_out, lib_x_grad = forward_backward(lib, x)

    base_only = ours.base_layer(x).detach()
    update = lib_out - base_only
    assert update.abs().max() > 0.1
    # Groups with enable_lora False (the keys) are untouched by loralib, and by our zero B blocks.
    m = lib.out_features // len(lib.enable_lora)
    for group, on in enumerate(lib.enable_lora):
        assert (update[..., group * m:(group + 1) * m].abs().max() > 0) == on
    assert_matches(out, lib_out, "forward")
    assert_matches(ours.lora_A.weight.grad, lib.lora_A.grad, "grad A")
    for out_rows, our_columns, lib_rows in merged_blocks(lib):
        assert_matches(ours.lora_B.weight.grad[out_rows, our_columns], lib.lora_B.grad[lib_rows], "grad B block")
    assert_matches(x_grad, lib_x_grad, "grad x")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_with_the_same_seed_matches_loralib(dtype):
    # Both apply nn.Dropout to the adapter's input only, after a base forward that draws no random numbers, so the
    # same seed gives the same mask.
    ours, lib = make_linear_pair(dtype, 32, 40, lora_dropout=0.25)
    x = torch.randn(4, 6, 32, dtype=dtype)
    torch.manual_seed(123)
    out, x_grad = forward_backward(ours, x)
    torch.manual_seed(123)
    lib_out, lib_x_grad = forward_backward(lib, x)
    torch.manual_seed(124)
    with torch.no_grad():
        other_mask = lib(x)

    assert (other_mask - lib_out).abs().max() > 0.1, "a different mask must change the output"
    assert_matches(out, lib_out, "forward, dropout 0.25")
    assert_matches(ours.lora_A.weight.grad, lib.lora_A.grad, "grad A, dropout 0.25")
    assert_matches(x_grad, lib_x_grad, "grad x, dropout 0.25")


# --- merge and unmerge ------------------------------------------------------------------------------------------

def check_merge_and_unmerge_against_loralib(ours, lib, inputs):
    """loralib merges when the layer goes to eval() and unmerges on train() (merge_weights=True, its default);
    ours merges only on an explicit merge() and unmerges on unmerge(). So: our merge() <-> its eval(), our
    unmerge() <-> its train(), and our eval() alone must leave W0 alone."""
    our_weight = ours.base_layer.weight
    w0 = our_weight.detach().clone()
    assert torch.equal(lib.weight, w0)
    unmerged_out = lib(inputs).detach()

    ours.eval()
    assert torch.equal(our_weight, w0) and not ours.merged, "our eval() must not touch the base weight"
    lib.eval()
    ours.merge()
    assert lib.merged and ours.merged
    assert (lib.weight - w0).abs().max() > 0.1, "the merge must change the weight visibly"
    assert_matches(our_weight, lib.weight, "merged weight")
    assert_matches(ours(inputs), lib(inputs), "merged forward")
    assert_matches(ours(inputs), unmerged_out, "merged forward vs loralib unmerged")

    lib.train()
    ours.unmerge()
    assert not lib.merged and not ours.merged
    assert_matches(our_weight, lib.weight, "unmerged weight")
    assert_matches(our_weight, w0, "unmerged weight vs W0")
    assert_matches(ours(inputs), unmerged_out, "forward after unmerge")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_linear_merge_and_unmerge_match_loralib(dtype, fan_in_fan_out):
    ours, lib = make_linear_pair(dtype, 24, 36, fan_in_fan_out)
    check_merge_and_unmerge_against_loralib(ours, lib, torch.randn(3, 5, 24, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_merge_and_unmerge_match_loralib(dtype):
    ours, lib = make_embedding_pair(dtype)
    check_merge_and_unmerge_against_loralib(ours, lib, torch.randint(0, 50, (3, 7)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("layout", QKV_LAYOUTS)
def test_fused_qkv_merge_and_unmerge_match_loralib_merged_linear(dtype, fan_in_fan_out, layout):
    ours, lib = make_merged_qkv_pair(dtype, QKV_LAYOUTS[layout], fan_in_fan_out)
    check_merge_and_unmerge_against_loralib(ours, lib, torch.randn(2, 6, 24, dtype=dtype))
