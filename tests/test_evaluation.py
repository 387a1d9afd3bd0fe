"""`python inference.py evaluate` (base vs adapter, scored against the references), EVAL_GENERATE,
REPORT_TO and the lm-evaluation-harness task: checked against rouge-score called directly, a plain
NumPy bootstrap, TensorBoard's own event reader and lm_eval's own generation."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import inference
import train
from conftest import REPO, SAMPLE, TINY_BLOOM, metric_rows, one_torch_thread
from support import answer_eval, metrics
from support.config import ConfigError, TrainConfig, load_config

SHIPPED = REPO / "eval_tasks" / "alpaca_sample_heldout.jsonl"
MEANS = re.compile(r"^\| (base|adapter) \| ([0-9.]+) \[[^]]+\] \| ([0-9.]+) \[", re.MULTILINE)


def evaluate(argv: list[str], capsys) -> tuple[int, str, str]:
    """`python inference.py evaluate ARGV` in this process, on one torch thread
    (conftest.one_torch_thread)."""
    with one_torch_thread():
        code = inference.main(["evaluate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_rows(adapter_dir: Path) -> list[dict]:
    lines = eval_text(adapter_dir, answer_eval.ANSWERS_NAME).splitlines()
    return [json.loads(line) for line in lines]


def eval_text(adapter_dir: Path, name: str) -> str:
    return (adapter_dir / answer_eval.EVAL_DIR_NAME / name).read_text(encoding="utf-8")


def shipped_records() -> list[dict]:
    return [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines()]


def check_scores(adapter_dir: Path) -> list[dict]:
    """The stored scores recomputed with rouge-score itself from the stored answers and references
    (to 1e-6), and the report's and summary.json's means equal to the answers' means."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rows = read_rows(adapter_dir)
    for row in rows:
        for model in ("base", "adapter"):
            expected = scorer.score(row["reference"], row[f"{model}_answer"])["rougeL"].fmeasure
            assert abs(row[f"{model}_rouge_l"] - expected) <= 1e-6
            words = [" ".join(row[key].lower().split()) for key in (f"{model}_answer", "reference")]
            assert row[f"{model}_exact_match"] >= (words[0] == words[1])  # equal up to case, spaces
    report = eval_text(adapter_dir, answer_eval.REPORT_NAME)
    summary = json.loads(eval_text(adapter_dir, answer_eval.SUMMARY_NAME))
    printed = {model: (float(rouge), float(exact)) for model, rouge, exact in MEANS.findall(report)}
    assert printed.keys() == {"base", "adapter"}
    for model in ("base", "adapter"):
        means = [np.mean([row[f"{model}_{name}"] for row in rows]) for name in answer_eval.SCORES]
        assert printed[model] == pytest.approx(means, abs=5e-5)  # printed with 4 decimals
        stored = [summary[name][model]["mean"] for name in answer_eval.SCORES]
        assert stored == pytest.approx(means, abs=1e-12)
    return rows


# --- the scores and the interval ------------------------------------------------------------

def test_bootstrap_interval_is_the_plain_percentile_bootstrap():
    """Against a loop written the textbook way (same seed, one resample at a time, np.percentile),
    and against the normal approximation mean +- 1.96 sd / sqrt(n) on a sample where it holds."""
    values = np.random.default_rng(7).normal(0.3, 0.2, size=400)
    rng = np.random.default_rng(answer_eval.BOOTSTRAP_SEED)
    means = [values[rng.integers(0, values.size, size=values.size)].mean() for _ in range(1000)]
    expected = np.percentile(means, [2.5, 97.5])
    assert answer_eval.bootstrap_interval(values) == pytest.approx(tuple(expected), abs=1e-12)
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    low, high = answer_eval.bootstrap_interval(values)
    assert low == pytest.approx(values.mean() - half, abs=0.15 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.15 * half)
    assert answer_eval.bootstrap_interval([0.5] * 10) == (0.5, 0.5)


def test_exact_match_is_squad_normalised_and_rouge_l_is_rouge_scores():
    assert answer_eval.exact_match("The Eiffel tower!", "eiffel  Tower") == 1.0
    assert answer_eval.exact_match("Paris, France", "Paris") == 0.0
    assert answer_eval.rouge_l("", "a reference") == 0.0
    # Stemmed: "cats" is "cat"; precision 3/3, recall 3/4.
    assert answer_eval.rouge_l("the cats sat", "the cat sat down") == pytest.approx(2 * 0.75 / 1.75)


