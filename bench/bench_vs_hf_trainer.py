"""Benchmark train.py against the usual recipe (PEFT + transformers.Trainer, alpaca-lora's data path and settings):
loop time per real token, whole wall time, start-up, tail and peak memory above the loaded model.

Reproduce (from the repository root)::

    python bench/bench_vs_hf_trainer.py                    # bf16 + length grouping, 1,000 Alpaca examples
    python bench/bench_vs_hf_trainer.py --precision fp32   # the same in float32
    python bench/bench_vs_hf_trainer.py --memory           # peak memory: BLOOM's vocabulary, 3 steps of 4 x 512
    python bench/bench_vs_hf_trainer.py --packing          # ours packed vs the recipe's best and its default
    python bench/bench_vs_hf_trainer.py --packing --device cuda   # the same on the GPU (bf16, or fp16 on a T4)

--packing runs three sides: ours with PACKING=true (no length grouping), the recipe's best (bf16 + length
grouping) and its default (bf16, no grouping, as alpaca-lora runs); the epoch loop time of each is its loop time
per real token times the epoch's real tokens (the loop rate over the whole epoch: ours packed makes about a
quarter of the recipe's optimizer steps, so leaving out step 1 would leave out more of its epoch); the table also
gives ours' fill (real tokens / row tokens) and each side's wall time.

The two sides, each run as a fresh process of its own (`python train.py`, `python bench/hf_trainer_recipe.py`), on
the same model folder and the same records, one after the other, the order alternating from round to round (ours
first in round 1, the recipe first in round 2, ...):
  ours    `python train.py`, set by env vars: DATA_PATH / VALID_DATA_PATH (the files below), MAX_LENGTH, BATCH_SIZE,
          GRAD_ACCUM_STEPS, PRECISION, GROUP_BY_LENGTH, NUM_EPOCHS=1, LoRA r=8, alpha=16, dropout 0.05 on
          query_key_value, LEARNING_RATE=3e-4, WARMUP_STEPS=100, WEIGHT_DECAY=0, EVAL_FREQ=0 and SAVE_STEPS=0 (one
          evaluation and one checkpoint, at the end), its own tokenization cache in a fresh folder.
  recipe  bench/hf_trainer_recipe.py: alpaca-lora's finetune.py on the CPU, the same settings (its docstring lists
          what it keeps and what it changes); evaluation once at the end; datasets' cache in a fresh folder.
Both read a training file and a validation file the benchmark writes: the first --records records of --data (after
train.py's checks: placeholder inputs cleared, empty outputs dropped) and the --valid-records after them, so both
sides train on the same text. In --memory mode each training record's output is repeated until it is longer than
--max-length tokens, so that every example is cut to exactly 512 tokens on both sides (no padding).

What is measured, the same way on both sides (the clock: time.time(), wall time):
  launch      the benchmark's clock just before it starts the process;
  step ends   the end of each optimizer step: ours, the time stamp train.py writes with each step's line of
              metrics.jsonl (right after the step, to the millisecond); the recipe, a TrainerCallback's on_step_end
              (right after the optimizer step, the schedule and zero_grad). Each interval between two step ends
              holds whatever the loop does between steps (loading and padding the next batches, logging, the
              progress bar) and, on both sides, no evaluation and no checkpoint;
  exit        the benchmark's clock when it sees the process end;
  start-up    launch -> end of step 1 (imports, data, model, adapters, and step 1 itself, which carries one-time
              costs on both sides: train.py's try-the-longest-batch pass, the first AdamW state, warm-up);
  loop        end of step 1 -> end of step N; loop time per real token = loop / the real tokens of steps 2..N;
  tail        end of step N -> exit (the final evaluation, saving, interpreter exit);
  wall        launch -> exit = start-up + loop + tail;
  real tokens non-pad tokens of the inputs (attention mask): ours, the `tokens` of each step's metrics.jsonl line;
              the recipe, Trainer's num_input_tokens_seen (include_num_input_tokens_seen="non_padding"). The two
              sides tokenize on their own (the recipe the whole prompt + output, train.py the two parts), so their
              totals may differ slightly; the benchmark stops with an error beyond 1 %;
  memory      from outside the process, through /proc/PID/status: when the process says its model, adapters, data
              and trainer are built (ours: the start banner; the recipe: `READY`, right before trainer.train()) the
              benchmark reads its resident size (VmRSS, "the loaded model") and resets its peak (VmHWM, by writing 5
              to /proc/PID/clear_refs); it then reads VmHWM every 20 ms until the process ends. Peak memory above the
              loaded model = the last VmHWM read - that VmRSS: training, the final evaluation and saving included.
              Where clear_refs cannot be written, the largest VmRSS sampled every 20 ms is used instead (the table
              says which).
  CPU time    user + system time of the process (getrusage of the benchmark's reaped children: the sides run one at
              a time), and cores busy on average = CPU time / wall (2 on this machine's 2 cores at best).

Reported: each run's figures, each side's median over the rounds, and ours / recipe of those medians; the table goes
to bench/results/vs_hf_trainer[_memory][_fp32].md (by --memory and --precision), written atomically, with the
command at the top, and is printed. Default model: a random BLOOM (bench/make_random_bloom.py) of hidden 512, 8
heads, 8 layers and vocabulary 16,384 (--memory: 2 layers, BLOOM's 250,880), with models/tiny-bloom's tokenizer,
built once into .cache/bench-models/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dataclasses  # noqa: E402
from importlib.metadata import version  # noqa: E402

import torch  # noqa: E402

from bench.common import RESULTS, command_line, describe_device  # noqa: E402
from prompter import Prompter  # noqa: E402
from support import model_loading # noqa: E402
from support.alpaca_data import validate_records # noqa: E402
from support.atomic import write_text_atomically # noqa: E402
from support.config import TrainConfig # noqa: E402

SIDES = {"ours": "train.py", "recipe": "PEFT + Trainer"}
RECIPE = ROOT / "bench" / "hf_trainer_recipe.py"
MODELS = ROOT / ".cache" / "bench-models"
POLL_S = 0.02
TOKEN_TOLERANCE = 0.01  # the two sides' real tokens may differ by this fraction
# Issue 17's first milestones: ours / recipe loop time per real token, and peak memory above the loaded model.
TARGETS = {"bf16": 0.75, "fp32": 0.9, "memory": 0.2}
# Issue 30's bars for --packing: ours packed / the recipe's epoch loop time (first milestones in brackets).
PACKING_TARGETS = {"recipe": (0.7, 0.8), "recipe-default": (0.5, 0.6)}
PACKING_SIDES = {"ours": "train.py, PACKING=true", "recipe": "PEFT + Trainer, length grouping",
                 "recipe-default": "PEFT + Trainer, no grouping"}
# Defaults of the two modes: timing (bar 2 of the issue) and --memory (bar 3).
MODES = {
    "timing": dict(hidden=512, heads=8, layers=8, vocab=16384, records=1000, valid_records=50, max_length=256,
                   batch=4, accum=2),
    "memory": dict(hidden=512, heads=8, layers=2, vocab=250880, records=12, valid_records=4, max_length=512,
                   batch=4, accum=1),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", action="store_true",
                        help="the memory settings: vocabulary 250,880, 2 layers, 3 steps of 4 x 512-token batches")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="a model folder (default: a random BLOOM of --hidden, --heads, --layers, --vocab)")
    for name in ("hidden", "heads", "layers", "vocab"):
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"default {MODES['timing'][name]} ({MODES['memory'][name]} with --memory)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "alpaca_sample.json")
    parser.add_argument("--records", type=int, default=None, help="training records (default 1000; 12 with "
                                                                   "--memory)")
    parser.add_argument("--valid-records", type=int, default=None, help="validation records, evaluated once at "
                                                                         "the end (default 50; 4 with --memory)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                        help="default bf16; with --device cuda bf16 where the GPU has it natively, else fp16")
    parser.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--packing", action="store_true",
                        help="ours with PACKING=true against the recipe with and without length grouping")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="both sides on this device")
    parser.add_argument("--max-length", type=int, default=None, help="default 256 (512 with --memory)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default 4)")
    parser.add_argument("--accum", type=int, default=None, help="gradient accumulation (default 2; 1 with --memory)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds, each running both sides once")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of both sides (default: torch's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default bench/results/vs_hf_trainer[_memory][_fp32].md, by --memory and --precision")
    args = parser.parse_args(argv)
    mode = "memory" if args.memory else "timing"
    for name, value in MODES[mode].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here")
    if args.precision is None:
        native_bf16 = args.device == "cpu" or torch.cuda.is_bf16_supported(including_emulation=False)
        args.precision = "bf16" if native_bf16 else "fp16"
    if args.packing and args.memory:
        parser.error("--packing and --memory: one mode at a time")
    if args.out is None:
        args.out = RESULTS / ("vs_hf_trainer" + "_memory" * args.memory + "_packing" * args.packing
                              + "_fp32" * (args.precision == "fp32") + "_cuda" * (args.device == "cuda") + ".md")
    small = [name for name in ("records", "valid_records", "max_length", "batch", "accum", "repeats")
             if getattr(args, name) < 1]
    if small:
        parser.error(f"--{small[0].replace('_', '-')} must be >= 1")
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    return args


# --- the model and the records -----------------------------------------------------------------------------------

def model_folder(args) -> Path:
    """--model-path, or the random BLOOM of the shape arguments, built once into .cache/bench-models/."""
    if args.model_path is not None:
        if not (args.model_path / "config.json").is_file():
            raise SystemExit(f"error: --model-path {args.model_path}: no config.json there")
        return args.model_path
    folder = MODELS / f"bloom-h{args.hidden}-a{args.heads}-l{args.layers}-v{args.vocab}"
    if not folder.exists():
        print(f"building {folder}", file=sys.stderr, flush=True)
        from bench.make_random_bloom import main as make_random_bloom

        MODELS.mkdir(parents=True, exist_ok=True)
        make_random_bloom(["--out", str(folder), "--hidden", str(args.hidden), "--heads", str(args.heads),
                           "--layers", str(args.layers), "--vocab", str(args.vocab)])
    return folder


def write_records(args, model: Path, folder: Path) -> tuple[Path, Path]:
    """The training and validation files both sides read (see the module's docstring)."""
    records, _ = validate_records(json.loads(args.data.read_text(encoding="utf-8")), str(args.data))
    if len(records) < args.records + args.valid_records:
        raise SystemExit(f"error: --data {args.data} has {len(records):,} usable records, fewer than --records "
                         f"{args.records} + --valid-records {args.valid_records}")
    train, valid = records[:args.records], records[args.records:args.records + args.valid_records]
    if args.memory:
        tokenizer = model_loading.load_tokenizer(str(model))
        train = [lengthened(record, tokenizer, args.max_length) for record in train]
    paths = folder / "train.json", folder / "valid.json"
    for path, part in zip(paths, (train, valid)):
        path.write_text(json.dumps(part, ensure_ascii=False), encoding="utf-8")
    return paths


def lengthened(record: dict, tokenizer, max_length: int) -> dict:
    """`record` with its output repeated until the prompt and output are longer than `max_length` tokens (with a
    margin, so that both sides' tokenizations are cut at `max_length`)."""
    prompt, output = Prompter().generate_prompt(record["instruction"], record["input"]), record["output"]
    while len(tokenizer(prompt + output)["input_ids"]) < max_length + 32:
        output = f"{output} {record['output']}"
    return {**record, "output": output}


# --- one run of one side -----------------------------------------------------------------------------------------

def side_command(side: str, args, model: Path, files: tuple[Path, Path], run_dir: Path) -> tuple[list, dict, str]:
    """The command and environment of one run, and the start of the line the process prints once its model, data
    and trainer are built."""
    env = {name: value for name, value in os.environ.items()
           if name.lower() not in {f.name for f in dataclasses.fields(TrainConfig)}}  # no stray DEBUG, BATCH_SIZE..
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # both sides on the CPU also where a GPU is present
    grouping = args.group_by_length and not args.packing or side == "recipe" and args.packing
    if side == "ours":
        env.update(MODEL_PATH=str(model), DATA_PATH=str(files[0]), VALID_DATA_PATH=str(files[1]),
                   OUTPUT_DIR=str(run_dir / "out"), CACHE_DIR=str(run_dir / "cache"), NUM_EPOCHS="1",
                   MAX_LENGTH=str(args.max_length), BATCH_SIZE=str(args.batch), GRAD_ACCUM_STEPS=str(args.accum),
                   PRECISION=args.precision, GROUP_BY_LENGTH=str(grouping).lower(),
                   PACKING=str(args.packing).lower(),
                   LORA_R="8", LORA_ALPHA="16", LORA_DROPOUT="0.05", TARGET_MODULES="query_key_value",
                   LEARNING_RATE="3e-4", WARMUP_STEPS="100", WEIGHT_DECAY="0", MAX_GRAD_NORM="1.0", SEED="42",
                   TRAIN_ON_INPUTS="true", EVAL_FREQ="0", SAVE_STEPS="0")
        return [sys.executable, str(ROOT / "train.py")], env, "model "
    command = [sys.executable, str(RECIPE), "--model-path", str(model), "--train-file", str(files[0]),
               "--valid-file", str(files[1]), "--output-dir", str(run_dir / "out"),
               "--cache-dir", str(run_dir / "cache"), "--timings", str(run_dir / "timings.json"),
               "--precision", args.precision, "--device", args.device, "--cutoff-len", str(args.max_length),
               "--micro-batch-size", str(args.batch), "--grad-accum", str(args.accum)]
    return command + (["--group-by-length"] if grouping else []), env, "READY"


def run_side(side: str, args, model: Path, files: tuple[Path, Path], run_dir: Path) -> dict:
    """Run one side to its end, watching its memory; returns its figures (see `figures`)."""
    run_dir.mkdir(parents=True)
    command, env, ready_line = side_command(side, args, model, files, run_dir)
    log = (run_dir / "log.txt").open("w", encoding="utf-8")
    watch = {"baseline": None, "method": None}
    ready = threading.Event()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)  # the sides run one at a time: the delta is this one
    launch = time.time()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)

    def read_stdout() -> None:
        for line in process.stdout:
            log.write(line)
            if not ready.is_set() and line.startswith(ready_line):
                watch["baseline"] = proc_status_bytes(process.pid, "VmRSS")
                try:
                    Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # VmHWM := the current VmRSS
                    watch["method"] = "VmHWM"
                except OSError:
                    watch["method"] = "VmRSS samples"
                ready.set()

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    peak = 0
    while True:
        try:
            process.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            if ready.is_set():  # set only after the reset: every value read here is this run's peak so far
                field = "VmHWM" if watch["method"] == "VmHWM" else "VmRSS"
                peak = max(peak, proc_status_bytes(process.pid, field) or 0)
    exit_time = time.time()
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    reader.join()
    log.close()
    if process.returncode != 0:
        tail = (run_dir / "log.txt").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"error: {side} exited with {process.returncode}: {' '.join(command)}\n{tail}")
    if watch["baseline"] is None:
        raise SystemExit(f"error: {side} never printed its ready line {ready_line!r} (see {run_dir / 'log.txt'})")
    ends, tokens = step_ends(side, run_dir)
    cpu = {"cpu_s": (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime),
           "system_s": cpu_after.ru_stime - cpu_before.ru_stime}
    return {**figures(launch, ends, tokens, exit_time, watch["baseline"], peak, watch["method"]), **cpu,
            "cores_busy": cpu["cpu_s"] / (exit_time - launch), **packed_fill(run_dir / "log.txt")}


