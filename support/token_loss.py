"""The training loss: summed next-token cross-entropy, computed so that BLOOM's 250,880-token
vocabulary does not cost several copies of the logits.

The usual way, `F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets)`, makes a shifted
copy of the logits, a float32 copy of that, keeps a float32 log-softmax for the backward pass, and
in the backward pass builds float32 gradients of each before casting back: for BLOOM-1.7B at batch 4
x 512 tokens that is 2 GB per float32 copy (1 GB for the fp16 logits themselves), several of them
alive at once on a 16 GB T4.

`sum_token_loss` computes the same loss and gradient from the logits as they are, a few rows at a
time in float32: the forward pass keeps nothing beyond the logits (the backward pass recomputes each
block's softmax) and the backward pass writes the gradient straight into one tensor of the logits'
own dtype, or, with `overwrite_logits=True` (train.py's steps, for models `causal_lm_token_loss`
takes this way), into the logits' own memory. The numbers are those of the usual way, up to float32
rounding (tests/test_token_loss.py checks both against a float64 reference); `bench/bench_loss.py`
measures the memory.

`sum_linear_token_loss` goes one step further for the models it knows (`causal_lm_token_loss`): it
takes the hidden states and the output layer's weight, and computes the logits a block of rows at a
time, with each block's loss and its gradient towards the hidden states in the same pass (what
Liger's fused linear cross-entropy does), so the logits never exist whole: the backward pass only
scales the kept gradient (rows x hidden, 1/120 of the logits' size at BLOOM's vocabulary) by its
upstream gradient.
"""

import torch
import torch.nn.functional as F

# label value skipped by the loss, as by torch.nn.CrossEntropyLoss (and HF models)
IGNORE_INDEX = -100

CHUNK_ELEMENTS = 2**24  # logits per float32 block (64 MiB): 66 rows of BLOOM's vocabulary
# On a CPU with 16-bit logits the matmuls are fast and a block's float32 passes (log-softmax, exp,
# the cast) weigh most: the output layer's blocks then hold 2**21 logits (8 MiB in float32, within
# the cache), but at least 128 rows, since each block reads the whole weight (docs/memory.md). In
# float32 the matmuls dominate and prefer CHUNK_ELEMENTS' larger blocks.
CPU_BLOCK_ELEMENTS, CPU_MIN_BLOCK_ROWS = 2**21, 128


def next_token_labels(batch: dict) -> torch.Tensor:
    """Targets for positions 0..T-2: the label of the next token, or -100 where there is nothing to
    learn.

    Position t predicts token t+1. A left-padded row's first real token follows a pad position;
    predicting it from padding is meaningless (and would make the loss depend on how much padding
    the batch needed), so it is masked.
    """
    return batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, :-1] == 0, IGNORE_INDEX)


def count_label_tokens(batch: dict) -> int:
    return int((next_token_labels(batch) != IGNORE_INDEX).sum())


