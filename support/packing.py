"""PACKING=true: several tokenized examples in one row of up to MAX_LENGTH tokens, each attending
only to itself.

Unpacked, a batch is padded to its longest example: on Alpaca about half of every step is padding.
Packed, the examples are laid end to end in rows (`pack_rows`, best-fit decreasing) and a row
restarts its position ids at 0 for each example. What keeps the examples apart:

- the attention: a block-diagonal causal mask, each token sees only the earlier tokens of its own
  example. Llama, Qwen2, Mistral and GPT-2 get it from transformers itself
  (masking_utils.find_packed_sequence_indices builds it from position ids that restart, when no
  attention mask is passed); their positions (rotary or learned) come from the same position ids.
  BLOOM has no position ids: fused_bloom's attention reads them and builds the mask and ALiBi from
  the positions inside each example, so each example's scores are its unpacked ones;
- the loss: the first token of each example gets no label, so the last token of the example before
  it is not trained to predict it (position t predicts token t + 1, token_loss.next_token_labels).

A packed example's loss and gradients are its unpacked ones up to float32 rounding
(tests/test_packing.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

import datasets
import torch

from support.config import ConfigError
from support.token_loss import IGNORE_INDEX

# Model types whose packed rows this repo keeps apart exactly (see the module docstring); others are
# refused.
PACKABLE_MODEL_TYPES = ("bloom", "gpt2", "llama", "mistral", "qwen2")


def check_packable(model_type: str, fused_modules: bool) -> None:
    """Refuse PACKING=true for a model whose packed examples would see each other.

    Raises:
        ConfigError: one line naming PACKING.
    """
    if model_type not in PACKABLE_MODEL_TYPES:
        raise ConfigError(f"PACKING=true is not supported for model type {model_type!r} "
                          f"(supported: {', '.join(PACKABLE_MODEL_TYPES)}): its packed examples "
                          "would attend to each other; set PACKING=false")
    if model_type == "bloom" and not fused_modules:
        raise ConfigError("PACKING=true on BLOOM needs FUSED_MODULES=true: transformers' eager "
                          "BLOOM attention has no position ids to keep packed examples apart")


def pack_rows(lengths: Sequence[int], max_length: int, seed: int) -> list[list[int]]:
    """Best-fit decreasing: the examples, longest first (ties in a seeded random order), each into
    the row that it fills the most, or a new row. The same lengths and seed give the same rows.

    Args:
        lengths: tokens of each example, each at most `max_length` (tokenize_records cuts longer
            ones).
        max_length: tokens per row.
        seed: orders examples of equal length.

    Returns:
        The rows, each a list of example indices, in the order they were opened; every index once.
    """
    if any(n > max_length for n in lengths):
        raise ValueError(f"an example is longer than max_length={max_length}; tokenize_records "
                         "cuts them")
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    # stable: equal lengths keep the seeded order
    order = sorted(shuffled, key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    # (tokens left, row), sorted: the tightest row that fits is a bisection away
    room: list[tuple[int, int]] = []
    for i in order:
        slot = bisect.bisect_left(room, (lengths[i], -1))
        if slot == len(room):
            rows.append([])
            left, row = max_length, len(rows) - 1
        else:
            left, row = room.pop(slot)
        rows[row].append(i)
        if left - lengths[i] > 0:
            bisect.insort(room, (left - lengths[i], row))
    return rows


def pack_dataset(dataset: datasets.Dataset, max_length: int, seed: int) -> datasets.Dataset:
    """The tokenized examples of `dataset` (input_ids, labels, length) packed into rows
    (`pack_rows`).

    Returns:
        A dataset of rows with `input_ids`, `labels` (each example's first label IGNORE_INDEX),
        `position_ids` (from 0 in each example), `length` (tokens in the row) and `examples`
        (examples in the row).
    """
    columns: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "length": [],
                                "examples": []}
    if len(dataset) == 0:
        return datasets.Dataset.from_dict(columns)
    input_ids, labels = dataset["input_ids"], dataset["labels"]
    for row in pack_rows(dataset["length"], max_length, seed):
        ids, row_labels, positions = [], [], []
        for i in row:
            ids += input_ids[i]
            # Position t predicts token t + 1: no example's first token is predicted from the one
            # before it.
            row_labels += [IGNORE_INDEX] + labels[i][1:]
            positions += range(len(input_ids[i]))
        for name, value in zip(columns, (ids, row_labels, positions, len(ids), len(row))):
            columns[name].append(value)
    return datasets.Dataset.from_dict(columns)


def fill(rows: datasets.Dataset, max_length: int) -> float:
    """Real tokens / row tokens (rows x MAX_LENGTH) of a packed dataset."""
    return sum(rows["length"]) / max(1, len(rows) * max_length)


def packing_line(train_rows: datasets.Dataset, valid_rows: datasets.Dataset,
                 max_length: int) -> str:
    """The banner's line: how many examples went into how many rows, and the fill."""
    parts = [f"{sum(rows['examples']):,} {name} examples in {len(rows):,} rows (fill "
             f"{fill(rows, max_length):.3f})"
             for name, rows in (("train", train_rows), ("validation", valid_rows)) if len(rows)]
    return f"{', '.join(parts)}; rows of up to {max_length} tokens, fill = real tokens / row tokens"


class PackCollator:
    """Collate packed rows into a batch, padded on the right to the longest row (rounded up to a
    multiple): the pads come after every real token, so no real token attends to them; they form a
    last sequence of their own (position ids from 0), with no label. `attention_mask` (1 on real
    tokens) is for counting, not for the model."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("PackCollator needs a pad token id")
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of or 1

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(r["input_ids"]) for r in rows)
        longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(rows), longest)
        batch = {"input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros(shape, dtype=torch.long),
                 "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
                 "position_ids": torch.empty(shape, dtype=torch.long)}
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            batch["labels"][i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
            batch["position_ids"][i, :n] = torch.as_tensor(row["position_ids"], dtype=torch.long)
            batch["position_ids"][i, n:] = torch.arange(longest - n)
            batch["attention_mask"][i, :n] = 1
        return batch


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict:
    """What the model's forward pass takes from a batch: a packed one (with `position_ids`) passes
    no attention mask, so that the restarting position ids decide the mask (transformers' rule, and
    fused_bloom's)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                "attention_mask": None}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