def test_summary_counts_wins_ties_losses_and_pairs_the_gain():
    scores = [(0.1, 0.3, 1.0), (0.2, 0.2, 0.0), (0.5, 0.1, 0.0), (0.0, 0.4, 0.0)]
    rows = [{"base_rouge_l": b, "adapter_rouge_l": a, "base_exact_match": 0.0,
             "adapter_exact_match": e} for b, a, e in scores]
    summary = answer_eval.summarize(rows)
    rouge = summary["rouge_l"]
    assert (rouge["wins"], rouge["ties"], rouge["losses"]) == (2, 1, 1)
    assert summary["rouge_l"]["gain"]["mean"] == pytest.approx(0.25 - 0.2)
    assert summary["exact_match"]["adapter"]["mean"] == 0.25
    assert rouge["gain"]["ci95"] == answer_eval.bootstrap_interval([0.2, 0.0, -0.4, 0.4])


def test_the_shipped_lm_eval_examples_are_the_quick_starts_validation_set():
    """eval_tasks/alpaca_sample_heldout.jsonl holds the examples `inference.py evaluate` takes after
    the quick start (DEBUG=true: SIZE_VALID_SET=100 of the sample, seed 42), in the same order."""
    from prompter import Prompter
    from support.model_loading import load_tokenizer

    cfg = load_config([], {"DEBUG": "true", "MODEL_PATH": str(TINY_BLOOM)})
    expected = answer_eval.validation_records(cfg, load_tokenizer(str(TINY_BLOOM)), Prompter())
    shipped = shipped_records()
    assert shipped == expected and len(shipped) == 100
    records = json.loads(SAMPLE.read_text(encoding="utf-8"))
    assert {r["instruction"] for r in shipped} <= {r["instruction"] for r in records}


@pytest.mark.parametrize("settings", [
    {},                                            # the quick start's: TRAIN_ON_INPUTS, none lost
    {"train_on_inputs": False, "max_length": 64},  # prompts filling MAX_LENGTH dropped: split after
    {"valid_data_path": "valid"},                  # a validation file of its own
])
def test_validation_records_are_the_examples_train_py_validates_on(tmp_path, settings):
    """The records answer_eval finds again, tokenized as train.py tokenizes, are train.py's
    validation examples, token for token and in order (prepare_datasets is the reference)."""
    from prompter import Prompter
    from support.alpaca_data import tokenize_records
    from support.model_loading import load_tokenizer

    records = json.loads(SAMPLE.read_text(encoding="utf-8"))
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records[:300]), encoding="utf-8")
    if settings.get("valid_data_path"):
        (tmp_path / "valid.json").write_text(json.dumps(records[300:340]), encoding="utf-8")
        settings = {**settings, "valid_data_path": str(tmp_path / "valid.json")}
    cfg = TrainConfig(model_path=str(TINY_BLOOM), data_path=str(data),
                      cache_dir=str(tmp_path / "cache"), size_valid_set=30, **settings)
    tokenizer = load_tokenizer(str(TINY_BLOOM))
    _, valid_set, stats = train.prepare_datasets(cfg, tokenizer)
    if not cfg.train_on_inputs:
        assert stats["no_label_dropped"] > 0  # the case is exercised
    found = answer_eval.validation_records(cfg, tokenizer, Prompter(), stats["fingerprint"])
    again = tokenize_records(found, tokenizer, Prompter(), cfg.max_length, cfg.train_on_inputs,
                             tmp_path / "again")
    assert again["input_ids"] == valid_set["input_ids"] and len(found) == len(valid_set) > 0
    with pytest.raises(ValueError, match="the data changed since the run split it"):
        answer_eval.validation_records(cfg, tokenizer, Prompter(), "another fingerprint")


