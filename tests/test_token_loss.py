"""token_loss.sum_token_loss against the usual cross-entropy, computed here in float64 from its definition.

The reference is the summed next-token loss written out: for each row that has a target, logsumexp of its
logits minus the target's logit, over logits[:, :-1]; its gradient comes from float64 autograd of that
expression. Nothing here calls support/token_loss.py to compute what it should return. The blocks are made small
(monkeypatched CHUNK_ELEMENTS) so that every test crosses several block boundaries, one of them mid-batch.
"""

import pytest
import torch

from support import token_loss
from support.alpaca_data import IGNORE_INDEX
from support.token_loss import sum_token_loss


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(token_loss, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows of a 50-token vocabulary per block


def reference_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum over counted rows of logsumexp(x) - x[target], in float64, on the shifted logits."""
    x = logits[:, :-1].double()
    counted = targets != IGNORE_INDEX
    picked = x.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (torch.logsumexp(x, dim=-1) - picked)[counted].sum()


def random_case(dtype: torch.dtype, batch=3, length=7, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=generator) * 4).to(dtype)
    targets = torch.randint(0, vocab, (batch, length - 1), generator=generator)
    targets[0, :2] = IGNORE_INDEX  # a left-padded row's start
    targets[2, 4] = IGNORE_INDEX   # a prompt token with TRAIN_ON_INPUTS=false
    return logits, targets


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-6), (torch.float16, 1e-6),
                                              (torch.float64, 1e-13)])
def test_loss_and_gradient_match_the_float64_definition(dtype, tolerance):
    logits, targets = random_case(dtype)
    ours_in = logits.clone().requires_grad_()
    ours = sum_token_loss(ours_in, targets)
    (ours * 0.37).backward()  # a non-unit upstream gradient, as loss_weight and GradScaler's scale give

    ref_in = logits.double().requires_grad_()
    ref = reference_loss(ref_in, targets)
    (ref * 0.37).backward()

    assert ours.dtype == torch.promote_types(dtype, torch.float32)  # float32 math, wider for float64
    assert abs(ours.item() - ref.item()) <= tolerance * abs(ref.item())
    assert ours_in.grad.dtype == dtype and ours_in.grad.shape == logits.shape
    # Computed in float32 (float64 for float64 logits), then rounded once to the logits' dtype.
    rounding = {torch.float32: 0, torch.bfloat16: 2**-8, torch.float16: 2**-10, torch.float64: 0}[dtype]
    assert (ours_in.grad.double() - ref_in.grad).abs().max() <= (rounding + tolerance) * ref_in.grad.abs().max()


def test_skipped_rows_and_the_last_position_get_no_gradient():
    logits, targets = random_case(torch.float32)
    logits.requires_grad_()
    sum_token_loss(logits, targets).backward()
    assert torch.equal(logits.grad[:, -1], torch.zeros_like(logits.grad[:, -1]))  # it predicts nothing
    assert torch.equal(logits.grad[0, :2], torch.zeros_like(logits.grad[0, :2]))
    assert torch.equal(logits.grad[2, 4], torch.zeros_like(logits.grad[2, 4]))
    # A counted row's gradient is softmax - onehot: it sums to 0 and is negative only at the target.
    row = logits.grad[1, 3]
    assert abs(row.sum().item()) < 1e-6 and row.argmin().item() == targets[1, 3].item()


def test_inf_logits_in_a_skipped_row_do_not_make_the_loss_nan():
    """fp16 logits can overflow to inf; in a row without a target that must change nothing (as in
    F.cross_entropy with ignore_index), while in a counted row it must show, so that train.py can stop."""
    logits, targets = random_case(torch.float16)
    expected = sum_token_loss(logits, targets)
    logits[0, 0, 5] = float("inf")  # row 0, position 0: skipped
    logits.requires_grad_()
    loss = sum_token_loss(logits, targets)
    loss.backward()
    assert torch.equal(loss, expected) and torch.isfinite(logits.grad).all()
    logits = logits.detach()
    logits[1, 0, 5] = float("inf")  # counted
    assert not torch.isfinite(sum_token_loss(logits, targets))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overwrite_logits_writes_the_same_gradient_into_the_logits_memory(dtype):
    """overwrite_logits=True (train.py's step): the very same gradient reaches what made the logits (here a matmul,
    as lm_head), but it lives in the logits' memory instead of a new tensor of their size; the logits then hold it.
    Without it the logits are left as they were. A second backward through the graph is refused, not wrong."""
    _, targets = random_case(dtype)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 7, 16, generator=generator).to(dtype)
    weight = torch.randn(50, 16, generator=generator).to(dtype).requires_grad_()
    results = {}
    for overwrite in (False, True):
        weight.grad = None
        logits = hidden @ weight.T
        reaching = []
        logits.register_hook(reaching.append)
        (sum_token_loss(logits, targets, overwrite_logits=overwrite) * 0.37).backward()
        results[overwrite] = weight.grad.clone(), reaching[0], logits.detach()
    (plain_weight_grad, plain_grad, plain_logits), (weight_grad, grad, logits) = results[False], results[True]
    assert torch.equal(weight_grad, plain_weight_grad) and torch.equal(grad, plain_grad)
    assert grad.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    assert plain_grad.untyped_storage().data_ptr() != plain_logits.untyped_storage().data_ptr()
    assert torch.equal(logits, plain_grad)
    assert torch.equal(plain_logits, (hidden @ weight.T).detach())

    loss = sum_token_loss(hidden @ weight.T, targets, overwrite_logits=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_gradcheck_in_float64():
    logits, targets = random_case(torch.float64, batch=3, length=6, vocab=6)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sum_token_loss(x, targets), (logits,))


def test_it_does_not_keep_a_float32_copy_of_the_logits_for_backward():
    """What autograd keeps from the forward pass: the logits themselves (no copy) and per row its target (int64);
    the backward pass recomputes the softmax."""
    logits, targets = random_case(torch.bfloat16, batch=4, length=64, vocab=50)
    logits.requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        sum_token_loss(logits, targets)
    assert any(t.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr() for t in kept)
    others = sum(t.numel() * t.element_size() for t in kept
                 if t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr())
    assert others == 4 * 64 * 8


# --- sum_linear_token_loss: the output layer and the loss together ------------------------------------------------

def linear_case(dtype: torch.dtype, batch=3, length=7, hidden=16, vocab=50, seed=2):
    """Hidden states, an output layer's weight and the targets of random_case (skipped rows included)."""
    _, targets = random_case(torch.float32, batch, length, vocab, seed)
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, length, hidden, generator=generator).to(dtype),
            torch.randn(vocab, hidden, generator=generator).to(dtype), targets)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_linear_loss_and_gradient_match_the_float64_definition(dtype, tolerance):
    """The loss of the logits hidden @ weight.T and its gradient towards the hidden states, against float64
    autograd of the written-out definition; a non-unit upstream gradient, applied in the backward pass."""
    hidden, weight, targets = linear_case(dtype)
    ours_in = hidden.clone().requires_grad_()
    ours = token_loss.sum_linear_token_loss(ours_in, weight, targets)
    (ours * 0.37).backward()

    ref_in = hidden.double().requires_grad_()
    ref = reference_loss(ref_in @ weight.double().T, targets)
    (ref * 0.37).backward()

    assert ours.dtype == torch.promote_types(dtype, torch.float32)
    assert abs(ours.item() - ref.item()) <= tolerance * abs(ref.item())
    assert ours_in.grad.dtype == dtype and ours_in.grad.shape == hidden.shape
    assert (ours_in.grad.double() - ref_in.grad).abs().max() <= tolerance * 10 * ref_in.grad.abs().max()
    assert torch.equal(ours_in.grad[:, -1], torch.zeros_like(ours_in.grad[:, -1]))  # no target: no gradient
    assert torch.equal(ours_in.grad[0, :2], torch.zeros_like(ours_in.grad[0, :2]))


