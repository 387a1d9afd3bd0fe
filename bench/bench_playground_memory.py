"""The playground holds one model: the resident memory of `python inference.py serve` after both panes answered,
against a process that only calls `generate_inference` once with the same model and adapter (issue 18, bar 2:
within 10 %).

Reproduce (from the repository root)::

    python bench/make_random_bloom.py --out /tmp/bloom-1b7-random     # BLOOM-1b7's shapes, random weights
    python bench/bench_playground_memory.py --model-path /tmp/bloom-1b7-random
    python bench/bench_playground_memory.py --model-path models/tiny-bloom --out bench/results/playground_memory_tiny.md

Adapter: `--lora-weights`, or a random one (r=8, alpha=16 on query_key_value, A and B non-zero) written to a
temporary folder. Both processes run on the CPU in `--precision` (auto: fp32), answer `--instruction` greedily with
`--new-tokens` tokens, and are measured the same way: psutil's RSS once the answers are out, and the peak (VmHWM in
/proc/PID/status). The server answers through its page's own HTTP API (the `generate` event the Generate button
fires: adapter pane, then base pane), not through a browser, whose memory is not the server's. The server's
difference is the web stack (Gradio, FastAPI, uvicorn: about 150 MiB on this machine, whatever the model) plus the
unmerged adapter's matrices; a second copy of the model would add the whole "model weights" row.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from bench.common import RESULTS, command_line  # noqa: E402
from support.atomic import write_text_atomically # noqa: E402

# The reference: generate_inference alone, as a notebook calls it (adapter merged), then its own figures.
REFERENCE = """
import json, re, sys, psutil, inference
from pathlib import Path
model_path, lora_weights, precision, instruction, new_tokens = sys.argv[1:]
answer = inference.generate_inference(instruction, "", model_path, lora_weights, precision=precision,
                                      max_new_tokens=int(new_tokens))
model = inference.load_model(model_path, lora_weights, precision=precision).model
hwm = int(re.search(r"^VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024
print(json.dumps({"rss": psutil.Process().memory_info().rss, "peak": hwm, "answer": answer,
                  "weights": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True, help="base model folder (or hub id)")
    parser.add_argument("--lora-weights", help="adapter folder; default: a random adapter")
    parser.add_argument("--precision", default="auto", help="as inference.py's (default: auto, fp32 on the CPU)")
    parser.add_argument("--instruction", default="Give three tips for staying healthy.")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "playground_memory.md")
    return parser.parse_args(argv)


def random_adapter(model_path: str, folder: Path) -> Path:
    """A LoRA adapter with random, non-zero A and B for `model_path`, saved in `folder`."""
    from lora_model import LoraConfig, LoraModelForCasualLM
    from support import model_loading

    base = model_loading.load_base_model(model_path, torch.device("cpu"), "auto")
    torch.manual_seed(0)
    LoraModelForCasualLM(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query_key_value"],
                                          init_lora_weights=False)).save_pretrained(folder)
    return folder


def serve_and_answer(args, lora_weights: str) -> dict:
    """Start the server, answer once through the page's API, measure, stop it (SIGTERM)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "inference.py", "serve", "--model-path", args.model_path,
                               "--lora-weights", lora_weights, "--precision", args.precision, "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode}:\n{server.stderr.read()}")
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                time.sleep(0.5)
        # The page's inputs, in order: instruction, input, max_new_tokens, sample, temperature, top_p, top_k,
        # num_beams, repetition_penalty.
        data = [args.instruction, "", args.new_tokens, False, 0.7, 0.9, 50, 1, 1.0]
        request = urllib.request.Request(f"{url}/gradio_api/call/generate", json.dumps({"data": data}).encode(),
                                         {"Content-Type": "application/json"})
        event_id = json.load(urllib.request.urlopen(request))["event_id"]
        events = urllib.request.urlopen(f"{url}/gradio_api/call/generate/{event_id}").read().decode()
        adapter_pane, _, status, _ = json.loads(re.findall(r"^data: (.*)$", events, re.M)[-1])
        if status != "done":
            raise SystemExit(f"the page answered {status!r}")
        process = psutil.Process(server.pid)
        hwm = int(re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{server.pid}/status").read_text(), re.M).group(1))
        figures = {"rss": process.memory_info().rss, "peak": hwm * 1024, "answer": adapter_pane}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    return figures


def reference(args, lora_weights: str) -> dict:
    result = subprocess.run([sys.executable, "-c", REFERENCE, args.model_path, lora_weights, args.precision,
                             args.instruction, str(args.new_tokens)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the reference failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(args, argv, server: dict, alone: dict) -> str:
    mib = 2 ** 20
    lines = [
        "# Playground memory: the server with both panes vs generate_inference alone",
        "",
        f"Reproduce: `{command_line('bench_playground_memory.py', argv)}`",
        "",
        f"- Model: `{args.model_path}`, precision {args.precision}, CPU; adapter: "
        f"{args.lora_weights or 'random LoRA r=8, alpha=16 on query_key_value'}. One greedy answer of "
        f"{args.new_tokens} tokens to {args.instruction!r}; torch {torch.__version__}.",
        f"- The adapter pane equals generate_inference's answer: {server['answer'] == alone['answer']}.",
        "",
        "| process | RSS after answering | peak RSS (VmHWM) |",
        "|---|---|---|",
        f"| `inference.py serve`, both panes | {server['rss'] / mib:,.0f} MiB | {server['peak'] / mib:,.0f} MiB |",
        f"| `generate_inference` alone | {alone['rss'] / mib:,.0f} MiB | {alone['peak'] / mib:,.0f} MiB |",
        f"| server / alone | {server['rss'] / alone['rss']:.3f} | {server['peak'] / alone['peak']:.3f} |",
        f"| model weights (one copy) | {alone['weights'] / mib:,.0f} MiB | |",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        lora_weights = args.lora_weights or str(random_adapter(args.model_path, Path(tmp) / "adapter"))
        server = serve_and_answer(args, lora_weights)
        alone = reference(args, lora_weights)
    table = markdown(args, argv if argv is not None else sys.argv[1:], server, alone)
    write_text_atomically(args.out, table)
    print(table)


if __name__ == "__main__":
    main()
