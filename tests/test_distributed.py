"""DDP and FSDP on the CPU (gloo), on the shipped tiny BLOOM: the torchrun launch, equivalence with one process (and
FSDP with DDP), one gradient reduction per optimizer step, FSDP's sharding of the base, a two-"node" c10d rendezvous
on loopback, and the launch errors.

The reference for every DDP number is an independent single-process run of the same global batch: 2 ranks x batch b
must train, step for step, the adapter that 1 process x batch 2b trains (float32, no dropout, same seed; and in
float64, where rounding cannot hide a real difference); with a GPU's half-precision base weights and autocast, the
same losses within half precision's rounding.
torchrun launches are the slow part (~20 s each on 2 cores), so one launch trains several configurations.
"""

import contextlib
import gc
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torchrun_worker
from safetensors.torch import load_file
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.fsdp import FSDPModule

import train
from conftest import REPO, SAMPLE, TINY_BLOOM, adapter_tensors, metric_rows, tiny_settings
from support.config import ConfigError, TrainConfig, load_config
from support.distributed import gradient_sync

WORKER = REPO / "tests" / "torchrun_worker.py"
LAUNCH_TIMEOUT_S = 300


def run_settings(root: Path, name: str, data: Path, **overrides) -> dict:
    """conftest's tiny_settings with batches of 2 and a checkpoint every step (no warm-up unless asked: WARM_UP)."""
    return tiny_settings(root, data, name, **{"batch_size": 2, "save_steps": 1, **overrides})


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", **extra}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if sys.platform == "linux":
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's connections on loopback only
    return env


def run_launches(commands: list[list[str]], env: dict) -> list[subprocess.CompletedProcess]:
    """Start the torchrun commands together and wait for all; on a timeout kill each one's process group."""
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for cmd in commands]
    results = []
    try:
        for cmd, proc in zip(commands, procs):
            out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
            results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, None))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return results


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def rel_diff(a: dict, b: dict) -> float:
    """Largest relative difference of one tensor, ||a - b|| / ||b||, over the adapter's tensors."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in a)


def max_elementwise_diff(a: dict, b: dict) -> float:
    """Largest |a - b| of one element, relative to its tensor's largest |b|."""
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in a)


def metrics(out: Path) -> tuple[list[float], float]:
    """Every step's loss, and the last evaluation's loss."""
    rows = metric_rows(out)
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r][-1]


ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which train.py keeps
# An element's first AdamW update is lr * g / (|g| + eps); rounding that moves g by dg moves it by
# lr * eps * dg / (|g| + eps)^2. With dg ~ 1e-9 (measured: 7e-10) and |g| below 20 eps, that is over 2e-4 lr for
# this one element, and one such element alone moves a (384 x 8) B tensor by ~4e-6 in norm.
EPS_REGIME = 20 * ADAM_EPS


def eps_regime_elements(ref_grads: dict) -> dict[str, torch.Tensor]:
    """Adapter key -> mask of the elements whose first non-zero gradient (in the reference) was below EPS_REGIME.

    Only the first one counts: once an element has had a larger gradient, its second moment keeps every later
    update insensitive. A's gradient is exactly 0 at step 1 in every run alike (B is 0), so A's first update comes
    at step 2."""
    first_grads: dict[str, torch.Tensor] = {}
    for key in sorted(ref_grads, key=lambda k: int(k.split("/", 1)[0])):
        name = "base_model." + key.split("/", 1)[1]
        earlier = first_grads.get(name, torch.zeros_like(ref_grads[key]))
        first_grads[name] = torch.where(earlier == 0, ref_grads[key], earlier)
    return {name: (grad != 0) & (grad.abs() < EPS_REGIME) for name, grad in first_grads.items()}


def rel_diff_outside(a: dict, b: dict, masks: dict) -> float:
    """rel_diff with the masked elements' differences left out (their part of ||b|| stays in the denominator)."""
    assert a.keys() == b.keys() == masks.keys()
    return max(((a[k] - b[k]).masked_fill(masks[k], 0).norm() / b[k].norm().clamp_min(1e-12)).item() for k in a)