def test_linear_gradcheck_in_float64():
    hidden, weight, targets = linear_case(torch.float64, batch=3, length=6, hidden=4, vocab=6)
    hidden.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: token_loss.sum_linear_token_loss(x, weight, targets), (hidden,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_loss_under_autocast_is_the_output_layer_s_then_the_loss(dtype):
    """Under autocast (float32 hidden states, a half-precision weight as train.py's CPU base), the logits are those
    F.linear computes there, so the loss equals sum_token_loss on them up to float32 summation order, and the
    gradient is within the half-precision rounding of the logits-path's gradient."""
    hidden, weight, targets = linear_case(torch.float32)
    weight = weight.to(dtype)
    grads, losses = [], []
    for fused in (True, False):
        x = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            loss = (token_loss.sum_linear_token_loss(x, weight, targets) if fused
                    else sum_token_loss(torch.nn.functional.linear(x, weight), targets))
        (loss * 0.37).backward()
        grads.append(x.grad), losses.append(loss)
    assert losses[0].dtype == torch.float32 and abs(losses[0].item() - losses[1].item()) <= 1e-6 * losses[1].item()
    assert (grads[0] - grads[1]).abs().max() <= 2**-7 * grads[1].abs().max()


def test_linear_loss_keeps_only_the_hidden_states_gradient_for_backward():
    """What autograd keeps: one tensor of the hidden states' size (their gradient); nothing of the logits' size.
    Without gradients (evaluation) no gradient is computed at all."""
    hidden, weight, targets = linear_case(torch.float32, batch=4, length=64, hidden=8)
    hidden.requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        token_loss.sum_linear_token_loss(hidden, weight, targets)
    assert [tuple(t.shape) for t in kept] == [(4 * 64, 8)]

    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        calls = []
        with _count_matmuls(calls):
            token_loss.sum_linear_token_loss(hidden, weight, targets)
    counted = int((targets != -100).sum())
    assert len(kept) == 1 and calls == ["linear"] * len(list(token_loss._row_blocks(counted, 50)))


def test_the_output_layer_computes_logits_only_for_rows_with_a_target():
    """Padding and rows without a target (here a third of them) get no logits: the output layer's rows are exactly
    the counted ones, and the loss and gradient are the float64 definition's over all rows."""
    hidden, weight, targets = linear_case(torch.float32, batch=4, length=64, hidden=8)
    targets[:, ::3] = -100
    hidden.requires_grad_()
    rows = []

    class RecordRows(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.linear:
                rows.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    with RecordRows():
        loss = token_loss.sum_linear_token_loss(hidden, weight, targets)
    loss.backward()
    assert sum(rows) == int((targets != -100).sum()) < 4 * 63

    ref_in = hidden.detach().double().requires_grad_()
    ref = reference_loss(ref_in @ weight.double().T, targets)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-6 * abs(ref.item())
    assert (hidden.grad.double() - ref_in.grad).abs().max() <= 1e-5 * ref_in.grad.abs().max()
    skipped = hidden.grad[:, [*range(0, 63, 3), 63]]  # no target there (the last position has none)
    assert torch.equal(skipped, torch.zeros_like(skipped))


def _count_matmuls(calls: list):
    """A TorchFunctionMode recording F.linear and matrix products."""
    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.nn.functional.linear, torch.matmul, torch.Tensor.__matmul__, torch.mm):
                calls.append("linear" if func is torch.nn.functional.linear else "matmul")
            return func(*args, **(kwargs or {}))
    return Mode()


def test_without_autocast_the_logits_are_in_the_weight_s_dtype():
    """A quantized base's 16-bit output layer in an fp32 run (prepare_for_kbit_training's hook hands it its input in
    its own dtype): the logits are bf16 as there, not a float32 copy of the weight; the loss is float32."""
    hidden, weight, targets = linear_case(torch.float32)
    weight = weight.bfloat16()
    loss = token_loss.sum_linear_token_loss(hidden.requires_grad_(), weight, targets)
    expected = sum_token_loss(torch.nn.functional.linear(hidden.bfloat16(), weight), targets)
    assert loss.dtype == torch.float32 and abs(loss.item() - expected.item()) <= 1e-6 * expected.item()


def test_linear_loss_refuses_a_trainable_weight():
    hidden, weight, targets = linear_case(torch.float32)
    with pytest.raises(ValueError, match="weight is trainable"):
        token_loss.sum_linear_token_loss(hidden, weight.requires_grad_(), targets)


@pytest.mark.slow  # the benchmark end to end
def test_bench_loss_runs_and_writes_its_table(tmp_path, capsys):
    """bench/bench_loss.py end to end on a small vocabulary (the real one takes minutes): every loss timed and
    compared, the table written with its command on top; memory measured in a fresh process."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_loss.py"
    spec = importlib.util.spec_from_file_location("bench_loss", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "loss.md"
    argv = ["--vocab", "3000", "--seq", "16", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out)]
    bench.main([*argv, "--no-memory"])
    table = out.read_text()
    assert table.strip() in capsys.readouterr().out
    assert table.splitlines()[2] == "Reproduce: `python bench/bench_loss.py " + " ".join(argv) + " --no-memory`"
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| fp32") or line.startswith("| bf16")]
    assert [(r[0], r[1]) for r in rows] == [(dtype, name) for dtype in ("| fp32", "| bf16")
                                            for name in ("usual", "ours", "ours-in-place")]
    for row in rows[1:3]:  # fp32: ours, and ours writing into the logits, vs the usual way
        loss_diff, grad_diff = map(float, row[4].split(", "))
        assert loss_diff < 1e-6 and grad_diff < 1e-6
    assert not list(tmp_path.glob("*.tmp"))

    from bench.common import memory_in_fresh_process

    memory = memory_in_fresh_process(bench.__file__, argv, "ours-in-place bf16")
    assert memory["method"] in ("vmhwm", "ru_maxrss") and memory["logits"] == 4 * 16 * 3000 * 2


def test_bench_loss_keeps_its_timing_when_the_memory_processes_do_not_finish(tmp_path, monkeypatch):
    """The table is written once the timing is done, so a run stopped during its memory processes (a lent GPU's
    time running out, say) still leaves its timing, saying the memory was not measured yet."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_loss.py"
    spec = importlib.util.spec_from_file_location("bench_loss", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "memory_of_variants", stopped)
    out = tmp_path / "loss.md"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--vocab", "300", "--seq", "8", "--dtypes", "bf16", "--repeats", "1", "--warmup", "0",
                    "--threads", "1", "--out", str(out)])
    table = out.read_text()
    assert "not measured yet: the run stopped before the memory processes finished" in table
    assert [line.split(" | ")[1] for line in table.splitlines() if line.startswith("| bf16")] == [
        "usual", "ours", "ours-in-place"]


