"""What every benchmark in bench/ shares: the random BLOOM-shaped model's arguments, the command line to reproduce a
run, interleaved timing rounds, timing fences, peak memory, the device's name and the atomic write of the results
table."""

import argparse
import concurrent.futures
import json
import platform
import re
import resource
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from transformers import BloomConfig

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BLOOM_1B7 = dict(vocab_size=250880, hidden_size=2048, n_layer=24, n_head=16)  # bigscience/bloom-1b7's config.json
# The shape arguments below and the BloomConfig fields they set.
SHAPE_ARGUMENTS = {"vocab": "vocab_size", "hidden": "hidden_size", "layers": "n_layer", "heads": "n_head"}


def add_model_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """--hidden, --layers, --heads, --vocab of the random BLOOM-shaped model. The vocabulary is small on purpose:
    BLOOM's 250,880 tokens would make the lm_head matmul and the cross-entropy dominate a 4-layer model's step."""
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --threads, read back by `device_from_args`."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")


def device_from_args(args: argparse.Namespace) -> torch.device:
    """The --device to run on, with --threads applied (the README's CPU figures use --threads 1)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return parse_device(args.device)


def parse_device(name: str) -> torch.device:
    """`name` as a torch.device; a name torch does not know, or CUDA where torch sees no GPU, is a one-line error."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name!r}: torch sees no CUDA GPU here (torch {torch.__version__})")
    return device


def bloom_config(args: argparse.Namespace) -> BloomConfig:
    return BloomConfig(**{field: getattr(args, argument) for argument, field in SHAPE_ARGUMENTS.items()})


def command_line(script: str, argv=None) -> str:
    """The command that reproduces this run, for the top of the results file."""
    argv = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"bench/{script}", *map(shlex.quote, argv)])


def interleave(steps: dict, rounds: int, warmup: int, progress: bool = False) -> dict[str, list[float]]:
    """Call each step function (it returns the seconds it measured) once per round, the order rotating from round to
    round, so that drift in a shared machine's load hits every variant alike; warm-up rounds are dropped.

    Returns:
        name -> the seconds of each timed round, in round order (so that ratios can be taken round by round).
    """
    names = list(steps)
    times = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = steps[name]()
            if round_index >= warmup:
                times[name].append(seconds)
        if progress:
            print(f"round {round_index + 1}/{warmup + rounds}" + (" (warm-up)" if round_index < warmup else ""),
                  file=sys.stderr, flush=True)
    return times


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures it (CUDA calls return before the kernels finish)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(run, device: torch.device) -> dict:
    """Call `run()` and return the peak memory it reached, in bytes, with the memory in use before it ("before").

    On a GPU: torch.cuda.max_memory_allocated (tensors only, not the caching allocator's reserve). On a CPU: the
    peak resident set size, VmHWM from /proc/self/status, reset first via /proc/self/clear_refs so that what came
    before does not count; it includes the Python process and the torch libraries, hence "before". Where /proc is
    missing (not Linux): resource.getrusage's ru_maxrss since the process started, "before" None. Run it in a fresh
    process per variant: freed memory is not always returned to the system, so a second variant would see the
    first's peak.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        return {"method": "cuda", "peak": torch.cuda.max_memory_allocated(device), "before": before}
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        before = _proc_status_kib("VmRSS") * 1024
        run()
        return {"method": "vmhwm", "peak": _proc_status_kib("VmHWM") * 1024, "before": before}
    except OSError:
        run()
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return {"method": "ru_maxrss", "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
                "before": None}


def answer_memory_request(measure, args) -> bool:
    """The child's side of `memory_in_fresh_process`: when this process was started with --measure-memory, print
    `measure(args)` as the JSON line the parent reads, and return True (the caller then stops)."""
    if not args.measure_memory:
        return False
    print(json.dumps(measure(args)))
    return True


def memory_in_fresh_process(script: str, argv: list[str], variant: str) -> dict:
    """Run `script` (a benchmark's own file) again with `argv` + `--measure-memory VARIANT`, in a new process;
    return the JSON it prints last (its `peak_memory` of that one variant)."""
    command = [sys.executable, str(Path(script).resolve()), *argv, "--measure-memory", variant]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"memory run of {variant!r} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_of_variants(script: str, argv: list[str], variants: list[str], jobs: int = 1) -> dict[str, dict]:
    """`memory_in_fresh_process` for each variant, `jobs` processes at a time. Each process measures only itself,
    so running several at once changes no figure (on a GPU they share its memory: only what is free limits `jobs`);
    it saves the processes' start-up, which dominates on a big GPU."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        pending = {variant: pool.submit(memory_in_fresh_process, script, argv, variant) for variant in variants}
        memory = {}
        for variant, future in pending.items():
            memory[variant] = future.result()
            print(f"memory of {variant}: done", file=sys.stderr, flush=True)
    return memory


def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