def assert_same_training(ddp_out: Path, ddp_dump: Path, ref_out: Path, ref_dump: Path, steps: int = 3,
                         weight_tolerance: float = 1e-5) -> None:
    """The 2-rank float32 run and the single-process reference train the same thing, step for step.

    Held to 1e-5 (relative): every step's loss, the eval loss, the gradients of step 1 (taken at identical weights)
    element by element, and the adapter after every step in norm, leaving out only the elements in AdamW's eps
    regime (`eps_regime_elements`: at most 0.1 % of them; measured 5 or 6 of 16,384). With every element in, the
    adapter is held to `weight_tolerance`: 1e-5 with train.py's warm-up, and without a warm-up for plain DDP; 1e-4
    without a warm-up where the micro-batches split the batch another way (accumulation, length grouping), as are
    the gradients of later steps (taken at those adapters). Without a warm-up, AdamW's first update is
    lr * g / (|g| + eps) from one gradient; the two runs sum the same numbers in another order (float32, ~1e-7
    relative), and one element of B whose step-1 gradient is -5.565e-8 in the reference and -5.635e-8 over 2 ranks
    moves by 0.848 lr in one and 0.849 lr in the other. A warm-up's first step has lr 0 and only fills AdamW's
    moments, so its first real update divides by the size of two gradients and no element is that sensitive.
    Measured here (2-core x86 CPU, the reference on 1 or 2 threads), adapters in norm with every element: with the
    warm-up, every run, every step at most 1e-6; without it, plain 1.9e-7 to 1.2e-6, accumulation 5.2e-6 to 3.4e-5
    (which of them depending on the thread count), grouped 1e-6 to 6e-6, and below 1.2e-6 everywhere outside the
    eps regime. Without a warm-up, single-process runs that only split the batch differently (4 x 2, 2 x 4, 1 x 8)
    differ by up to 1.4e-5 (1 thread) with every element: float32's own spread, not DDP's. `pytest -s` prints these
    figures (`OMP_NUM_THREADS=1 pytest -s` on one thread).
    The float64 runs (`assert_same_training_float64`) show that what is left is rounding, not a DDP error: there the
    final adapters differ by 1.6e-15 (plain) and 1.3e-13 (accumulation) in norm, every element included.
    """
    ddp_losses, ddp_eval = metrics(ddp_out)
    ref_losses, ref_eval = metrics(ref_out)
    assert len(ddp_losses) == len(ref_losses) == steps
    for a, b in zip(ddp_losses, ref_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (ddp_losses, ref_losses)
    assert abs(ddp_eval - ref_eval) <= 1e-5 * abs(ref_eval)

    ddp_grads = load_file(str(ddp_dump / "rank0-grads.safetensors"))
    ref_grads = load_file(str(ref_dump / "rank0-grads.safetensors"))
    assert ddp_grads.keys() == ref_grads.keys()
    eps_regime = eps_regime_elements(ref_grads)
    assert sum(m.sum().item() for m in eps_regime.values()) <= 1e-3 * sum(m.numel() for m in eps_regime.values())
    adapters = [(adapter_tensors(ddp_out / f"checkpoint-{step}"), adapter_tensors(ref_out / f"checkpoint-{step}"))
                for step in range(1, steps + 1)]
    every = [rel_diff(a, b) for a, b in adapters]
    outside = [rel_diff_outside(a, b, eps_regime) for a, b in adapters]
    # The figures the README quotes (`pytest -s` shows them), printed before anything is asserted.
    print(f"\n{ddp_out.name} vs {ref_out.name}, adapter rel diff after steps 1-{steps} (every element / outside the "
          "eps regime): " + ", ".join(f"{e:.1e} / {o:.1e}" for e, o in zip(every, outside)))
    for step in range(1, steps + 1):
        ddp_step, ref_step = ({k: v for k, v in g.items() if k.startswith(f"{step}/")} for g in (ddp_grads, ref_grads))
        assert ref_step and any(v.abs().max() > 0 for v in ref_step.values())
        if step == 1:
            assert max_elementwise_diff(ddp_step, ref_step) <= 1e-5
        else:
            assert rel_diff(ddp_step, ref_step) <= 1e-4, step
        assert outside[step - 1] <= 1e-5, step
        assert every[step - 1] <= weight_tolerance, step
    assert rel_diff_outside(adapter_tensors(ddp_out), adapter_tensors(ref_out), eps_regime) <= 1e-5
    assert rel_diff(adapter_tensors(ddp_out), adapter_tensors(ref_out)) <= weight_tolerance


FLOAT64_TOLERANCE = 1e-10  # float64 rounding is ~1e-16; AdamW's magnification leaves it far below this


def assert_same_training_float64(ddp_out: Path, ddp_dump: Path, ref_out: Path, ref_dump: Path, steps: int = 3):
    """The same comparison with the whole model in float64, where rounding cannot hide a real difference: every
    loss, every step's gradients and the final adapter (as the ranks hold it, in float64) agree to 1e-10."""
    ddp_losses, ddp_eval = metrics(ddp_out)
    ref_losses, ref_eval = metrics(ref_out)
    assert len(ddp_losses) == len(ref_losses) == steps
    for a, b in zip([*ddp_losses, ddp_eval], [*ref_losses, ref_eval]):
        assert abs(a - b) <= FLOAT64_TOLERANCE * abs(b), (ddp_losses, ref_losses)
    ddp_grads = load_file(str(ddp_dump / "rank0-grads.safetensors"))
    ref_grads = load_file(str(ref_dump / "rank0-grads.safetensors"))
    assert ddp_grads.keys() == ref_grads.keys() and all(g.dtype == torch.float64 for g in ddp_grads.values())
    assert max_elementwise_diff(ddp_grads, ref_grads) <= FLOAT64_TOLERANCE
    ddp_final, ref_final = (load_file(str(dump / "rank0.safetensors")) for dump in (ddp_dump, ref_dump))
    assert all(t.dtype == torch.float64 for t in ddp_final.values())
    print(f"\n{ddp_out.name} vs {ref_out.name}, final adapter (float64) rel diff: {rel_diff(ddp_final, ref_final):.1e}")
    assert max_elementwise_diff(ddp_final, ref_final) <= FLOAT64_TOLERANCE


HALF_TOLERANCE = 1e-3  # relative; measured: 2.6e-5 (fp16 weights), 1.2e-4 to 1.9e-4 (bf16; reference on 1 or 2 threads)


def assert_same_losses_in_half_precision(ddp_out: Path, ref_out: Path, steps: int = 3):
    """With the base weights in half precision (a GPU's MIX_PREC_TRAIN), every step's loss and the eval loss of the
    2-rank run are within 1e-3 (relative) of the single process's, and the GradScaler skipped no step (fp16; bf16
    has no GradScaler, so there it is 0 by construction). The adapters are not
    compared: AdamW makes each update about lr in size whatever the gradient's, so half precision's rounding of the
    gradients already moves the adapters after 3 steps by 1 % (fp16) to 2 % (bf16) in norm. Two single processes
    that only split the batch differently (4 x 2 and 2 x 4) differ as much: losses 3.3e-5 / 2.8e-4, adapters
    1.0 % / 2.3 %."""
    ddp_losses, ddp_eval = metrics(ddp_out)
    ref_losses, ref_eval = metrics(ref_out)
    assert len(ddp_losses) == len(ref_losses) == steps
    for a, b in zip([*ddp_losses, ddp_eval], [*ref_losses, ref_eval]):
        assert abs(a - b) <= HALF_TOLERANCE * abs(b), (ddp_losses, ref_losses)
    assert [row["skipped_steps"] for row in metric_rows(ddp_out) if "loss" in row] == [0] * steps
    saved = adapter_tensors(ddp_out)
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in saved.items())