def test_memory_processes_run_jobs_at_a_time():
    """bench/common.memory_of_variants with jobs=3 has three variants' processes running at once (each would
    wait for the others here, and time out if they ran one by one), and returns each variant's own result."""
    import threading

    import bench.common as common

    all_three_started = threading.Barrier(3, timeout=20)

    def measured(script, argv, variant):
        all_three_started.wait()
        return {"peak": len(variant)}

    real = common.memory_in_fresh_process
    common.memory_in_fresh_process = measured
    try:
        memory = common.memory_of_variants("bench.py", [], ["a", "bb", "ccc"], jobs=3)
    finally:
        common.memory_in_fresh_process = real
    assert memory == {"a": {"peak": 1}, "bb": {"peak": 2}, "ccc": {"peak": 3}}


def test_bench_head_loss_runs_and_its_variants_agree(tmp_path, capsys):
    """bench/bench_head_loss.py at a small size: every variant timed and compared with the usual way (fp32: equal to
    float32 rounding, bf16: within the logits' rounding), the table written with its command on top."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_head_loss.py"
    spec = importlib.util.spec_from_file_location("bench_head_loss", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "head_loss.md"
    argv = ["--seq", "16", "--hidden", "32", "--vocabs", "300,2000", "--repeats", "1", "--warmup", "0",
            "--out", str(out)]
    bench.main(argv)
    table = out.read_text()
    assert table.strip() in capsys.readouterr().out
    assert table.splitlines()[2] == "Reproduce: `python bench/bench_head_loss.py " + " ".join(argv) + "`"
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| 300") or line.startswith("| 2,")]
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted(
        (f"| {v}", d, n) for v in ("300", "2,000") for d in ("bf16", "fp32") for n in ("usual", "logits", "fused"))
    for row in rows:
        loss_diff, grad_diff = map(float, row[5].rstrip(" |").split(", "))
        assert loss_diff < 1e-6 and grad_diff < (1e-5 if row[1] == "fp32" else 2**-7)


def test_on_a_cpu_16_bit_logits_come_in_blocks_of_about_8_mib_of_float32(monkeypatch):
    """The output layer's blocks: on a CPU with bf16 or fp16 logits 2**21 logits (8 MiB in float32, within the
    cache) but at least 128 rows (each block reads the whole weight), never above CHUNK_ELEMENTS; in float32 and
    elsewhere (a GPU) CHUNK_ELEMENTS alone."""
    monkeypatch.setattr(token_loss, "CHUNK_ELEMENTS", 2**24)

    def rows(vocab: int, device: str, dtype: torch.dtype = torch.bfloat16) -> int:
        return next(token_loss._output_layer_blocks(10**6, vocab, torch.device(device), dtype)).stop

    assert rows(16384, "cpu") == 128 and rows(4096, "cpu", torch.float16) == 512
    assert rows(50257, "cpu") == 128
    assert rows(250880, "cpu") == 2**24 // 250880 == 66
    assert rows(16384, "cpu", torch.float32) == rows(16384, "meta") == 1024