def sum_token_loss(logits: torch.Tensor, targets: torch.Tensor,
                   overwrite_logits: bool = False) -> torch.Tensor:
    """Summed cross-entropy of `logits[:, :-1]` (batch x T x vocab) against `targets` (batch x T-1,
    from `next_token_labels`; -100 is skipped), in float32, or wider for wider logits (the tests'
    float64 runs).

    The last position has no target; rather than slicing it off (a copy of the logits), it gets a
    -100 target. With `overwrite_logits`, the backward pass writes the gradient into the logits'
    memory instead of a new tensor of their size (1 GB less at BLOOM's vocabulary, 4 x 512 tokens,
    half precision): for a caller that has no use for the logits after backward, as train.py's step.
    They then hold the gradient; a second backward through the same graph raises (autograd sees the
    saved logits modified)."""
    full_targets = F.pad(targets, (0, 1), value=IGNORE_INDEX)
    return _ChunkedCrossEntropy.apply(logits.flatten(0, 1), full_targets.flatten(),
                                      overwrite_logits)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum over rows i with t_i != -100 of  logsumexp(x_i) - x_i[t_i],  and its gradient
    softmax(x_i) - onehot(t_i) (zero for skipped rows), computed block by block in float32."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor,
                overwrite_logits: bool) -> torch.Tensor:
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        counted = targets != IGNORE_INDEX
        total = torch.zeros((), dtype=compute_dtype, device=logits.device)
        for rows in _row_blocks(*logits.shape):
            # log_softmax with dtype= reads the half-precision block and writes float32 in one fused
            # kernel (a cast, then logsumexp's five passes, took twice as long on a CPU).
            log_probs = F.log_softmax(logits[rows], dim=-1, dtype=compute_dtype)
            total += _summed_nll(log_probs, targets[rows], counted[rows])
        ctx.save_for_backward(logits, targets)
        ctx.overwrite_logits, ctx.compute_dtype = overwrite_logits, compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, targets = ctx.saved_tensors
        counted = targets != IGNORE_INDEX
        # Each block of rows is read (into float32) before the same rows are written, so writing
        # into the logits themselves is safe.
        grad = logits if ctx.overwrite_logits else torch.empty_like(logits)
        for rows in _row_blocks(*logits.shape):
            # softmax recomputed (fused as above), then, in place, the loss's gradient times the
            # upstream one.
            grad[rows] = _nll_gradient_(F.softmax(logits[rows], dim=-1, dtype=ctx.compute_dtype),
                                        targets[rows], counted[rows], grad_total)
        return grad, None, None