# --- launch errors ------------------------------------------------------------------------------------------------

def test_ddp_without_torchrun_says_how_to_launch(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=r"DDP=true needs torchrun's variables .*torchrun --standalone "
                                          r"--nproc_per_node=2 train.py"):
        train.setup_distributed(load_config([], {"DDP": "true"}))


def test_torchrun_without_ddp_is_refused(monkeypatch):
    """Two processes that each train alone and write the same OUTPUT_DIR is never what was meant."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="DDP is not true but torchrun started WORLD_SIZE=2 processes; set DDP=true "
                                          "or FSDP=true"):
        train.setup_distributed(load_config([], {}))


def test_fsdp_without_torchrun_says_how_to_launch_and_not_with_ddp(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=r"FSDP=true needs torchrun's variables .*`FSDP=true torchrun --standalone "
                                          r"--nproc_per_node=2 train.py`"):
        train.setup_distributed(load_config([], {"FSDP": "true"}))
    with pytest.raises(ConfigError, match="^DDP=true and FSDP=true: set one of them"):
        load_config([], {"FSDP": "true", "DDP": "true"})
    with pytest.raises(ConfigError, match="^QUANTIZE=4bit and FSDP=true: .* use DDP=true"):
        load_config([], {"FSDP": "true", "QUANTIZE": "4bit"})


# --- the CLI under torchrun -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_two_ranks_train_identical_adapters_and_only_rank0_writes(tmp_path):
    """`DEBUG=true DDP=true MIX_PREC_TRAIN=true torchrun --standalone --nproc_per_node=2 train.py`, shortened with
    MAX_STEPS etc.; the worker runs train.main() unchanged and reports each rank's adapter and file writes."""
    out, dump = tmp_path / "out", tmp_path / "dump"
    env = launch_env(DEBUG="true", DDP="true", MIX_PREC_TRAIN="true", MODEL_PATH=str(TINY_BLOOM),
                     OUTPUT_DIR=str(out), CACHE_DIR=str(tmp_path / "cache"), MAX_STEPS="3", GRAD_ACCUM_STEPS="2",
                     MAX_LENGTH="128", SIZE_VALID_SET="16", SAVE_STEPS="2")
    [result] = run_launches([torchrun("--standalone", "--nproc_per_node=2", str(WORKER), str(dump))], env)
    assert result.returncode == 0, result.stdout[-3000:]

    rank0, rank1 = (load_file(str(dump / "out" / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # bit-identical
    saved = adapter_tensors(out)
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert all(torch.equal(saved[k], rank0[k].float()) for k in rank0)  # what rank 0 holds is what was saved

    writes = {r: json.loads((dump / "out" / f"rank{r}-writes.json").read_text()) for r in (0, 1)}
    assert writes[1] == []
    assert any(path.endswith("metrics.jsonl") for _, path in writes[0])  # the hook does see rank 0's writes
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "checkpoint-2", "checkpoint-3", "loss_curve.png",
                                                     "metrics.jsonl", "run.lock"]  # SAVE_STEPS=2 and the last step
    # Printing on rank 0 only: one banner, one precision line naming the automatic choice.
    assert result.stdout.count("precision    bf16 on cpu (MIX_PREC_TRAIN=true): bf16 autocast") == 1
    assert result.stdout.count("processes    2 (DDP, gloo)") == 1
    assert result.stdout.count("adapter saved to") == 1


# --- two "nodes" on loopback train the same adapter as one process with the whole batch ------------------------------

PLAIN, ACCUM = dict(batch_size=2), dict(batch_size=2, grad_accum_steps=2)
# train.py's learning-rate schedule as users run it: a linear warm-up from lr 0 (here 2 steps, then the cosine decay),
# 5 steps. Step 1 (lr 0) moves nothing but fills AdamW's moments, so its first real update divides by the size of
# two gradients: no element is then in the eps regime (see assert_same_training), and every element is held to 1e-5.
WARM_UP = dict(warmup_steps=2, max_steps=5)
DDP_RUNS = {  # name: (overrides for the 2-rank run, single-process references with the same global batch)
    "plain": (PLAIN, [dict(batch_size=4)]),
    "accum": (ACCUM, [dict(batch_size=4, grad_accum_steps=2), dict(batch_size=2, grad_accum_steps=4),
                      dict(batch_size=1, grad_accum_steps=8)]),
    "plain-warm-up": ({**PLAIN, **WARM_UP}, [dict(batch_size=4, **WARM_UP)]),
    "accum-warm-up": ({**ACCUM, **WARM_UP}, [dict(batch_size=4, grad_accum_steps=2, **WARM_UP),
                                             dict(batch_size=2, grad_accum_steps=4, **WARM_UP),
                                             dict(batch_size=1, grad_accum_steps=8, **WARM_UP)]),
    "grouped": (dict(batch_size=2, group_by_length=True), [dict(batch_size=4, group_by_length=True)]),
    "plain-float64": ({**PLAIN, "float64": True}, [dict(batch_size=4, float64=True)]),
    "accum-float64": ({**ACCUM, "float64": True}, [dict(batch_size=4, grad_accum_steps=2, float64=True),
                                                   dict(batch_size=2, grad_accum_steps=4, float64=True)]),
    # GRADIENT_CHECKPOINTING under DDP with no_sync: recomputed activations, the same adapter as a plain process.
    "checkpointing-float64": ({**ACCUM, "gradient_checkpointing": True, "float64": True},
                              [dict(batch_size=4, grad_accum_steps=2, float64=True)]),
    # What MIX_PREC_TRAIN=true runs on 2 GPUs, gloo instead of NCCL aside: a Kaggle 2 x T4 (float16 base weights,
    # fp16 autocast, GradScaler) and an A100/H100 pair (bfloat16 weights, bf16 autocast).
    "gpu-fp16-weights": (T4 := {**ACCUM, "precision": "fp16", "base_weights": "float16"},
                         [{**T4, "batch_size": 4}]),
    "gpu-bf16-weights": (A100 := {**ACCUM, "precision": "bf16", "base_weights": "bfloat16"},
                         [{**A100, "batch_size": 4}]),
    # PACKING=true: batches of packed rows, the global batch's token-weighted loss over both ranks' rows.
    "packed-accum": ({**ACCUM, "packing": True}, [dict(batch_size=4, grad_accum_steps=2, packing=True)]),
    "packed-accum-float64": ({**ACCUM, "packing": True, "float64": True},
                             [dict(batch_size=4, grad_accum_steps=2, packing=True, float64=True)]),
    "gpu-fp16-weights-packed": ({**T4, "packing": True}, [{**T4, "batch_size": 4, "packing": True}]),
}
# Every element, every step (see assert_same_training); the float32 runs are the names listed here.
WEIGHT_TOLERANCE = {"plain": 1e-5, "accum": 1e-4, "grouped": 1e-4, "plain-warm-up": 1e-5, "accum-warm-up": 1e-5,
                    "packed-accum": 1e-4}


@pytest.fixture(scope="module")
def two_node_runs(tmp_path_factory, small_data) -> Path:
    """`torchrun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT` started twice,
    as on two machines; the c10d rendezvous gives them node ranks 0 and 1. They train every run in DDP_RUNS."""
    root = tmp_path_factory.mktemp("two_nodes")
    runs = [run_settings(root, f"ddp-{name}", small_data, ddp=True, **ddp) for name, (ddp, _) in DDP_RUNS.items()]
    port = free_port()
    node = torchrun("--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                    "--rdzv-id=test-two-nodes", "--local-addr=127.0.0.1", str(WORKER), str(root / "dump"),
                    json.dumps(runs))
    results = run_launches([node, node], launch_env())
    for result in results:
        assert result.returncode == 0, result.stdout[-3000:]
    return root


def train_reference(settings: dict, dump: Path, monkeypatch) -> tuple[Path, Path]:
    """Train `settings` in this process, recording its gradients as the torchrun worker does (with its test-only
    settings: float64, GPU base weights); returns its OUTPUT_DIR and its dump folder."""
    cfg = TrainConfig(**{k: v for k, v in settings.items() if k not in torchrun_worker.TEST_ONLY_SETTINGS})
    monkeypatch.setattr(torchrun_worker.RecordingTrainer, "dump_dir", dump)
    monkeypatch.setattr(train, "Trainer", torchrun_worker.RecordingTrainer)
    with torchrun_worker.test_only_settings(settings):
        train.run(cfg, train.DistEnv())
    return Path(cfg.output_dir), dump / Path(cfg.output_dir).name


@pytest.mark.slow
@pytest.mark.parametrize("name", DDP_RUNS)
def test_two_nodes_match_one_process_with_the_whole_batch(two_node_runs, small_data, tmp_path, monkeypatch, name):
    ddp_out = two_node_runs / f"ddp-{name}"
    ddp_dump = two_node_runs / "dump" / ddp_out.name
    rank0, rank1 = (load_file(str(ddp_dump / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert json.loads((ddp_dump / "rank1-writes.json").read_text()) == []

    ref_outs = []
    for reference in DDP_RUNS[name][1]:
        split = f"{reference['batch_size']}x{reference.get('grad_accum_steps', 1)}"  # micro-batch x accumulation
        ref_out, ref_dump = train_reference(run_settings(tmp_path, f"one-process-{split}", small_data, **reference),
                                            tmp_path / "dump", monkeypatch)
        ref_outs.append(ref_out)
        if name.endswith("float64"):
            assert_same_training_float64(ddp_out, ddp_dump, ref_out, ref_dump)
        elif name.startswith("gpu-"):
            assert_same_losses_in_half_precision(ddp_out, ref_out)
        else:
            assert_same_training(ddp_out, ddp_dump, ref_out, ref_dump, steps=reference.get("max_steps", 3),
                                 weight_tolerance=WEIGHT_TOLERANCE[name])
    if name in WEIGHT_TOLERANCE:  # one process's own float32 runs that only split the batch otherwise
        for a, b in itertools.combinations(ref_outs, 2):
            print(f"\n{a.name} vs {b.name}, final adapter rel diff (every element): "
                  f"{rel_diff(adapter_tensors(a), adapter_tensors(b)):.1e}")


@pytest.mark.slow
def test_the_equivalence_check_is_sensitive(two_node_runs, small_data, tmp_path, monkeypatch):
    """1 process x batch b (half the global batch) fails every check of assert_same_training by far, also with the
    eps-regime elements left out, with and without the warm-up."""
    for ddp_name, schedule in (("ddp-plain", {}), ("ddp-plain-warm-up", WARM_UP)):
        half_out, ref_dump = train_reference(run_settings(tmp_path, f"half-{ddp_name}", small_data, batch_size=2,
                                                           **schedule), tmp_path / "dump", monkeypatch)
        ddp_out = two_node_runs / ddp_name
        (ddp_losses, _), (half_losses, _) = metrics(ddp_out), metrics(half_out)
        assert min(abs(a - b) / abs(b) for a, b in zip(ddp_losses, half_losses)) > 1e-3
        ddp_grads = load_file(str(two_node_runs / "dump" / ddp_name / "rank0-grads.safetensors"))
        half_grads = load_file(str(ref_dump / "rank0-grads.safetensors"))
        assert max_elementwise_diff(ddp_grads, half_grads) > 1e-2
        assert rel_diff(adapter_tensors(ddp_out), adapter_tensors(half_out)) > 1e-2
        eps_regime = eps_regime_elements(half_grads)
        assert rel_diff_outside(adapter_tensors(ddp_out), adapter_tensors(half_out), eps_regime) > 1e-2


# --- FSDP: the same training as one process and as DDP, each rank holding half the base ---------------------------

# The DDP_RUNS also trained under FSDP=true (2 processes, one torchrun launch), each compared with that name's DDP run
# and its first single-process reference, with the same checks and tolerances: float32 without and with
# accumulation, float64 (also with activation checkpointing), and a 2 x T4's float16 base weights with GradScaler.
FSDP_RUNS = ("plain", "accum", "plain-float64", "accum-float64", "checkpointing-float64", "gpu-fp16-weights",
             "packed-accum")
ODD_VALID = 9  # validation records: rank 0 evaluates 5 (3 batches of 2), rank 1 4 and a label-less pad (fsdp.py)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, small_data, two_node_runs) -> Path:
    """`torchrun --standalone --nproc_per_node=2` with FSDP=true, training FSDP_RUNS; then "odd-valid" (a validation
    set the ranks cannot split evenly) and "resumed-from-ddp" (the DDP run "plain", continued from its step-2
    checkpoint under FSDP)."""
    root = tmp_path_factory.mktemp("fsdp")
    runs = [run_settings(root, f"fsdp-{name}", small_data, fsdp=True, **DDP_RUNS[name][0]) for name in FSDP_RUNS]
    valid = root / "valid.json"
    valid.write_text(json.dumps(json.loads(SAMPLE.read_text(encoding="utf-8"))[100:100 + ODD_VALID]))
    runs += [run_settings(root, "fsdp-odd-valid", small_data, fsdp=True, valid_data_path=str(valid), **PLAIN),
             run_settings(root, "fsdp-resumed-from-ddp", small_data, fsdp=True, **PLAIN,
                           resume_from=str(two_node_runs / "ddp-plain" / "checkpoint-2"))]
    command = torchrun("--standalone", "--nproc_per_node=2", str(WORKER), str(root / "dump"), json.dumps(runs))
    [result] = run_launches([command], launch_env())
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.count("processes    2 (FSDP, gloo)") == len(runs)
    return root


def fsdp_run(fsdp_runs: Path, name: str) -> tuple[Path, Path]:
    """OUTPUT_DIR and dump folder of an FSDP run, once its ranks are checked: the same gathered adapter on both,
    nothing written by rank 1."""
    out, dump = fsdp_runs / f"fsdp-{name}", fsdp_runs / "dump" / f"fsdp-{name}"
    rank0, rank1 = (load_file(str(dump / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert json.loads((dump / "rank1-writes.json").read_text()) == []
    return out, dump


@pytest.mark.slow
@pytest.mark.parametrize("name", FSDP_RUNS)
def test_fsdp_matches_one_process_and_ddp(fsdp_runs, two_node_runs, small_data, tmp_path, monkeypatch, name):
    """FSDP on 2 processes trains what one process with the whole batch trains, and what DDP trains, step for step."""
    fsdp_out, fsdp_dump = fsdp_run(fsdp_runs, name)
    ddp_out = two_node_runs / f"ddp-{name}"
    reference = DDP_RUNS[name][1][0]
    split = f"{reference['batch_size']}x{reference.get('grad_accum_steps', 1)}"
    ref_out, ref_dump = train_reference(run_settings(tmp_path, f"one-process-{split}", small_data, **reference),
                                        tmp_path / "dump", monkeypatch)
    for other_out, other_dump in ((ref_out, ref_dump), (ddp_out, two_node_runs / "dump" / ddp_out.name)):
        if name.endswith("float64"):
            assert_same_training_float64(fsdp_out, fsdp_dump, other_out, other_dump)
        elif name.startswith("gpu-"):
            assert_same_losses_in_half_precision(fsdp_out, other_out)
        else:
            assert_same_training(fsdp_out, fsdp_dump, other_out, other_dump, weight_tolerance=WEIGHT_TOLERANCE[name])


@pytest.mark.slow
def test_fsdp_ranks_hold_half_the_base_each(fsdp_runs, two_node_runs):
    """Measured at an optimizer step: each rank's shards of the frozen base are half its bytes (every BLOOM parameter's
    first dimension is even, so FSDP splits each exactly in two and leaves nothing whole), and together they are the
    base once; a DDP rank holds all of it. (From a forward pass to its backward pass, and after an evaluation, FSDP
    keeps the root unit gathered: the embeddings and norms, 0.40 of this tiny base, 15 % of BLOOM-7B1.)"""
    def held(runs: Path, run: str) -> list[dict]:
        return [json.loads((runs / "dump" / run / f"rank{r}-bytes.json").read_text()) for r in (0, 1)]

    for name in ("plain", "plain-float64"):
        ranks = held(fsdp_runs, f"fsdp-{name}")
        whole = ranks[0]["whole"]
        print(f"\nFSDP {name}: the ranks hold {ranks[0]['held']:,} and {ranks[1]['held']:,} bytes of the base's "
              f"{whole:,} ({ranks[0]['held'] / whole:.3f}, {ranks[1]['held'] / whole:.3f})")
        assert all(0.45 <= rank["held"] / whole <= 0.55 and rank["whole"] == whole for rank in ranks)
        assert ranks[0]["held"] + ranks[1]["held"] == whole
    assert all(rank["held"] == rank["whole"] == held(fsdp_runs, "fsdp-plain")[0]["whole"]
               for rank in held(two_node_runs, "ddp-plain"))


@pytest.mark.slow
def test_fsdp_checkpoints_are_ddp_checkpoints(fsdp_runs, two_node_runs, small_data, tmp_path, monkeypatch):
    """Saved whole, in the layout DDP saves (the same keys, shapes and dtypes; optimizer state by index), so either
    resumes from the other's: the DDP run continued under FSDP from its step 2 ends where DDP did."""
    fsdp_checkpoint, ddp_checkpoint = (runs / f"{mode}-plain" / "checkpoint-2"
                                       for runs, mode in ((fsdp_runs, "fsdp"), (two_node_runs, "ddp")))

    def layout(value):
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), value.dtype, value.device.type)
        if isinstance(value, dict):
            return {k: layout(v) for k, v in value.items() if k not in ("last_eval", "rng")}
        return [layout(v) for v in value] if isinstance(value, (list, tuple)) else type(value)

    fsdp_state, ddp_state = (torch.load(c / "trainer_state.pt", weights_only=True)
                             for c in (fsdp_checkpoint, ddp_checkpoint))
    assert layout(fsdp_state) == layout(ddp_state)
    assert fsdp_state["optimizer"]["param_groups"] == ddp_state["optimizer"]["param_groups"]
    assert layout(adapter_tensors(fsdp_checkpoint)) == layout(adapter_tensors(ddp_checkpoint))
    assert ((fsdp_checkpoint / "adapter_config.json").read_text() ==
            (ddp_checkpoint / "adapter_config.json").read_text())

    resumed, _ = fsdp_run(fsdp_runs, "resumed-from-ddp")
    ddp_out = two_node_runs / "ddp-plain"
    (resumed_losses, resumed_eval), (ddp_losses, ddp_eval) = metrics(resumed), metrics(ddp_out)
    assert [r["step"] for r in metric_rows(resumed) if "loss" in r] == [3]
    assert abs(resumed_losses[0] - ddp_losses[2]) <= 1e-5 * abs(ddp_losses[2])
    assert abs(resumed_eval - ddp_eval) <= 1e-5 * abs(ddp_eval)
    print(f"\nDDP's step-2 checkpoint resumed under FSDP, final adapter vs DDP's: "
          f"{rel_diff(adapter_tensors(resumed), adapter_tensors(ddp_out)):.1e}")
    assert rel_diff(adapter_tensors(resumed), adapter_tensors(ddp_out)) <= 1e-5


@pytest.mark.slow
def test_fsdp_evaluates_a_validation_set_the_ranks_cannot_split_evenly(fsdp_runs, small_data, tmp_path, monkeypatch):
    """9 validation records on 2 ranks: rank 1 pads its shard with a label-less example, so both run the same
    forward passes (FSDP gathers weights in each) and the loss is that of the 9 records, as one process has it."""
    fsdp_out, fsdp_dump = fsdp_run(fsdp_runs, "odd-valid")
    valid = fsdp_runs / "valid.json"
    ref_out, ref_dump = train_reference(run_settings(tmp_path, "one-process-odd-valid", small_data, batch_size=4,
                                                      valid_data_path=str(valid)), tmp_path / "dump", monkeypatch)
    # Every element to 1e-4, as for "accum": these batches (48 records to train on) give a few elements a step-1
    # gradient in AdamW's eps regime (see assert_same_training); the others are held to 1e-5.
    assert_same_training(fsdp_out, fsdp_dump, ref_out, ref_dump, weight_tolerance=1e-4)


# --- one gradient all-reduce per optimizer step ----------------------------------------------------------------------

@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    """A real gloo process group of one rank in this process (as torchrun would set it up), torn down after."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    yield
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def counted_allreduces(cfg: TrainConfig, monkeypatch, without_no_sync: bool = False) -> int:
    """Train `cfg` under DDP and count the gradient buckets DDP all-reduces, with a counting comm hook."""
    dist = train.setup_distributed(cfg)
    assert dist.distributed and dist.ddp and not dist.fsdp and torch_dist.get_backend() == "gloo"
    train.seed_everything(cfg.seed)
    tokenizer = train.load_tokenizer(cfg.model_path)
    train_set, valid_set, _ = train.prepare_datasets(cfg, tokenizer)
    model = train.build_lora_model(train.load_pretrained_model(cfg.model_path, dist.device, torch.float32), cfg,
                                   cfg.model_path)
    trainer = train.Trainer(cfg, dist, model, tokenizer, train_set, valid_set, "fp32")
    assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
    # DDP reduces only what trains: the LoRA matrices.
    reduced = [n for n, p in trainer.model.module.named_parameters() if p.requires_grad]
    assert reduced and all("lora_" in n for n in reduced)
    calls = []

    def counting_allreduce(state, bucket):
        calls.append(bucket.index())
        return default_hooks.allreduce_hook(state, bucket)

    trainer.model.register_comm_hook(None, counting_allreduce)
    if without_no_sync:
        monkeypatch.setattr(trainer.model, "no_sync", contextlib.nullcontext)
    trainer.train()
    # Free the DDP wrapper before its process group: destroying a gloo group under a live reducer can deadlock
    # when the reducer is freed afterwards.
    del trainer, model
    gc.collect()
    torch_dist.destroy_process_group()
    assert set(calls) == {0}  # the tiny model's adapter fits in one bucket
    return len(calls)


@pytest.mark.slow  # a whole training run in a process group
def test_one_gradient_allreduce_per_optimizer_step(tmp_path, small_data, one_rank_group, monkeypatch):
    settings = run_settings(tmp_path, "out", small_data, ddp=True, grad_accum_steps=4, max_steps=3,
                             save_steps=0)
    assert counted_allreduces(TrainConfig(**settings), monkeypatch) == 3  # steps x buckets
    # Sensitivity: without no_sync every micro-batch's backward all-reduces.
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    settings["output_dir"] = str(tmp_path / "out-no-sync")
    assert counted_allreduces(TrainConfig(**settings), monkeypatch, without_no_sync=True) == 3 * 4


def micro_batches_reduced(cfg: TrainConfig, monkeypatch, always_sync: bool = False) -> list[bool]:
    """Train `cfg` under FSDP (one rank) and say, after each micro-batch's backward pass, whether FSDP has reduced
    the adapter's gradients into its sharded parameters' .grad (it keeps them unreduced, on the side, until then)."""
    if always_sync:
        monkeypatch.setattr(train, "gradient_sync", lambda model, sync: gradient_sync(model, True))
    reduced = []

    class WatchedTrainer(train.Trainer):
        def _run_batch(self, *args, **kwargs):
            loss = super()._run_batch(*args, **kwargs)
            reduced.append(all(p.grad is not None for p in self.trainable_parameters()))
            return loss

    dist = train.setup_distributed(cfg)
    assert dist.distributed and dist.fsdp and not dist.ddp
    train.seed_everything(cfg.seed)
    tokenizer = train.load_tokenizer(cfg.model_path)
    train_set, valid_set, _ = train.prepare_datasets(cfg, tokenizer)
    model = train.build_lora_model(train.load_pretrained_model(cfg.model_path, dist.device, torch.float32), cfg,
                                   cfg.model_path)
    trainer = WatchedTrainer(cfg, dist, model, tokenizer, train_set, valid_set, "fp32")
    assert isinstance(trainer.model, FSDPModule) and trainer.model is trainer.raw_model
    trainer.train()
    torch_dist.destroy_process_group()
    return reduced


@pytest.mark.slow  # a whole training run under FSDP
def test_fsdp_reduces_gradients_once_per_optimizer_step(tmp_path, small_data, one_rank_group, monkeypatch):
    """FSDP reduces a step's gradients in the last micro-batch's backward pass only: set_requires_gradient_sync
    (False) on the others (distributed.gradient_sync), as DDP's no_sync()."""
    settings = run_settings(tmp_path, "out", small_data, fsdp=True, grad_accum_steps=3, max_steps=1, save_steps=0)
    assert micro_batches_reduced(TrainConfig(**settings), monkeypatch) == [False, False, True]
    # Sensitivity: syncing every micro-batch reduces each one's gradients at once.
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    settings["output_dir"] = str(tmp_path / "out-always-sync")
    assert micro_batches_reduced(TrainConfig(**settings), monkeypatch, always_sync=True) == [True] * 3


@pytest.mark.parametrize("mode", ["DDP", "FSDP"])
def test_dist_env_says_distributed_for_both_and_ddp_only_under_ddp(one_rank_group, mode):
    dist = train.setup_distributed(load_config([], {mode: "true"}))
    torch_dist.destroy_process_group()
    assert (dist.distributed, dist.ddp, dist.fsdp) == (True, mode == "DDP", mode == "FSDP")
    single = train.setup_distributed(load_config([], {}))  # WORLD_SIZE=1 without DDP/FSDP: one process
    assert (single.distributed, single.ddp, single.fsdp) == (False, False, False)


def test_the_process_group_is_destroyed_when_a_ddp_run_fails(tmp_path, one_rank_group, monkeypatch, capsys):
    """main()'s error path (here bad data, found after the group is up) still tears the group down."""
    (tmp_path / "bad.json").write_text("[]", encoding="utf-8")
    for key, value in {"DDP": "true", "MODEL_PATH": str(TINY_BLOOM), "DATA_PATH": str(tmp_path / "bad.json"),
                       "OUTPUT_DIR": str(tmp_path / "out"), "CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    assert train.main([]) == 1
    assert not torch_dist.is_initialized()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: [rank 0] ") and "bad.json" in errors[0]
