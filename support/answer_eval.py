"""Did fine-tuning help? Generated answers scored against the reference outputs, base model beside
adapter.

Each answer gets two scores against its example's reference output:
  * ROUGE-L F1 (Google's `rouge-score` package, Porter stemmer on): the longest common subsequence
    of words, as the F1 of its precision and recall; 0 to 1. Its tokenizer keeps only ASCII letters
    and digits, so it suits English references like Alpaca's.
  * exact match: 1 when the answer equals the reference after SQuAD's normalisation (lower case,
    punctuation and the articles a/an/the removed, runs of whitespace made one space), else 0.
The means come with a 95 % bootstrap interval (1,000 resamples of the examples, seeded: the same
answers always give the same interval), and the adapter's gain over the base with a paired one (both
resampled on the same examples).

The held-out examples are, by default, the run's own validation set: re-derived from the settings
its checkpoint recorded (DATA_PATH or VALID_DATA_PATH, SIZE_VALID_SET, SEED, ...) with train.py's
own split, and refused if the data changed since (their fingerprint differs from the one the run
recorded). Generation is passed in as a function, so that inference.py (after training) and train.py
(EVAL_GENERATE, during it) score the same way.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import numpy as np

from support.alpaca_data import (
    PromptTemplate, _preamble_ids, _tokenize_batch, split_train_valid, tokenize_fingerprint,
    validate_records,
)
from support.atomic import atomic_write
from support.checkpoint import MANIFEST_NAME, checkpoint_dirs
from support.config import TrainConfig
from support.data_sources import DataError, load_records

EVAL_DIR_NAME = "eval"
ANSWERS_NAME = "answers.jsonl"
REPORT_NAME = "report.md"
SUMMARY_NAME = "summary.json"
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE = 1000, 0, 0.95
# The default --limit: the quick start's whole validation set (100 examples, a minute or two on a
# CPU); on a real run's 2,000, a first look with a usable interval (about +-0.02 on a mean ROUGE-L).
DEFAULT_LIMIT = 100
SIDE_BY_SIDE = 3  # examples the report shows in full
SCORES = ("rouge_l", "exact_match")
SCORE_NAMES = {"rouge_l": "ROUGE-L F1", "exact_match": "exact match"}
MODELS = ("base", "adapter")

_scorer = None


# --- the scores ------------------------------------------------------------------------------

def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 of `answer` against `reference` (rouge-score, stemmed); 0.0 if either has no
    word."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer  # imported only when answers are scored

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_scorer.score(reference, answer)["rougeL"].fmeasure)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a/an/the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(answer: str, reference: str) -> float:
    """1.0 when the answer equals the reference after `normalize_answer`, else 0.0."""
    return float(normalize_answer(answer) == normalize_answer(reference))


def score(answer: str, reference: str) -> dict[str, float]:
    return {"rouge_l": rouge_l(answer, reference), "exact_match": exact_match(answer, reference)}


# --- the statistics --------------------------------------------------------------------------

def bootstrap_interval(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: `resamples` means of n values drawn with
    replacement from the n `values` (NumPy's default_rng(seed)), and their (1 - confidence) / 2 and
    (1 + confidence) / 2 quantiles."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    draws = np.random.default_rng(seed).integers(0, values.size, size=(resamples, values.size))
    means = values[draws].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(low), float(high)


def summarize(rows: Sequence[dict]) -> dict:
    """Per score: each model's mean and interval, the adapter's mean gain over the base with its
    paired interval, and the adapter's wins / ties / losses per example."""
    summary = {"examples": len(rows)}
    for name in SCORES:
        base = np.array([row[f"base_{name}"] for row in rows], dtype=np.float64)
        adapter = np.array([row[f"adapter_{name}"] for row in rows], dtype=np.float64)
        summary[name] = {
            "base": {"mean": float(base.mean()), "ci95": bootstrap_interval(base)},
            "adapter": {"mean": float(adapter.mean()), "ci95": bootstrap_interval(adapter)},
            # Paired: each resample takes the same examples for both models (same seed, same draws).
            "gain": {"mean": float((adapter - base).mean()),
                     "ci95": bootstrap_interval(adapter - base)},
            "wins": int((adapter > base).sum()), "ties": int((adapter == base).sum()),
            "losses": int((adapter < base).sum()),
        }
    return summary


# --- comparing the two models ----------------------------------------------------------------

Generate = Callable[[list[dict]], list[str]]  # records -> one answer each, in order


def compare(records: Sequence[dict], generate_base: Generate, generate_adapter: Generate,
            base_answers: list[str] | None = None) -> list[dict]:
    """One row per record: its instruction, input, reference, both answers and their scores.

    Args:
        records: Alpaca records (instruction, input, output).
        generate_base, generate_adapter: answer a list of records (batched inside), greedy.
        base_answers: answers of the base model computed before (train.py computes them once); then
            `generate_base` is not called.
    """
    records = list(records)
    base_answers = generate_base(records) if base_answers is None else base_answers
    adapter_answers = generate_adapter(records)
    rows = []
    for record, base, adapter in zip(records, base_answers, adapter_answers, strict=True):
        row = {"instruction": record["instruction"], "input": record["input"],
               "reference": record["output"], "base_answer": base, "adapter_answer": adapter}
        for model, answer in (("base", base), ("adapter", adapter)):
            scores = score(answer, record["output"])
            row.update({f"{model}_{name}": value for name, value in scores.items()})
        rows.append(row)
    return rows