def _row_blocks(rows: int, vocab: int, max_rows: int | None = None):
    """Slices of consecutive rows of `rows` x `vocab` logits holding about CHUNK_ELEMENTS logits
    each, and at most `max_rows` rows."""
    step = max(1, CHUNK_ELEMENTS // max(1, vocab))
    if max_rows:
        step = min(step, max_rows)
    return (slice(start, start + step) for start in range(0, rows, step))


def _output_layer_blocks(rows: int, vocab: int, device: torch.device, logits_dtype: torch.dtype):
    """The blocks of rows whose logits `_LinearCrossEntropy` computes at once: `_row_blocks`, and on
    a CPU with 16-bit logits at most CPU_BLOCK_ELEMENTS logits (but CPU_MIN_BLOCK_ROWS rows) each."""
    small = device.type == "cpu" and logits_dtype.itemsize < 4
    return _row_blocks(rows, vocab, max(CPU_MIN_BLOCK_ROWS, CPU_BLOCK_ELEMENTS // max(1, vocab))
                       if small else None)


def _summed_nll(log_probs: torch.Tensor, targets: torch.Tensor,
                counted: torch.Tensor) -> torch.Tensor:
    """-sum of each counted row's log-probability at its target (a block of rows)."""
    picked = log_probs.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1)
    # where, not a multiplication by the mask: a skipped row with inf logits must add 0, not NaN.
    return -torch.where(counted, picked, 0).sum()


def _nll_gradient_(probs: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor | None,
                   scale: torch.Tensor | float = 1) -> torch.Tensor:
    """In place on a block of softmax rows: minus 1 at each target, times `scale`, and zero for
    skipped rows (masked_fill last, not a multiplication: 0 * inf is NaN; None: every row counts):
    `scale` x the gradient of `_summed_nll`."""
    probs.scatter_add_(1, targets.clamp_min(0).unsqueeze(1),
                       torch.full((probs.shape[0], 1), -1, dtype=probs.dtype, device=probs.device))
    probs.mul_(scale)
    return probs if counted is None else probs.masked_fill_(~counted.unsqueeze(1), 0)


# Causal LMs whose logits are exactly output_layer(base_model(...).last_hidden_state): no scaling or
# soft-capping after the output layer (Gemma-2, Cohere and Granite have one, so they take the logits
# path).
PLAIN_OUTPUT_LAYER_MODEL_TYPES = frozenset({"bloom", "gpt2", "llama", "mistral", "qwen2"})


def causal_lm_token_loss(model, targets: torch.Tensor, *args, **inputs) -> torch.Tensor:
    """The summed token loss of `model` (a transformers causal LM) on its inputs against `targets`
    (next_token_labels): through `sum_linear_token_loss` where the output layer is a plain frozen
    linear layer on the last hidden states, otherwise from the logits (`sum_token_loss`, writing the
    gradient into them)."""
    head = model.get_output_embeddings()
    if (model.config.model_type in PLAIN_OUTPUT_LAYER_MODEL_TYPES and type(head) is torch.nn.Linear
            and head.bias is None and not head.weight.requires_grad):
        return sum_linear_token_loss(model.base_model(*args, **inputs).last_hidden_state,
                                     head.weight, targets)
    logits = model(*args, **inputs).logits
    # the loss's own float32 math, not autocast's copies
    with torch.autocast(logits.device.type, enabled=False):
        return sum_token_loss(logits, targets, overwrite_logits=True)


def sum_linear_token_loss(hidden: torch.Tensor, weight: torch.Tensor,
                          targets: torch.Tensor) -> torch.Tensor:
    """`sum_token_loss(F.linear(hidden, weight), targets)` without the logits: `hidden` batch x T x
    H (the last hidden states), `weight` vocab x H (the output layer's, frozen: it gets no
    gradient), `targets` batch x T-1. The logits are computed as the output layer computes them
    (under the ambient autocast: its dtype; otherwise in the weight's, as
    prepare_for_kbit_training's hook has a quantized base's 16-bit head do in an fp32 run), the loss
    in float32 (wider for float64)."""
    if weight.requires_grad:
        raise ValueError("sum_linear_token_loss: the output layer's weight is trainable; it "
                         "computes no gradient for it (use sum_token_loss on the logits)")
    device = hidden.device.type
    logits_dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                    else weight.dtype)
    full_targets = F.pad(targets, (0, 1), value=IGNORE_INDEX)
    with torch.autocast(device, enabled=False):  # the cast above is the only one wanted
        return _LinearCrossEntropy.apply(hidden.flatten(0, 1), weight, full_targets.flatten(),
                                         logits_dtype,
                                         torch.is_grad_enabled() and hidden.requires_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss of _ChunkedCrossEntropy on logits = hidden @ weight.T, block by block; the gradient
    towards the hidden states, (softmax - onehot) @ weight per block, is computed in the forward
    pass while the block's logits are at hand, and kept (the backward pass multiplies it by the
    upstream gradient). Only rows with a target get logits: a row without one (padding, a prompt
    token with TRAIN_ON_INPUTS=false) adds 0 to the loss and gets a zero gradient, so the output
    layer (30 % of BLOOM-1b7's matmuls) skips the padding, 0.4-0.5 of an unsorted batch."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                logits_dtype: torch.dtype, with_gradient: bool) -> torch.Tensor:
        compute_dtype = torch.promote_types(logits_dtype, torch.float32)
        # once, not per block (autocast would cast it at every block)
        weight = weight.to(logits_dtype)
        counted_rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        # Each counted row's log-probability at its target (0 elsewhere), summed per block of all
        # rows below: the same additions in the same order as without the skipping.
        picked = torch.zeros(hidden.shape[0], dtype=compute_dtype, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if with_gradient else None
        for block in _output_layer_blocks(counted_rows.shape[0], weight.shape[0], hidden.device,
                                          logits_dtype):
            rows, block_targets = counted_rows[block], targets[counted_rows[block]]
            logits = F.linear(hidden[rows].to(logits_dtype), weight)
            log_probs = F.log_softmax(logits, dim=-1, dtype=compute_dtype)
            picked[rows] = log_probs.gather(1, block_targets.unsqueeze(1)).squeeze(1)
            if with_gradient:
                # softmax in place of the log-probabilities; multiplied in the logits' dtype, as the
                # output layer's own backward pass would
                probs = _nll_gradient_(log_probs.exp_(), block_targets, counted=None)
                grad_hidden[rows] = (probs.to(logits_dtype) @ weight).to(grad_hidden.dtype)
        total = torch.zeros((), dtype=compute_dtype, device=hidden.device)
        for rows in _row_blocks(hidden.shape[0], weight.shape[0]):
            total -= picked[rows].sum()
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None