# --- settings ------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    ({"REPORT_TO": "tensorbord"}, "REPORT_TO must be tensorboard (comma-separated, each once)"),
    ({"REPORT_TO": "wandb"}, "REPORT_TO=wandb is not supported: use REPORT_TO=tensorboard"),
    ({"REPORT_TO": "tensorboard,tensorboard"}, "REPORT_TO must be"),
    ({"EVAL_GENERATE": "-1"}, "EVAL_GENERATE must be >= 0"),
    ({"EVAL_GENERATE_EVERY_EVAL": "true"},
     "EVAL_GENERATE_EVERY_EVAL=true scores generated answers, but EVAL_GENERATE=0"),
    ({"EVAL_GENERATE": "4", "FSDP": "true"}, "EVAL_GENERATE=4 and FSDP=true"),
])
def test_bad_evaluation_settings_name_the_variable(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([], settings)


def test_report_to_reads_like_a_user_types_it():
    assert load_config([], {"REPORT_TO": " TensorBoard "}).report_to_list == ["tensorboard"]
    assert TrainConfig().report_to_list == []


def test_a_missing_tracker_is_one_line_saying_what_to_install(monkeypatch):
    assert metrics.missing_tracker(["tensorboard"]) == ""
    real = metrics.importlib.util.find_spec
    monkeypatch.setattr(metrics.importlib.util, "find_spec",
                        lambda name: None if name == "tensorboard" else real(name))
    assert metrics.missing_tracker(["tensorboard"]) == (
        "REPORT_TO=tensorboard: tensorboard is not installed: pip install tensorboard==2.21.0")


def test_a_resumed_run_replaces_the_tensorboard_events_past_its_checkpoint(tmp_path):
    """Steps 1-5 logged, the run killed, resumed from step 3 (MetricsLog.trim(3)) and steps 4-5
    logged again: TensorBoard's reader shows the second values of steps 4-5 (purge_step), as
    metrics.jsonl does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = metrics.MetricsLog(tmp_path, enabled=True, report_to=["tensorboard"])
    for step in range(1, 6):
        first.write({"step": step, "epoch": 1, "loss": float(step)})
    first.close()
    resumed = metrics.MetricsLog(tmp_path, enabled=True, report_to=["tensorboard"])
    resumed.trim(3)
    for step in (4, 5):
        resumed.write({"step": step, "epoch": 1, "loss": 10.0 * step})
    resumed.close()
    assert [row["loss"] for row in metric_rows(tmp_path)] == [1.0, 2.0, 3.0, 40.0, 50.0]
    accumulator = EventAccumulator(str(tmp_path / metrics.TENSORBOARD_DIR))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("train/loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


@pytest.mark.slow
def test_training_imports_no_tracker_and_no_scorer_unless_asked():
    """Start-up stays as fast as before: `import train` loads no TensorBoard and no rouge-score."""
    code = ("import sys, train; print(sorted(m for m in ('tensorboard', 'torch.utils.tensorboard', "
            "'rouge_score') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


# --- inference.py evaluate ---------------------------------------------------------------------

@pytest.mark.slow  # an evaluation, generating
def test_evaluate_after_a_run_needs_only_the_adapter(adapter, capsys):
    """The run's own validation examples (4 of conftest's 24-record run), found again from its
    checkpoint; the scores are rouge-score's, the report's means the answers' means; the adapter
    changed the answers."""
    code, out, err = evaluate(["--lora-weights", str(adapter)], capsys)
    assert code == 0, err
    assert "| base |" in out and "| adapter |" in out
    assert f"report: {adapter / 'eval' / 'report.md'}" in out
    rows = check_scores(adapter)
    cfg, _, _ = answer_eval.run_settings(adapter)
    from prompter import Prompter
    from support.model_loading import load_tokenizer

    expected = answer_eval.validation_records(cfg, load_tokenizer(str(TINY_BLOOM)), Prompter())
    assert [(r["instruction"], r["input"], r["reference"]) for r in rows] == [
        (r["instruction"], r["input"], r["output"]) for r in expected]
    assert len(rows) == cfg.size_valid_set == 4
    assert any(r["base_answer"] != r["adapter_answer"] for r in rows)
    # Greedy and batched: the same answers as generate_inference gives one by one.
    with one_torch_thread():
        single = inference.generate_inference(rows[0]["instruction"], rows[0]["input"], None,
                                              str(adapter),
                                              max_new_tokens=inference.EVAL_MAX_NEW_TOKENS)
    assert single == rows[0]["adapter_answer"]


def alpaca_file(tmp_path: Path, kind: str) -> Path:
    """Five sample records (one with an input) as an Alpaca .json, or as a .csv with other column
    names."""
    records = json.loads(SAMPLE.read_text(encoding="utf-8"))[1500:1505]
    if kind == "json":
        path = tmp_path / "mine.json"
        path.write_text(json.dumps(records), encoding="utf-8")
        return path
    path = tmp_path / "mine.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "context", "completion"])
        writer.writerows([r["instruction"], r["input"], r["output"]] for r in records)
    return path


@pytest.mark.slow  # two evaluations, generating
def test_evaluate_on_a_json_file_and_a_csv_with_data_fields(adapter, tmp_path, capsys, monkeypatch):
    """--data on files the repo does not ship: the same records as a .json and as a .csv whose
    columns DATA_FIELDS maps give the same rows."""
    records = json.loads(alpaca_file(tmp_path, "json").read_text(encoding="utf-8"))
    results = {}
    for kind in ("json", "csv"):
        if kind == "csv":
            monkeypatch.setenv("DATA_FIELDS", "instruction=prompt,input=context,output=completion")
        data = str(alpaca_file(tmp_path, kind))
        code, out, err = evaluate(["--lora-weights", str(adapter), "--data", data], capsys)
        assert code == 0, err
        assert "5 examples; report:" in out
        results[kind] = check_scores(adapter)
    assert [(r["instruction"], r["input"], r["reference"]) for r in results["json"]] == [
        (r["instruction"], r["input"], r["output"]) for r in records]
    assert results["csv"] == results["json"]


@pytest.mark.parametrize("case", ["not an adapter", "no outputs", "limit too large",
                                  "bad data fields"])
def test_bad_input_is_one_line_and_writes_nothing(adapter, tmp_path, capsys, case):
    before = sorted(p.name for p in adapter.iterdir())
    eval_dir = adapter / "eval"
    previous = eval_dir.is_dir() and read_rows(adapter)
    no_outputs = tmp_path / "questions.json"
    no_outputs.write_text(json.dumps([{"instruction": "Name a colour."},
                                      {"instruction": "Count to 3."}]))
    argv, expected = {
        "not an adapter": (["--lora-weights", str(tmp_path)], "adapter_config.json"),
        "no outputs": (["--lora-weights", str(adapter), "--data", str(no_outputs)], "output"),
        "limit too large": (["--lora-weights", str(adapter), "--limit", "5"],
                            "--limit 5 is more than the 4 examples"),
        "bad data fields": (["--lora-weights", str(adapter), "--data", str(no_outputs),
                             "--data-fields", "x=y"], "DATA_FIELDS must be like"),
    }[case]
    code, out, err = evaluate(argv, capsys)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    assert sorted(p.name for p in adapter.iterdir()) == before and not (tmp_path / "eval").exists()
    assert (eval_dir.is_dir() and read_rows(adapter)) == previous  # an earlier one left as it was


@pytest.mark.slow
def test_eval_generate_scores_the_same_answers_as_evaluate(tmp_path, capsys):
    """EVAL_GENERATE=4 at the run's end (the LoRA layers unmerged, in the training loop) gives the
    means that `inference.py evaluate --limit 4` gives afterwards (adapter merged, loaded from
    disk), and they reach metrics.jsonl and the end-of-run summary."""
    data = tmp_path / "small.json"
    records = json.loads(SAMPLE.read_text(encoding="utf-8"))[:24]
    data.write_text(json.dumps(records), encoding="utf-8")
    cfg = TrainConfig(model_path=str(TINY_BLOOM), data_path=str(data),
                      output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                      max_length=128, batch_size=4, grad_accum_steps=1, lora_dropout=0.0,
                      warmup_steps=0, size_valid_set=6, eval_freq=0, num_epochs=1, max_steps=4,
                      learning_rate=3e-3, eval_generate=4)
    with one_torch_thread():
        train.run(cfg, train.DistEnv())
    out = capsys.readouterr().out
    row = [r for r in metric_rows(tmp_path / "out") if "eval_rouge_l" in r]
    assert len(row) == 1 and row[0]["step"] == 4 and row[0]["eval_generated"] == 4
    assert f"on 4 validation answers ROUGE-L {row[0]['eval_rouge_l']:.4f}" in out
    code, _, err = evaluate(["--lora-weights", str(tmp_path / "out"), "--limit", "4"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "eval" / "summary.json").read_text())
    for name in answer_eval.SCORES:
        assert row[0][f"eval_{name}"] == pytest.approx(summary[name]["adapter"]["mean"], abs=1e-9)
        assert row[0][f"eval_base_{name}"] == pytest.approx(summary[name]["base"]["mean"], abs=1e-9)


def test_eval_generate_larger_than_the_validation_set_stops_before_training(tmp_path):
    cfg = TrainConfig(model_path=str(TINY_BLOOM), data_path=str(SAMPLE),
                      output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                      size_valid_set=3, eval_generate=4, max_steps=1)
    with pytest.raises(ConfigError, match="EVAL_GENERATE=4 is more than the 3 validation examples"):
        train.run(cfg, train.DistEnv())
    assert not (tmp_path / "out").exists()


# --- end to end (slow) -------------------------------------------------------------------------

def single_threaded_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.mark.slow
def test_bar1_evaluate_after_the_quick_start_as_typed(quick_start_run):
    """After the README quick start, `python inference.py evaluate --lora-weights outputs/debug`
    with nothing else: the quick start's 100 validation examples, scored, printed and written."""
    folder, result = quick_start_run
    assert result.returncode == 0, result.stderr[-2000:]
    command = [sys.executable, str(REPO / "inference.py"), "evaluate", "--lora-weights",
               "outputs/debug"]
    done = subprocess.run(command, cwd=folder, env=single_threaded_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^\| base \| [0-9.]+ \[", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^\| adapter \| [0-9.]+ \[", done.stdout, re.MULTILINE)
    assert "100 examples; report: " in done.stdout
    rows = check_scores(folder / "outputs" / "debug")
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in shipped_records()]