def table(summary: dict) -> str:
    """The printed table: each model's means and intervals, the gain, wins / ties / losses."""
    def cell(stat: dict, signed: bool = False) -> str:
        low, high = stat["ci95"]
        mean = f"{stat['mean']:+.4f}" if signed else f"{stat['mean']:.4f}"
        return f"{mean} [{low:.4f}, {high:.4f}]"

    lines = [f"| model | {' | '.join(f'{SCORE_NAMES[n]} (95 % CI)' for n in SCORES)} |",
             "| --- | " + " | ".join("---" for _ in SCORES) + " |"]
    for model in MODELS:
        lines.append(f"| {model} | " + " | ".join(cell(summary[n][model]) for n in SCORES) + " |")
    gains = " | ".join(cell(summary[n]["gain"], signed=True) for n in SCORES)
    counts = " | ".join(f"{summary[n]['wins']} / {summary[n]['ties']} / {summary[n]['losses']}"
                        for n in SCORES)
    lines += [f"| adapter - base | {gains} |", f"| adapter wins / ties / losses | {counts} |"]
    return "\n".join(lines)


def report_markdown(summary: dict, rows: Sequence[dict], about: dict) -> str:
    """The Markdown report: what was evaluated, the table, how the scores are defined, examples
    side by side."""
    setting_lines = [f"- {key}: {value}" for key, value in about.items()]
    lines = [
        "# Base model vs adapter on held-out examples", "",
        *setting_lines, f"- examples: {summary['examples']}", "",
        table(summary), "",
        "ROUGE-L F1: `rouge-score`'s rougeL with the Porter stemmer (words of ASCII letters and "
        "digits). Exact match: equal after SQuAD's normalisation (lower case, no punctuation, no "
        "a/an/the, single spaces). Intervals: percentile bootstrap of the mean, "
        f"{BOOTSTRAP_RESAMPLES:,} resamples of the examples, seed {BOOTSTRAP_SEED}; the gain's is "
        "paired (the same examples for both models). A win: the adapter's answer scores higher "
        "than the base's on that example.", "",
        "## Examples side by side", "",
    ]
    for i, row in enumerate(rows[:SIDE_BY_SIDE], start=1):
        lines += [f"### {i}. {_one_line(row['instruction'])}", ""]
        if row["input"]:
            lines += [f"Input: {_one_line(row['input'])}", ""]
        lines += ["| | answer | ROUGE-L | exact |", "| --- | --- | --- | --- |",
                  f"| reference | {_one_line(row['reference'])} | | |"]
        for model in MODELS:
            answer, rouge = row[f"{model}_answer"], row[f"{model}_rouge_l"]
            exact = row[f"{model}_exact_match"]
            lines.append(f"| {model} | {_one_line(answer)} | {rouge:.4f} | {exact:.0f} |")
        lines.append("")
    lines.append(f"Every example, with both answers and scores: `{ANSWERS_NAME}`.")
    return "\n".join(lines) + "\n"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + " ..."


