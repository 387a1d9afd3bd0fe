"""Alpaca data pipeline: load (data_sources.py) → validate → tokenize (cached) → split → sample
→ pad.

`train.py` calls these in order::

    records = load_records(source, cache_dir, fields)  # raw dicts, each named by line/record/row
    records, stats = validate_records(records, source)  # clean records, counts for the banner
    dataset = tokenize_records(records, tokenizer, Prompter(), max_length, train_on_inputs,
                               cache_dir)
    train_ds, valid_ds = split_train_valid(dataset, size_valid_set, seed)
    sampler = LengthGroupedSampler(train_ds["length"], batch_size, world, rank, seed)
        # or DistributedSampler
    loader = DataLoader(train_ds, batch_size, sampler=sampler, collate_fn=PadCollator(tokenizer))

Every problem with the user's data is raised as `DataError`, whose one-line message names the file
or URL, the record (as "line 7", "record 3" or "row 2", counted from 1) and what is wrong, so
`train.py` can print it and exit before loading the model.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import datasets
import torch

from support.atomic import atomic_write
from support.data_sources import (ALPACA_FIELDS, DataError, Records, _names, _type_name,
                                  quiet_datasets)

# IGNORE_INDEX: the label the loss skips (padding; prompt tokens with TRAIN_ON_INPUTS=false)
from support.token_loss import IGNORE_INDEX

# Part of the tokenization cache key: bump it whenever _tokenize_batch changes what it produces, so
# caches written by the old code are not loaded by the new one.
TOKENIZE_VERSION = 2
_META_FILE = "alpaca_meta.json"


class PromptTemplate(Protocol):
    """What tokenizing needs of a prompt builder: `prompter.Prompter` (passed in by train.py)."""

    def generate_prompt(self, instruction: str, input: str | None = None,
                        label: str | None = None) -> str: ...


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------

def _is_placeholder_input(text: str) -> bool:
    """True for inputs that mean "no input": blank, or "Noinput" / "No input." / "<no input>" in any
    case and punctuation ("NO_INPUT", "(no input)"). Words such as "None" or "N/A" are left alone:
    they can be a real input to an instruction."""
    return not text.strip() or re.sub(r"[^a-z]", "", text.lower()) == "noinput"


def validate_records(records: Sequence, source: str) -> tuple[list[dict], dict]:
    """Check every record and normalize the Alpaca quirks.

    A record must be an object with string `instruction` (non-blank) and `output`; `input` must be a
    string, absent, or null (absent and null mean no input; Hugging Face datasets fill missing keys
    with null). Other keys are not used (the stats name them). Placeholder inputs ("Noinput", "No
    input.", "<no input>" and their case and punctuation variants, or whitespace) become "". Records
    whose output is empty or whitespace are dropped and counted: training on them teaches the model
    to stop at once. Outputs such as "<nooutput>" are kept as they are.

    Args:
        records: the list returned by `load_records`, whose `Records.where` names each record in
            messages as the file does ("line 7" of a JSONL or CSV file, "record 3" of a JSON list,
            "row 2" of a table); a plain list is numbered "record 1", "record 2", ...
        source: the file, URL or dataset id the records came from, used in messages.

    Returns:
        `(clean, stats)`: `clean` holds new dicts with exactly `instruction`, `input`, `output`, in
        order; `stats` has `source`, `records` (number in), `kept`, `empty_output_dropped`,
        `placeholder_inputs` `with_input` (kept records with a real input) and `unused_columns` (the
        data's other column names).

    Raises:
        DataError: the list is empty or not a list, a record is malformed (the message names the
            source, the record as above and the problem), or no record has an output.
    """
    if not isinstance(records, (list, tuple)):
        raise DataError(f"{source}: expected a list of records, got {_type_name(records)}")
    if not records:
        raise DataError(f"{source}: no records (the list is empty)")
    records = records if isinstance(records, Records) else Records(records)
    # messages use the data's own column names (DATA_FIELDS may have renamed them)
    name = records.column
    clean, empty_outputs, placeholders = [], 0, 0
    # other columns, in the order first seen
    unused = dict.fromkeys(getattr(records, "dropped", []))
    for i, record in enumerate(records):
        where = f"{source}: {records.where(i)}"
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected an object with '{name('instruction')}' and "
                            f"'{name('output')}', got {_type_name(record)}")
        unused.update(dict.fromkeys(k for k in record if k not in ALPACA_FIELDS))
        for key in ("instruction", "output"):
            if key not in record:
                raise DataError(f"{where}: {_missing(records, record, key)}")
            if not isinstance(record[key], str):
                raise DataError(f"{where}: '{name(key)}' must be a string, got "
                                f"{_type_name(record[key])}")
        if not record["instruction"].strip():
            raise DataError(f"{where}: '{name('instruction')}' is empty")
        text_input = record.get("input")
        if text_input is None:
            text_input = ""
        elif not isinstance(text_input, str):
            raise DataError(f"{where}: '{name('input')}' must be a string, got "
                            f"{_type_name(text_input)}")
        elif text_input and _is_placeholder_input(text_input):
            text_input = ""
            placeholders += 1
        if not record["output"].strip():
            empty_outputs += 1
            continue
        clean.append({"instruction": record["instruction"], "input": text_input,
                      "output": record["output"]})
    if not clean:
        raise DataError(f"{source}: all {len(records):,} records have an empty output")
    stats = {
        "source": str(source),
        "records": len(records),
        "kept": len(clean),
        "empty_output_dropped": empty_outputs,
        "placeholder_inputs": placeholders,
        "with_input": sum(1 for r in clean if r["input"]),
        "unused_columns": [str(k) for k in unused],
    }
    return clean, stats


def _missing(records: Records, record: Mapping, key: str) -> str:
    """Why a record lacks `key`: the columns it has instead, and how to map them (DATA_FIELDS)."""
    has = (f"the record has: {_names(records.column(k) for k in record)}" if record
           else "the record is empty")
    if records.column(key) != key:
        return f"missing '{records.column(key)}', which DATA_FIELDS maps to {key} ({has})"
    return (f"missing '{key}' ({has}; expected: instruction, output, and optionally input); "
            f"map other names with DATA_FIELDS=instruction=...,output=...")


def data_stats_line(stats: Mapping) -> str:
    """Counts for the start banner, from the stats of `validate_records` (plus `tokenize_records` if
    given).

    The caller names the source. Example: "2,000 records, 1,996 kept (4 empty outputs dropped, 24
    placeholder inputs cleared, 854 with input); 1,996 tokenized, 2 truncated, 0 dropped with no
    response token", and the columns not used, if any ("; columns not used: context").
    """
    line = (f"{stats['records']:,} records, {stats['kept']:,} kept "
            f"({stats['empty_output_dropped']:,} empty outputs dropped, "
            f"{stats['placeholder_inputs']:,} placeholder inputs cleared, {stats['with_input']:,} "
            "with input)")
    if "examples" in stats:
        line += (f"; {stats['examples']:,} tokenized, {stats['truncated']:,} truncated, "
                 f"{stats['no_label_dropped']:,} dropped with no response token")
    if stats.get("unused_columns"):
        line += f"; columns not used: {_names(stats['unused_columns'])}"
    return line


def answer_cut_warning(stats: Mapping, max_length: int) -> str:
    """A line for the banner when MAX_LENGTH cut away the whole answer of some examples (kept with
    TRAIN_ON_INPUTS, they train on their prompt alone), else ""."""
    cut = stats.get("answer_cut", 0)
    if not cut:
        return ""
    return (f"{cut:,} of {stats['examples']:,} examples lost their whole answer to "
            f"MAX_LENGTH={max_length} (the prompt alone fills it) and train on the prompt only; "
            "raise MAX_LENGTH, or TRAIN_ON_INPUTS=false drops them")


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------

def _preamble_ids(tokenizer, prompter: PromptTemplate) -> dict[str, list[int]]:
    """Token ids of each template's fixed first paragraph ("Below is an instruction ...
    request.\n\n").

    Every prompt starts with one of these preambles, a third of all the text to tokenize, so they
    are tokenized once here instead of once per record. A preamble is used only if, on probe
    prompts, `tokenizer(preamble) + tokenizer(rest, add_special_tokens=False)` equals
    `tokenizer(prompt)` exactly (true when the tokenizer splits at the blank line, as BLOOM's does);
    otherwise prompts are tokenized whole.
    """
    preambles = {}
    for probe_input in ("", "x"):
        head = prompter.generate_prompt("\0", probe_input).split("\0")[0]
        preamble = head[:head.rfind("\n\n") + 2]
        if not preamble:
            continue
        ids = tokenizer(preamble)["input_ids"]
        probes = [prompter.generate_prompt(ins, probe_input)
                  for ins in ("a", " b.", "\n\nc", "### d", "é\t")]
        if all(tokenizer(p)["input_ids"] == ids + tokenizer(p[len(preamble):],
                                                            add_special_tokens=False)["input_ids"]
               for p in probes):
            preambles[preamble] = ids
    return preambles


def _encode_prompts(tokenizer, prompts: list[str],
                    preambles: dict[str, list[int]]) -> list[list[int]]:
    """`tokenizer(prompts)["input_ids"]`, reusing the preambles' ids (see `_preamble_ids`)."""
    heads: list[list[int]] = []
    rests: list[str] = []
    whole: list[int] = []  # positions of prompts without a known preamble
    for i, prompt in enumerate(prompts):
        preamble = next((p for p in preambles if prompt.startswith(p)), None)
        heads.append(preambles[preamble] if preamble else [])
        rests.append(prompt[len(preamble):] if preamble else "")
        if not preamble:
            whole.append(i)
    out = [head + rest for head, rest in zip(
        heads, tokenizer(rests, add_special_tokens=False,
                         return_attention_mask=False)["input_ids"])]
    if whole:
        for i, ids in zip(whole,
                          tokenizer([prompts[i] for i in whole],
                                    return_attention_mask=False)["input_ids"]):
            out[i] = ids
    return out


def _tokenize_batch(batch: dict, tokenizer, prompter: PromptTemplate, max_length: int,
                    train_on_inputs: bool, preambles: dict[str, list[int]]) -> dict:
    """Batched `datasets.map` function: records → input_ids, labels, length (see
    `tokenize_records`)."""
    prompts = [prompter.generate_prompt(ins, inp)
               for ins, inp in zip(batch["instruction"], batch["input"])]
    # The prompt is tokenized exactly as generation will tokenize it (tokenizer(prompt)), and the
    # response separately, so the prompt/response boundary is a token boundary and the masked span
    # is exact.
    prompt_ids = _encode_prompts(tokenizer, prompts, preambles)
    response_ids = tokenizer(batch["output"], add_special_tokens=False,
                             return_attention_mask=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "truncated": [],
                            "answer_cut": []}
    for prompt, response in zip(prompt_ids, response_ids):
        ids = (prompt + response)[:max_length]
        truncated = len(prompt) + len(response) > max_length
        # As alpaca-lora: EOS is appended only if it fits; it never replaces the last kept token, so
        # a truncated example does not teach the model to stop mid-sentence.
        if len(ids) < max_length:
            ids.append(eos)
        n_masked = 0 if train_on_inputs else min(len(prompt), len(ids))
        # The causal-LM loss shifts labels left by one, so labels[0] is never predicted. An example
        # with no other label adds nothing but padding, and a batch of only such examples gives a
        # NaN loss.
        if len(ids) <= max(n_masked, 1):
            continue
        labels = [IGNORE_INDEX] * n_masked + ids[n_masked:]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["truncated"].append(truncated)
        # kept (TRAIN_ON_INPUTS): trains on the prompt only
        out["answer_cut"].append(len(prompt) >= max_length)
    return out


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _tokenizer_identity(tokenizer) -> dict:
    """What decides how the tokenizer splits text: class, full tokenizer spec (vocab, merges,
    normalizer, pre-tokenizer, special tokens) and the EOS id. The path it was loaded from is left
    out on purpose: the same tokenizer copied elsewhere gives the same tokens and may reuse the
    cache."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Truncation/padding are call-time settings that transformers changes on the backend; they
        # do not affect our calls (no truncation, no padding) and must not change the key.
        spec.pop("truncation", None)
        spec.pop("padding", None)
        spec_text = json.dumps(spec, sort_keys=True, ensure_ascii=False)
    else:  # a slow (Python) tokenizer: its vocabulary and special tokens identify it well enough
        spec_text = json.dumps([sorted(tokenizer.get_vocab().items()),
                                tokenizer.all_special_tokens])
    return {"class": type(tokenizer).__name__, "spec_sha256": _sha256(spec_text),
            "eos_token_id": tokenizer.eos_token_id}


def tokenize_fingerprint(records: Sequence[Mapping], tokenizer, prompter: PromptTemplate,
                         max_length: int, train_on_inputs: bool) -> tuple[str, dict]:
    """Cache key of `tokenize_records`: a hash of everything that determines its output.

    Returns:
        `(fingerprint, key)`: a 20-hex-digit digest and the dict it was computed from (stored next
        to the cache for inspection).
    """
    content = json.dumps([[r["instruction"], r["input"], r["output"]] for r in records],
                         ensure_ascii=False)
    key = {
        "tokenize_version": TOKENIZE_VERSION,
        "records_sha256": _sha256(content),
        "num_records": len(records),
        "tokenizer": _tokenizer_identity(tokenizer),
        "max_length": max_length,
        "train_on_inputs": bool(train_on_inputs),
        # The rendered template rather than the Prompter's attributes: any change to the prompt
        # text, however it is made, changes the key.
        "template_sha256": _sha256(prompter.generate_prompt("<I>", "<N>", "<L>") + "\0"
                                   + prompter.generate_prompt("<I>")),
    }
    return _sha256(json.dumps(key, sort_keys=True))[:20], key


def tokenize_records(records: Sequence[Mapping], tokenizer, prompter: PromptTemplate,
                     max_length: int, train_on_inputs: bool, cache_dir: str | Path,
                     num_proc: int = 1, stats: dict | None = None) -> datasets.Dataset:
    """Tokenize validated records into causal-LM examples, cached on disk.

    Each example is `tokenizer(prompt) + tokenizer(output) + [EOS]`, cut to `max_length` tokens from
    the right; EOS is added only when it fits (alpaca-lora's rule). With `train_on_inputs` the
    labels equal `input_ids` (the assignment's behaviour: the loss covers the prompt too); without
    it the prompt tokens are labelled -100 so only the response and EOS are learned. Examples left
    with no label to learn (the prompt alone fills `max_length`) are dropped and counted.

    The result is saved under `cache_dir/tokenized/<fingerprint>/`, keyed by `tokenize_fingerprint`
    (records content, tokenizer spec, max_length, train_on_inputs, template). A later call with the
    same key loads it instead of tokenizing again. The folder is written to a temp name and renamed
    into place, so an interrupted run or a second process never sees a half-written cache. Under DDP
    every rank may call it at
    once (train.py does): each tokenizes, the first rename publishes the folder, and the others keep
        it.

    Args:
        records: clean records from `validate_records`.
        tokenizer: a Hugging Face tokenizer with an EOS token.
        prompter: builds the prompt text.
        max_length: maximum tokens per example (>= 2).
        train_on_inputs: whether the prompt tokens carry labels.
        cache_dir: cache root; created if missing.
        num_proc: processes for `datasets.map` (1 is fast enough for Alpaca; the tokenizer is
            multithreaded).
        stats: optional dict updated with `examples`, `truncated`, `no_label_dropped` and
            `fingerprint` (the cache key, which a checkpoint stores to recognise its data).

    Returns:
        A `datasets.Dataset` with columns `input_ids`, `labels` (lists of ints) and `length` (int).

    Raises:
        ValueError: `max_length` < 2 or the tokenizer has no EOS token.
        DataError: no example keeps a response token within `max_length`.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; set "
                         "tokenizer.eos_token")
    fingerprint, key = tokenize_fingerprint(records, tokenizer, prompter, max_length,
                                            train_on_inputs)
    root = Path(cache_dir) / "tokenized"
    final = root / fingerprint
    if not (final / _META_FILE).is_file():
        # No "Tokenizing" or "Saving the dataset" bars: the run prints its own one-line summary of
        # the data.
        with quiet_datasets():
            _tokenize_to_cache(records, tokenizer, prompter, max_length, train_on_inputs, num_proc,
                               root, final, fingerprint, key)
    meta = json.loads((final / _META_FILE).read_text(encoding="utf-8"))
    if meta["examples"] == meta["answer_cut"]:  # none kept, or all kept for their prompt alone
        source = f"{stats['source']}: " if stats and "source" in stats else ""
        raise DataError(f"{source}no example keeps a response token within MAX_LENGTH={max_length} "
                        "tokens: every prompt is at least that long; raise MAX_LENGTH or shorten "
                        "the prompts")
    if stats is not None:
        stats.update({k: meta[k]
                      for k in ("examples", "truncated", "answer_cut", "no_label_dropped")},
                     fingerprint=fingerprint)
    with quiet_datasets():
        return datasets.load_from_disk(str(final))


def _tokenize_to_cache(records, tokenizer, prompter, max_length, train_on_inputs, num_proc,
                       root: Path, final: Path, fingerprint: str, key: dict) -> None:
    """Tokenize with a batched `datasets.map` and publish the result at `final` atomically."""
    columns = {name: [r[name] for r in records] for name in ("instruction", "input", "output")}
    raw = datasets.Dataset.from_dict(columns)
    features = datasets.Features({
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "truncated": datasets.Value("bool"),
        "answer_cut": datasets.Value("bool"),
    })
    tokenized = raw.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "prompter": prompter, "max_length": max_length,
                   "train_on_inputs": train_on_inputs,
                   "preambles": _preamble_ids(tokenizer, prompter)},
        remove_columns=raw.column_names,
        features=features,
        num_proc=num_proc if num_proc > 1 else None,
        # Our own key already names the result; this stops datasets from hashing the tokenizer
        # (slow, and noisy warnings when it cannot) to build one of its own.
        new_fingerprint=fingerprint,
        desc="Tokenizing",
    )
    meta = {
        "fingerprint": fingerprint,
        "key": key,
        "records": len(records),
        "examples": len(tokenized),
        "truncated": sum(tokenized.data.column("truncated").to_pylist()),
        "answer_cut": sum(tokenized.data.column("answer_cut").to_pylist()),
        "no_label_dropped": len(records) - len(tokenized),
    }
    tokenized = tokenized.remove_columns(["truncated", "answer_cut"])

    # keep_existing: another process (a DDP rank) may publish the same fingerprint first; its
    # content is the same.
    with atomic_write(final, folder=True, keep_existing=True) as tmp:
        tokenized.save_to_disk(str(tmp))
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Split, padding, sampling
# --------------------------------------------------------------------------------------------------

def split_train_valid(dataset: datasets.Dataset, size_valid_set: int | float,
                      seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split off a validation set, the same way for the same seed.

    Args:
        dataset: the tokenized dataset.
        size_valid_set: an int is a number of examples (0 gives an empty validation set); a float in
            (0, 1) is a fraction, rounded to at least one example.
        seed: seed of the permutation.

    Returns:
        `(train, valid)`, each in the original order (the sampler shuffles).

    Raises:
        ValueError: `size_valid_set` is negative, a float outside (0, 1), or not a number.
        DataError: the validation set would take every example, leaving nothing to train on.
    """
    n = len(dataset)
    if isinstance(size_valid_set, bool) or not isinstance(size_valid_set, (int, float)):
        raise ValueError("size_valid_set must be an int or a float in (0, 1), got "
                         f"{size_valid_set!r}")
    if isinstance(size_valid_set, float):
        if not 0.0 < size_valid_set < 1.0:
            raise ValueError(f"size_valid_set={size_valid_set}: a fraction must be in (0, 1)")
        n_valid = max(1, round(size_valid_set * n))
    else:
        if size_valid_set < 0:
            raise ValueError(f"size_valid_set must be >= 0, got {size_valid_set}")
        n_valid = size_valid_set
    if n_valid >= n:
        raise DataError(f"a validation set of {n_valid:,} examples leaves none of the {n:,} for "
                        f"training; lower size_valid_set")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    # keep_in_memory: the index mapping stays in RAM instead of a file written next to the shared
    # cache, which DDP ranks would otherwise all write at once.
    valid = dataset.select(sorted(perm[:n_valid]), keep_in_memory=True)
    train = dataset.select(sorted(perm[n_valid:]), keep_in_memory=True)
    return train, valid


class PadCollator:
    """Collate examples into a padded batch (use as
    `DataLoader(collate_fn=PadCollator(tokenizer))`).

    Pads to the longest example in the batch (optionally rounded up to a multiple), on the
    tokenizer's padding side (BLOOM: left, so generation continues right after the prompt):
    `input_ids` with the pad token, `attention_mask` 0 and `labels` -100 on pads.
    """

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        """
        Args:
            tokenizer: supplies `pad_token_id` and `padding_side` ("left" or "right").
            pad_to_multiple_of: round the padded length up to a multiple of this (e.g. 8 for tensor
                cores).

        Raises:
            ValueError: the tokenizer has no pad token, or an unknown padding side.
        """
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad_token; set "
                             "tokenizer.pad_token")
        if tokenizer.padding_side not in ("left", "right"):
            raise ValueError("padding_side must be 'left' or 'right', got "
                             f"{tokenizer.padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = tokenizer.pad_token_id
        self.padding_side = tokenizer.padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        """Pad a list of `{"input_ids", "labels", ...}` examples.

        Returns:
            `input_ids`, `attention_mask`, `labels`: LongTensors of shape (batch, longest).
        """
        if not features:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(features), longest)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            assert len(feature["labels"]) == n, "input_ids and labels differ in length"
            span = slice(longest - n, longest) if self.padding_side == "left" else slice(0, n)
            input_ids[row, span] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, span] = torch.as_tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Yields this rank's indices so that `DataLoader(batch_size=batch_size)` batches hold similar
    lengths.

    The counterpart of `DistributedSampler(shuffle=True, drop_last=False)` for GROUP_BY_LENGTH:
    every rank builds the same global order from `seed + epoch`, then takes
    `global_order[rank::num_replicas]`.

    Global order, per epoch:
      1. a random permutation of all indices, padded by repeating its start up to a multiple of
         `num_replicas` (as DistributedSampler pads);
      2. cut into mega-batches of `mega_batch_mult` global batches, each sorted by length, longest
      first;
      3. cut into global batches of `batch_size * num_replicas` indices; the full ones are shuffled,
         the one holding the longest example goes first (an out-of-memory error shows on step 1, not
         mid-epoch), and a final partial batch stays last.
    Because rank r takes every num_replicas-th index, rank r's k-th batch of `batch_size` is a slice
    of global batch k: one process with batch 2b sees exactly the global batches of 2 ranks with
    batch b each.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0, mega_batch_mult: int | None = None):
        """
        Args:
            lengths: length of each example (e.g. `dataset["length"]`).
            batch_size: per-rank batch size, the one given to the DataLoader.
            num_replicas: number of DDP processes.
            rank: this process's rank.
            seed: shared by all ranks; the epoch is added to it.
            mega_batch_mult: global batches per sorted mega-batch. Larger groups lengths more
                tightly but mixes less; the default, as in transformers, is min(50, n // (4 * global
                batch)), at least 1.
        """
        if len(lengths) == 0:
            raise ValueError("LengthGroupedSampler needs at least one example")
        if batch_size < 1 or num_replicas < 1:
            raise ValueError(f"batch_size and num_replicas must be >= 1, got {batch_size} and "
                             f"{num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.global_batch = batch_size * num_replicas
        if mega_batch_mult is None:
            mega_batch_mult = min(50, len(self.lengths) // (4 * self.global_batch))
        self.mega_batch = max(1, mega_batch_mult) * self.global_batch
        self.total_size = math.ceil(len(self.lengths) / num_replicas) * num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch`; call it on every rank before each epoch, as with
        DistributedSampler."""
        self.epoch = epoch

    def global_order(self) -> list[int]:
        """The order shared by all ranks for the current epoch (length `total_size`)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        padding = self.total_size - len(order)
        order += (order * math.ceil(padding / len(order)))[:padding]

        lengths = self.lengths
        grouped: list[int] = []
        for start in range(0, len(order), self.mega_batch):
            grouped += sorted(order[start:start + self.mega_batch], key=lambda i: lengths[i],
                              reverse=True)
        batches = [grouped[s:s + self.global_batch]
                   for s in range(0, len(grouped), self.global_batch)]
        n_full = len(batches) if len(batches[-1]) == self.global_batch else len(batches) - 1
        full = [batches[i] for i in torch.randperm(n_full, generator=g).tolist()]
        if full:
            # Each batch is sorted longest first, so its first element is its longest.
            longest = max(range(n_full), key=lambda b: lengths[full[b][0]])
            full[0], full[longest] = full[longest], full[0]
        return [i for batch in full + batches[n_full:] for i in batch]

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_order()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return self.total_size // self.num_replicas


class SkipSampler(torch.utils.data.Sampler):
    """A sampler's indices from position `skip` on: a resumed epoch starts at the first example not
    yet trained on, without loading and collating the batches before it (batch k is indices
    k*b..(k+1)*b-1 of the sampler)."""

    def __init__(self, sampler) -> None:
        self.sampler, self.skip = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)