def packed_fill(log: Path) -> dict:
    """Ours with PACKING=true: the rows and fill its banner reports ({} for the other runs)."""
    found = re.search(r"packing +[\d,]+ train examples in ([\d,]+) rows \(fill ([\d.]+)\)", log.read_text())
    return {"rows": int(found.group(1).replace(",", "")), "fill": float(found.group(2))} if found else {}


def proc_status_bytes(pid: int, field: str) -> int | None:
    """A memory field of /proc/PID/status in bytes; None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(found.group(1)) * 1024 if found else None


def step_ends(side: str, run_dir: Path) -> tuple[list[float], list[int]]:
    """Each optimizer step's end (time.time() seconds) and the real tokens trained up to it, as the run wrote them."""
    if side.startswith("recipe"):
        timings = json.loads((run_dir / "timings.json").read_text())
        return timings["step_end_times"], timings["real_tokens_seen"]
    rows = [json.loads(line) for line in (run_dir / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    ends = [datetime.datetime.fromisoformat(row["time"]).timestamp() for row in steps]  # local time, as written
    seen, tokens = 0, []
    for row in steps:
        seen += row["tokens"]
        tokens.append(seen)
    return ends, tokens


def figures(launch: float, ends: list[float], tokens: list[int], exit_time: float, baseline: int, peak: int,
            method: str) -> dict:
    if len(ends) < 2:
        raise SystemExit(f"error: a run made {len(ends)} optimizer step(s); the loop needs 2 or more (raise "
                         "--records)")
    loop = ends[-1] - ends[0]
    return {"steps": len(ends), "real_tokens": tokens[-1], "loop_tokens": tokens[-1] - tokens[0], "loop_s": loop,
            "loop_us_per_token": 1e6 * loop / (tokens[-1] - tokens[0]), "startup_s": ends[0] - launch,
            "tail_s": exit_time - ends[-1], "wall_s": exit_time - launch, "loaded_gib": baseline / 2**30,
            "peak_above_gib": max(peak - baseline, 0) / 2**30, "memory_method": method}


def run_rounds(args, model: Path, files: tuple[Path, Path], work: Path) -> list[dict]:
    """`args.repeats` rounds of both sides, the order alternating; each run's figures with its round and side."""
    runs = []
    sides = PACKING_SIDES if args.packing else SIDES
    for round_index in range(args.repeats):
        order = list(sides) if round_index % 2 == 0 else list(sides)[::-1]
        for position, side in enumerate(order):
            started = time.time()
            result = run_side(side, args, model, files, work / f"{round_index + 1}-{side}")
            runs.append({"round": round_index + 1, "position": position + 1, "side": side, **result})
            print(f"round {round_index + 1}/{args.repeats}, {side}: {time.time() - started:.0f} s, loop "
                  f"{result['loop_us_per_token']:.1f} us/real token", file=sys.stderr, flush=True)
    return runs


# --- report ------------------------------------------------------------------------------------------------------

# (key, label, format) of the summary table's rows
ROWS = [
    ("loop_us_per_token", "loop time per real token, us", "{:.2f}"),
    ("loop_s", "loop time (end of step 1 -> end of step N), s", "{:.2f}"),
    ("loop_tokens", "real tokens in the loop (steps 2..N)", "{:,.0f}"),
    ("real_tokens", "real tokens, all steps", "{:,.0f}"),
    ("steps", "optimizer steps", "{:.0f}"),
    ("startup_s", "start-up (launch -> end of step 1), s", "{:.2f}"),
    ("tail_s", "tail (end of step N -> exit), s", "{:.2f}"),
    ("wall_s", "whole wall time, s", "{:.2f}"),
    ("loaded_gib", "resident memory of the loaded model, GiB", "{:.3f}"),
    ("peak_above_gib", "peak memory above the loaded model, GiB", "{:.3f}"),
    ("cpu_s", "CPU time of the process (user + system), s", "{:.2f}"),
    ("system_s", "of which system time (page faults of fresh memory, ...), s", "{:.2f}"),
    ("cores_busy", "cores busy on average (CPU time / wall time)", "{:.2f}"),
]


def summarize(runs: list[dict]) -> dict:
    """Each side's median of each figure, and ours / recipe of the medians."""
    medians = {side: {key: statistics.median(run[key] for run in runs if run["side"] == side) for key, _, _ in ROWS}
               for side in SIDES}
    ratios = {key: medians["ours"][key] / medians["recipe"][key] if medians["recipe"][key] else float("nan")
              for key, _, _ in ROWS}
    token_difference = medians["ours"]["real_tokens"] / medians["recipe"]["real_tokens"] - 1
    return {"medians": medians, "ratios": ratios, "token_difference": token_difference}


def markdown(args, argv, model: Path, runs: list[dict], summary: dict) -> str:
    medians, ratios = summary["medians"], summary["ratios"]
    method = runs[0]["memory_method"]
    setting = (f"{args.precision}" + (" + length grouping" if args.group_by_length else ", no length grouping"))
    lines = [
        "# train.py vs the usual recipe (PEFT + transformers.Trainer)" + (": memory" if args.memory else ""),
        "",
        f"Reproduce: `{command_line('bench_vs_hf_trainer.py', argv)}`",
        "",
        f"- Device: {device_line(args)}; OMP_NUM_THREADS "
        f"{args.threads or 'unset (torch default)'}; torch {torch.__version__}, transformers "
        f"{version('transformers')}, peft {version('peft')}, accelerate {version('accelerate')}.",
        f"- Model: {model_description(model)}.",
        f"- Data: {args.records:,} training records of `{display_path(args.data)}`"
        + (" (outputs repeated until every example is cut at --max-length)" if args.memory else "")
        + f", {args.valid_records:,} validation records evaluated once at the end; one epoch.",
        f"- Settings, both sides: {setting}; max length {args.max_length}; batch {args.batch} x {args.accum} "
        "accumulation; LoRA r=8, alpha=16, dropout 0.05 on query_key_value; lr 3e-4, 100 warm-up steps; no "
        "evaluation or checkpoint inside the loop. Ours: `python train.py`; the recipe: "
        "`python bench/hf_trainer_recipe.py` (alpaca-lora's finetune.py on the CPU).",
        f"- {args.repeats} round(s), each running both sides once in fresh processes, the order alternating (ours "
        "first in odd rounds); figures are medians over rounds, ratios are ours / recipe of the medians.",
        "- Loop: from the end of optimizer step 1 to the end of step N (ours: metrics.jsonl's time stamps; the "
        "recipe: TrainerCallback.on_step_end), divided by the real (non-pad) tokens of steps 2..N. Start-up: "
        "launch to the end of step 1. Tail: end of step N to the process's exit (final evaluation, saving).",
        "- Memory: resident size (VmRSS) when the model, adapters, data and trainer are built (ours: the start "
        "banner; the recipe: right before trainer.train()); peak above it: "
        + ("VmHWM, reset at that moment through /proc/PID/clear_refs, read every 20 ms until the exit."
           if method == "VmHWM" else "the largest VmRSS sampled every 20 ms until the exit (clear_refs not "
                                     "writable here)"),
        f"- Real tokens, ours vs the recipe: {summary['token_difference']:+.2%} (each side tokenizes on its own).",
        "",
        "| | ours (train.py) | recipe (PEFT + Trainer) | ours / recipe |",
        "|---|---|---|---|",
    ]
    for key, label, fmt in ROWS:
        lines.append(f"| {label} | {fmt.format(medians['ours'][key])} | {fmt.format(medians['recipe'][key])} "
                     f"| {ratios[key]:.3f} |")
    lines += ["", "Each run:", "",
              "| round | side | loop us / real token | loop s | start-up s | tail s | wall s | real tokens "
              "| loaded GiB | peak above GiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run['round']} ({run['position']}.) | {run['side']} | {run['loop_us_per_token']:.2f} "
                     f"| {run['loop_s']:.2f} | {run['startup_s']:.2f} | {run['tail_s']:.2f} | {run['wall_s']:.2f} "
                     f"| {run['real_tokens']:,} | {run['loaded_gib']:.3f} | {run['peak_above_gib']:.3f} |")
    lines += ["", target_line(args, ratios)]
    return "\n".join(lines) + "\n"


def target_line(args, ratios: dict) -> str:
    """Issue 17's milestone for this mode, and whether this run meets it."""
    if args.memory:
        key, target, what = "peak_above_gib", TARGETS["memory"], "peak memory above the loaded model"
    else:
        key, target, what = "loop_us_per_token", TARGETS[args.precision], "loop time per real token"
    verdict = "holds" if ratios[key] <= target else "does NOT hold"
    return f"Milestone (issue 17): ours / recipe {what} <= {target} ({args.precision}): {verdict} ({ratios[key]:.3f})."


def cpu_matrix_features() -> str:
    """The CPU's model and its matrix instructions (lscpu's flags: AMX, AVX512-BF16, AVX512-FP16), which decide how
    fast bf16 matrix products run: the ratios of this benchmark differ between CPUs with and without them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU features unknown"
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    found = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = set(found.group(1).split()) if found else set()
    names = {"amx_tile": "AMX", "avx512_bf16": "AVX512-BF16", "avx512_fp16": "AVX512-FP16"}
    present = [label for flag, label in names.items() if flag in flags]
    absent = [label for flag, label in names.items() if flag not in flags]
    return (f"{model.group(1).strip() if model else platform_name()}, {os.cpu_count()} cores; matrix features: "
            f"{', '.join(present) or 'none'}" + (f" (no {', no '.join(absent)})" if absent else ""))


def platform_name() -> str:
    import platform

    return platform.processor() or platform.machine()


def device_line(args) -> str:
    if args.device == "cuda":
        return f"cuda ({describe_device(torch.device('cuda'))}); host CPU {cpu_matrix_features()}"
    return f"cpu ({describe_device(torch.device('cpu'))}; {cpu_matrix_features()})"


def report_packing(args, argv, model: Path, runs: list[dict], started: float) -> dict:
    """--packing: each side's medians, the epoch loop time (loop time per real token x the epoch's real tokens),
    ours / each recipe side; the table written and printed; returns {"runs", "medians", "ratios"}."""
    medians = {}
    for side in PACKING_SIDES:
        mine = [run for run in runs if run["side"] == side]
        medians[side] = {key: statistics.median(run[key] for run in mine) for key in
                         ("loop_us_per_token", "loop_s", "real_tokens", "steps", "startup_s", "wall_s")}
        medians[side]["epoch_loop_s"] = medians[side]["loop_us_per_token"] * medians[side]["real_tokens"] / 1e6
    fill = statistics.median(run["fill"] for run in runs if run["side"] == "ours")
    rows = statistics.median(run["rows"] for run in runs if run["side"] == "ours")
    ratios = {side: {key: medians["ours"][key] / medians[side][key] for key in ("epoch_loop_s", "wall_s",
                                                                                "loop_us_per_token")}
              for side in ("recipe", "recipe-default")}
    token_difference = max(abs(medians["ours"]["real_tokens"] / medians[side]["real_tokens"] - 1)
                           for side in ratios)
    table = packing_markdown(args, argv, model, runs, medians, ratios, fill, rows, token_difference)
    write_text_atomically(args.out, table)
    print(table)
    print(f"ours packed / recipe: epoch loop {ratios['recipe']['epoch_loop_s']:.3f} (length grouping), "
          f"{ratios['recipe-default']['epoch_loop_s']:.3f} (no grouping); fill {fill:.3f}  "
          f"({time.time() - started:.0f} s in all; table: {display_path(args.out)})")
    if token_difference > TOKEN_TOLERANCE:
        raise SystemExit(f"error: the sides trained on different amounts of text (real tokens differ by "
                         f"{token_difference:.2%}, more than {TOKEN_TOLERANCE:.0%}): not comparable")
    return {"runs": runs, "medians": medians, "ratios": ratios, "fill": fill}


PACKING_ROWS = [("epoch_loop_s", "epoch loop time (loop time per real token x the epoch's real tokens), s",
                 "{:.2f}"),
                ("loop_us_per_token", "loop time per real token, us", "{:.2f}"),
                ("loop_s", "loop time (end of step 1 -> end of step N), s", "{:.2f}"),
                ("wall_s", "whole wall time, s", "{:.2f}"),
                ("startup_s", "start-up (launch -> end of step 1), s", "{:.2f}"),
                ("steps", "optimizer steps", "{:.0f}"),
                ("real_tokens", "real tokens, all steps", "{:,.0f}")]


def packing_markdown(args, argv, model, runs, medians, ratios, fill, rows, token_difference) -> str:
    lines = [
        "# train.py packed vs the usual recipe (PEFT + transformers.Trainer), one epoch each",
        "",
        f"Reproduce: `{command_line('bench_vs_hf_trainer.py', argv)}`",
        "",
        f"- Device: {device_line(args)}; OMP_NUM_THREADS {args.threads or 'unset (torch default)'}; torch "
        f"{torch.__version__}, transformers {version('transformers')}, peft {version('peft')}.",
        f"- Model: {model_description(model)}.",
        f"- Data: {args.records:,} training records of `{display_path(args.data)}`, {args.valid_records:,} "
        "validation records evaluated once at the end; one epoch.",
        f"- Settings, every side: {args.precision}; max length {args.max_length}; batch {args.batch} x {args.accum} "
        "accumulation (ours: packed rows of up to max length tokens; the recipe: examples); LoRA r=8, alpha=16, "
        "dropout 0.05 on query_key_value; lr 3e-4, 100 warm-up steps.",
        f"- Ours: PACKING=true, {rows:,.0f} rows, fill {fill:.3f} (real tokens / row tokens). The recipe's padding: "
        "bench/results/data.md (about 0.5 real tokens per padded token without grouping, 0.96 with).",
        f"- {args.repeats} round(s), the order of the sides alternating; medians over rounds. Real tokens, ours vs "
        f"each recipe side: within {token_difference:.2%}.",
        "",
        "| | ours (packed) | recipe, length grouping | recipe, no grouping | ours / grouping | ours / no grouping |",
        "|---|---|---|---|---|---|",
    ]
    for key, label, fmt in PACKING_ROWS:
        cells = [fmt.format(medians[side][key]) for side in PACKING_SIDES]
        ratio = [f"{ratios[side][key]:.3f}" if key in ratios[side] else "" for side in ("recipe", "recipe-default")]
        lines.append(f"| {label} | {' | '.join(cells)} | {' | '.join(ratio)} |")
    lines += ["", "Each run:", "", "| round | side | epoch loop s | loop us / real token | wall s | steps |",
              "|---|---|---|---|---|---|"]
    for run in runs:
        epoch = run["loop_us_per_token"] * run["real_tokens"] / 1e6
        lines.append(f"| {run['round']} ({run['position']}.) | {run['side']} | {epoch:.2f} "
                     f"| {run['loop_us_per_token']:.2f} | {run['wall_s']:.2f} | {run['steps']} |")
    lines.append("")
    for side, (bar, milestone) in PACKING_TARGETS.items():
        ratio = ratios[side]["epoch_loop_s"]
        verdict = ("holds" if ratio <= bar else f"does NOT hold (first milestone {milestone}: "
                   + ("holds" if ratio <= milestone else "does not hold either") + ")")
        lines.append(f"- Bar (issue 30): ours packed / {PACKING_SIDES[side]} epoch loop time <= {bar}: {verdict} "
                     f"({ratio:.3f}).")
    return "\n".join(lines) + "\n"


def model_description(model: Path) -> str:
    config = json.loads((model / "config.json").read_text())
    shape = ", ".join(f"{name} {config[name]}" for name in ("hidden_size", "n_head", "n_layer", "vocab_size")
                      if name in config)
    return f"`{display_path(model)}` ({config.get('model_type', '?')}: {shape}; {config.get('dtype', '?')} on disk)"


def display_path(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv=None) -> dict:
    """Run the benchmark; returns {"runs", "medians", "ratios", "token_difference"}."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # for the table's device line; the sides get OMP_NUM_THREADS
    model = model_folder(args)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-vs-hf-") as work:
        files = write_records(args, model, Path(work))
        runs = run_rounds(args, model, files, Path(work))
    if args.packing:
        return report_packing(args, argv, model, runs, started)
    summary = summarize(runs)
    table = markdown(args, argv, model, runs, summary)
    write_text_atomically(args.out, table)
    print(table)
    ratios = summary["ratios"]
    print(f"ours / recipe: loop time per real token {ratios['loop_us_per_token']:.3f}, whole wall time "
          f"{ratios['wall_s']:.3f}, start-up {ratios['startup_s']:.3f}, tail {ratios['tail_s']:.3f}, peak memory "
          f"above the loaded model {ratios['peak_above_gib']:.3f}  ({time.time() - started:.0f} s in all; table: "
          f"{display_path(args.out)})")
    if abs(summary["token_difference"]) > TOKEN_TOLERANCE:
        raise SystemExit(f"error: the two sides trained on different amounts of text (real tokens differ by "
                         f"{summary['token_difference']:+.2%}, more than {TOKEN_TOLERANCE:.0%}): not comparable")
    return {"runs": runs, **summary}


if __name__ == "__main__":
    main()