def write_results(folder: Path, rows: Sequence[dict], summary: dict, report: str) -> Path:
    """Write `folder` (answers.jsonl, summary.json, report.md) as one unit: the old one stays until
    the new one is complete. Returns the report's path."""
    with atomic_write(folder, folder=True) as staging:
        lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (staging / ANSWERS_NAME).write_text("".join(lines), encoding="utf-8")
        (staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (staging / REPORT_NAME).write_text(report, encoding="utf-8")
    return folder / REPORT_NAME


# --- which examples --------------------------------------------------------------------------

def clean_records(source: str, cache_dir: str, data_fields: dict[str, str]) -> list[dict]:
    """The records of a data file as training reads them (DATA_FIELDS applied, checked, placeholders
    cleared).

    Raises:
        DataError: the file is missing or unreadable, or a record has no instruction or output
            (named).
    """
    return validate_records(load_records(source, cache_dir, data_fields), source)[0]


def run_settings(adapter_dir: Path) -> tuple[TrainConfig, dict, Path]:
    """The settings and run identity a training run recorded in `adapter_dir` (its newest
    checkpoint's manifest.json, or the folder's own when it is a checkpoint), and the manifest's
    path.

    Raises:
        FileNotFoundError: no manifest: the folder is not a train.py run (then --data names the
            examples).
    """
    folders = [adapter_dir, *checkpoint_dirs(adapter_dir)]  # a checkpoint, or a run's newest first
    candidates = [folder / MANIFEST_NAME for folder in folders]
    for path in candidates:
        if path.is_file():
            manifest = json.loads(path.read_text(encoding="utf-8"))
            known = {name: value for name, value in manifest["config"].items()
                     if name in TrainConfig.__dataclass_fields__}
            return TrainConfig(**known), manifest["identity"], path
    raise FileNotFoundError(f"{adapter_dir} holds no checkpoint manifest recording the run's "
                            "validation split (a train.py run writes one in each "
                            "checkpoint-<step>/); pass --data FILE with the examples to score")


def validation_records(cfg: TrainConfig, tokenizer, prompter: PromptTemplate,
                       data_fingerprint: str | None = None) -> list[dict]:
    """The run's validation examples as records, in train.py's order: VALID_DATA_PATH's, or those
    split_train_valid took out of DATA_PATH (the same count, seed and permutation over the same
    tokenized examples).

    Args:
        data_fingerprint: the run's recorded one (run identity "data"); when given, data that
            changed since the run are refused instead of giving another split.

    Raises:
        DataError: the data cannot be read, or no longer match `data_fingerprint`.
    """
    train_records = clean_records(cfg.data_path, cfg.cache_dir, cfg.data_field_map)
    def fingerprint_of(records: list[dict]) -> str:  # as prepare_datasets' stats record it
        return tokenize_fingerprint(records, tokenizer, prompter, cfg.max_length,
                                    cfg.train_on_inputs)[0]

    fingerprint = fingerprint_of(train_records)
    valid_records = None
    if cfg.valid_data_path:
        valid_records = clean_records(cfg.valid_data_path, cfg.cache_dir, cfg.data_field_map)
        fingerprint += fingerprint_of(valid_records)
    if data_fingerprint is not None and fingerprint != data_fingerprint:
        source = (f"VALID_DATA_PATH={cfg.valid_data_path}" if cfg.valid_data_path
                  else f"DATA_PATH={cfg.data_path}")
        raise DataError(f"{source}: the data changed since the run split it (their fingerprint "
                        "differs from the one the run recorded), so its validation examples cannot "
                        "be found again; pass --data FILE")
    if valid_records is not None:
        return _trainable(valid_records, tokenizer, prompter, cfg)
    examples = _trainable(train_records, tokenizer, prompter, cfg)
    size, _ = cfg.resolve_valid_size(len(examples))
    positions = datasets.Dataset.from_dict({"index": list(range(len(examples)))})
    _, valid = split_train_valid(positions, size, cfg.seed)  # train.py's own split of the examples
    return [examples[i] for i in valid["index"]]


def _trainable(records: list[dict], tokenizer, prompter: PromptTemplate,
               cfg: TrainConfig) -> list[dict]:
    """The records tokenize_records keeps as examples, in order. With TRAIN_ON_INPUTS every record
    keeps a label (the prompt's own tokens); without, those whose prompt fills MAX_LENGTH are
    dropped, by the same function."""
    if cfg.train_on_inputs:
        return records
    preambles = _preamble_ids(tokenizer, prompter)
    kept = []
    for record in records:
        batch = {name: [record[name]] for name in ("instruction", "input", "output")}
        example = _tokenize_batch(batch, tokenizer, prompter, cfg.max_length, False, preambles)
        if example["input_ids"]:
            kept.append(record)
    return kept


def heldout_set(adapter_dir: Path, data: str | None, data_fields: str, tokenizer,
                prompter: PromptTemplate) -> tuple[list[dict], dict]:
    """The examples to evaluate on, and lines for the report saying which: the records of `data`
    (DATA_FIELDS mapping its columns), or else the validation examples of the run that wrote
    `adapter_dir`.

    Raises:
        DataError: unreadable data, a record without an output to score against, or changed run
            data.
        FileNotFoundError: no `data` and no run settings in `adapter_dir`. ConfigError: a bad
            DATA_FIELDS.
    """
    if data:
        fields = TrainConfig(data_fields=data_fields).data_field_map  # checked as train.py does
        return clean_records(data, ".cache", fields), {"examples from": f"--data {data}"}
    cfg, identity, manifest = run_settings(adapter_dir)
    split = (f"VALID_DATA_PATH={cfg.valid_data_path}" if cfg.valid_data_path else
             f"split off DATA_PATH={cfg.data_path} with SIZE_VALID_SET={cfg.size_valid_set:g}, "
             f"SEED={cfg.seed}")
    about = {"examples from": f"the run's validation set ({split}; settings read from {manifest})"}
    return validation_records(cfg, tokenizer, prompter, identity.get("data")), about


def check_limit(limit: int | None, available: int, what: str) -> int:
    """The number of examples to evaluate: `limit`, or by default the first DEFAULT_LIMIT (all when
    fewer).

    Raises:
        ValueError: `limit` is below 1 or above the `available` examples of `what`.
    """
    if limit is None:
        return min(DEFAULT_LIMIT, available)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"--limit must be a whole number >= 1, got {limit!r}")
    if limit > available:
        raise ValueError(f"--limit {limit} is more than the {available:,} examples of {what}; "
                         f"pass --limit {available} or less")
    return limit