@pytest.mark.slow
def test_bar3_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    """`REPORT_TO=tensorboard DEBUG=true MODEL_PATH=models/tiny-bloom python train.py` (shortened to
    6 steps, with EVAL_GENERATE so the answer scores are streamed too): TensorBoard's
    EventAccumulator reads back every metrics.jsonl value at its step (to float32, the event file's
    precision)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_train import user_command

    result = user_command(tmp_path, REPORT_TO="tensorboard", DEBUG="true",
                          MODEL_PATH="models/tiny-bloom", MAX_STEPS="6", EVAL_FREQ="3",
                          EVAL_GENERATE="4", EVAL_GENERATE_EVERY_EVAL="true", OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "outputs" / "debug"
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    expected: dict[str, dict[int, float]] = {}
    for row in metric_rows(out):
        for tag, value in metrics.scalars(row).items():
            expected.setdefault(tag, {})[row["step"]] = value
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss",
            "eval/rouge_l", "eval/base_rouge_l", "eval/exact_match"} <= expected.keys()
    assert sorted(expected["eval/loss"]) == [3, 6]
    assert sorted(expected["train/loss"]) == list(range(1, 7))
    assert set(accumulator.Tags()["scalars"]) == expected.keys()
    for tag, by_step in expected.items():
        read = {event.step: event.value for event in accumulator.Scalars(tag)}
        assert read == {step: float(np.float32(value)) for step, value in by_step.items()}


@pytest.mark.slow
def test_bar4_lm_eval_runs_the_shipped_task_on_the_quick_start_adapter(quick_start_run, tmp_path):
    """The docs' lm_eval command on the quick start's adapter (loaded by PEFT inside lm_eval): it
    runs offline and its greedy answers are the ones `inference.py evaluate` wrote for the same
    examples (our merged LoRA and generation loop against PEFT's and lm_eval's)."""
    folder, result = quick_start_run
    assert result.returncode == 0, result.stderr[-2000:]
    adapter = folder / "outputs" / "debug"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args",
         f"pretrained={TINY_BLOOM},peft={adapter},dtype=float32",
         "--tasks", "alpaca_sample_heldout",
         "--include_path", "eval_tasks/", "--device", "cpu", "--batch_size", "1", "--limit", "4",
         "--output_path", str(tmp_path / "lm_eval"), "--log_samples"],
        cwd=REPO, env=single_threaded_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "alpaca_sample_heldout" in done.stdout and "rouge_l" in done.stdout
    files = (tmp_path / "lm_eval").rglob("samples_alpaca_sample_heldout_*.jsonl")
    samples = [json.loads(line) for path in files
               for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(samples) == 4
    if not (adapter / "eval" / answer_eval.ANSWERS_NAME).is_file():
        code = inference.main(["evaluate", "--lora-weights", str(adapter), "--limit", "4"])
        assert code == 0
    ours = {r["instruction"]: r for r in read_rows(adapter)}
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        row = ours[sample["doc"]["instruction"]]
        from prompter import Prompter

        assert Prompter().get_response(sample["resps"][0][0]) == row["adapter_answer"]
        assert sample["rouge_l"] == pytest.approx(row["adapter_rouge_l"], abs=1e-12)
