"""Surviving faults: kills at random moments, a crash in the middle of a checkpoint, SIGTERM, a dead DDP or FSDP rank,
a whole FSDP job killed, a dead data-loader worker, a full disk, damaged or incompatible checkpoints, and malformed
input.

The reference for every resumed run is the same command run without interruption: a run killed and resumed (once
or several times) must end with the same adapter, bit for bit, and must have logged the same loss at every step.
Every killed run is a real `python train.py` (or torchrun) process, killed from outside; the moment is random
(from a seeded generator), after step 15 as seen in metrics.jsonl.
"""

import contextlib
import errno
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import train
from conftest import FIELDS, ODD_VALUES, REPO, SAMPLE, TINY_BLOOM, adapter_tensors, metric_rows
from support import atomic, faults
from support.alpaca_data import validate_records
from support.checkpoint import (
    checkpoint_dirs, checkpoint_step, find_latest_checkpoint, prune_checkpoints,
    verify_checkpoint,
)
from support.config import ConfigError, load_config
from support.data_sources import DataError, load_records

CRASH_WORKER = REPO / "tests" / "crash_worker.py"
STEPS = 40

# 72 records: 8 for validation, 64 to train on. One process: 32 micro-batches of 2 per epoch, 2 per step, so 16
# steps per epoch; two ranks: 8 steps per epoch. The 40 steps cross epoch ends (checkpoints at 8/16/...), and
# dropout is on, so an exact resume needs every RNG state back.
RUN_SETTINGS = {"MODEL_PATH": str(TINY_BLOOM), "MAX_LENGTH": "128", "BATCH_SIZE": "2", "GRAD_ACCUM_STEPS": "2",
                "SIZE_VALID_SET": "8", "MAX_STEPS": str(STEPS), "NUM_EPOCHS": "5", "SAVE_STEPS": "10",
                "EVAL_FREQ": "15", "WARMUP_STEPS": "5", "LORA_DROPOUT": "0.1"}
EXIT_TIMEOUT_S = 30  # a signalled run must be gone within this
RUN_TIMEOUT_S = 300


# --- launching and killing real runs ----------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs on one thread, as the subprocesses (OMP_NUM_THREADS=1): on a shared 2-core machine a
    2-thread pool that waits for a busy core makes a tiny run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.json"
    path.write_text(json.dumps(json.loads(SAMPLE.read_text(encoding="utf-8"))[:72]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One tokenization cache for every run of this module (its writes are atomic, so runs may share it)."""
    return tmp_path_factory.mktemp("cache")


def run_env(data: Path, cache: Path, out: Path, **extra: str) -> dict:
    env = {**os.environ, **RUN_SETTINGS, "DATA_PATH": str(data), "CACHE_DIR": str(cache), "OUTPUT_DIR": str(out),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", **extra}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DEBUG", "DDP", "FSDP", "RESUME_FROM",
                "MIX_PREC_TRAIN", "PRECISION", "CRASH_BEFORE"):
        if var not in extra:
            env.pop(var, None)
    if sys.platform == "linux":
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


class Run:
    """One training process (or torchrun and its workers) in its own session, its output in a log file.

    The process is reaped only in close(), after its session has been killed: until then its pid, which is the
    session's group id, cannot be reused, so the kill reaches only what is left of this run.
    """

    def __init__(self, args: list[str], env: dict, log: Path) -> None:
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.out = Path(env["OUTPUT_DIR"])

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        if self.proc.returncode is not None:
            return False
        return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None

    def wait_for(self, what: str, condition, timeout: float = RUN_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.running(), f"the run ended before {what}:\n" + self.text()[-3000:]
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n" + self.text()[-3000:]
            time.sleep(0.02)

    def wait_for_step(self, step: int) -> None:
        self.wait_for(f"step {step}", lambda: max(logged_steps(self.out), default=0) >= step)

    def wait_for_text(self, text: str) -> None:
        self.wait_for(repr(text), lambda: text in self.text())

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int | None:
        """The exit code, or None if the run was still going after `timeout`; what is left of it is killed."""
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.02)
        finished = not self.running()
        self.close()
        return self.proc.returncode if finished else None

    def close(self) -> None:
        """Kill whatever is left of the run (its whole session), reap it and close the log."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def runs():
    """Every Run appended to the yielded list is killed on the way out, whatever happened."""
    started: list[Run] = []
    try:
        yield started
    finally:
        for run in started:
            run.close()


def train_py(env: dict, log: Path) -> Run:
    return Run(["train.py"], env, log)


def torchrun(env: dict, log: Path, mode: str = "DDP") -> Run:
    """`<mode>=true torchrun --standalone --nproc_per_node=2 train.py`; mode is DDP or FSDP."""
    return Run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"],
               {**env, mode: "true"}, log)


def torchrun_fsdp(env: dict, log: Path) -> Run:
    return torchrun(env, log, "FSDP")


def worker_processes(run: Run) -> dict[int, psutil.Process]:
    """torchrun's worker processes, by rank."""
    workers = {int(p.environ()["RANK"]): p for p in psutil.Process(run.proc.pid).children(recursive=True)
               if "RANK" in p.environ()}
    assert sorted(workers) == [0, 1], workers
    return workers


def logged_steps(out: Path) -> list[int]:
    rows = metric_rows(out)
    return [row["step"] for row in rows if "loss" in row]


def step_numbers(out: Path) -> list[tuple]:
    """(step, loss, lr, grad_norm) of every logged optimizer step."""
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in metric_rows(out) if "loss" in r]


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def visible_checkpoints(out: Path) -> list[str]:
    return sorted((p.name for p in checkpoint_dirs(out)), key=lambda n: int(n.split("-")[1]))


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def assert_same_run(resumed: Path, straight: Path) -> float:
    """The resumed run logged every step once, with the uninterrupted run's numbers, and ended with its adapter."""
    assert [s[0] for s in step_numbers(resumed)] == list(range(1, STEPS + 1))
    assert step_numbers(resumed) == step_numbers(straight)  # loss, lr and gradient norm at every step
    diff = max_abs_diff(adapter_tensors(resumed), adapter_tensors(straight))
    assert diff <= 1e-6
    return diff


def kill_after_step(run: Run, step: int, rng: random.Random, sig: signal.Signals, target: int | None = None) -> float:
    """Wait for `step` in metrics.jsonl, then a random moment (up to ~5 steps), then send `sig` to `target` (the
    run's process by default; -pid: its process group); returns when."""
    run.wait_for_step(step)
    time.sleep(rng.uniform(0.0, 0.5))
    assert run.running(), "the run finished before it could be killed:\n" + run.text()[-2000:]
    os.kill(target or run.proc.pid, sig)
    return time.monotonic()


class Straight:
    """The uninterrupted reference run, started in the background as soon as a test asks for it."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def result(self) -> Path:
        """Its OUTPUT_DIR, once it has finished."""
        code = self.run.wait()
        assert code == 0, self.run.text()[-3000:]
        return self.run.out


def start_straight(tmp_path_factory, data, cache, name: str, launch):
    """Start the uninterrupted run with `launch` (train_py or torchrun); yield it, close it after the module."""
    root = tmp_path_factory.mktemp(name)
    started = Straight(launch(run_env(data, cache, root / "out"), root / "log.txt"))
    yield started
    started.run.close()


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data, cache):
    yield from start_straight(tmp_path_factory, data, cache, "straight", train_py)


@pytest.fixture(scope="module")
def straight_ddp(tmp_path_factory, data, cache):
    yield from start_straight(tmp_path_factory, data, cache, "straight_ddp", torchrun)


@pytest.fixture(scope="module")
def straight_fsdp(tmp_path_factory, data, cache):
    yield from start_straight(tmp_path_factory, data, cache, "straight_fsdp", torchrun_fsdp)


# --- kills, crashes and signals: the run always resumes exactly -------------------------------------------------------

@pytest.mark.slow
def test_one_process_survives_sigkill_a_crash_mid_checkpoint_and_sigterm(tmp_path, data, cache, straight):
    """`python train.py`, interrupted three ways and resumed each time with RESUME_FROM=latest, ends bit-identical
    to the uninterrupted run."""
    rng = random.Random(6)
    out = tmp_path / "out"
    env = run_env(data, cache, out)
    with runs() as started:
        # 1. SIGKILL at a random moment after step 15.
        started.append(first := train_py(env, tmp_path / "1.txt"))
        kill_after_step(first, 15, rng, signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
        killed_at = max(logged_steps(out))
        assert 15 <= killed_at < STEPS

        # 2. Resumed; the process dies while writing its first checkpoint (after trainer_state.pt, before the
        #    manifest). That half-written checkpoint must never be picked.
        before = find_latest_checkpoint(out)
        started.append(crash := Run([str(CRASH_WORKER)], {**env, "RESUME_FROM": "latest",
                                                         "CRASH_BEFORE": "manifest"}, tmp_path / "2.txt"))
        assert crash.wait() == 137, crash.text()[-3000:]
        assert f"resumed      from {before}" in crash.text()
        assert [p for p in leftovers(out) if p.endswith(".tmp")], leftovers(out)  # the staging folder, half done
        assert find_latest_checkpoint(out) == before

        # 3. Resumed from the checkpoint before the crash, with a data-loader worker; SIGTERM to the whole process
        #    group (as a scheduler sends it) a random moment after two more steps: the step in progress is finished,
        #    checkpointed, and the process exits with 143 within 30 s.
        started.append(third := train_py({**env, "RESUME_FROM": "latest", "NUM_WORKERS": "1"}, tmp_path / "3.txt"))
        third.wait_for_text(f"resumed      from {before}")
        third.wait_for(f"step {checkpoint_step(before) + 2} of the resumed run",
                       lambda: max(logged_steps(out)) >= checkpoint_step(before) + 2)
        signalled = kill_after_step(third, 0, rng, signal.SIGTERM, target=-third.proc.pid)
        assert third.wait(EXIT_TIMEOUT_S) == 128 + signal.SIGTERM
        assert time.monotonic() - signalled < EXIT_TIMEOUT_S
        stopped = max(logged_steps(out))
        checkpoint = out / f"checkpoint-{stopped}"
        assert f"stopped by SIGTERM after step {stopped}: checkpoint written to {checkpoint}" in third.text()
        assert find_latest_checkpoint(out) == checkpoint
        assert not leftovers(out)  # the crash's staging folder was cleared by the next save

        # 4. Resumed to the end, with settings that may change on resume changed: evaluation, data-loading
        #    workers, and SAVE_TOTAL_LIMIT.
        started.append(last := train_py({**env, "RESUME_FROM": "latest", "EVAL_FREQ": "7", "NUM_WORKERS": "1",
                                         "SAVE_TOTAL_LIMIT": "2"}, tmp_path / "4.txt"))
        assert last.wait() == 0, last.text()[-3000:]
        assert f"resumed      from {checkpoint}: step {stopped}" in last.text()

    diff = assert_same_run(out, straight.result())
    print(f"single process: SIGKILL at step {killed_at}, resumed from {before.name} and crashed in its first save, "
          f"resumed again, SIGTERM after step {stopped}; max |resumed - straight| = {diff}")
    assert diff == 0.0  # bit-identical
    kept = visible_checkpoints(out)
    assert len(kept) == 2 and kept[-1] == f"checkpoint-{STEPS}" and not leftovers(out)  # SAVE_TOTAL_LIMIT=2


PACKED_STEPS = 16  # 64 training examples of up to 128 tokens pack into fewer rows: 2 epochs of packed batches


@pytest.mark.slow
def test_a_packed_run_survives_sigkill_bit_identical_and_refuses_another_packing(tmp_path, data, cache):
    """PACKING=true: `python train.py` killed with SIGKILL at a random moment and resumed ends bit-identical to the
    uninterrupted packed run (every step's loss, lr and gradient norm, and the adapter); a resume with PACKING=false
    is refused in one line."""
    rng = random.Random(30)
    packed = {"PACKING": "true", "MAX_STEPS": str(PACKED_STEPS), "SAVE_STEPS": "3", "EVAL_FREQ": "5"}
    straight_out, out = tmp_path / "straight", tmp_path / "out"
    with runs() as started:
        started.append(straight := train_py(run_env(data, cache, straight_out, **packed), tmp_path / "0.txt"))
        started.append(first := train_py(run_env(data, cache, out, **packed), tmp_path / "1.txt"))
        kill_after_step(first, 4, rng, signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
        killed_at = max(logged_steps(out))
        assert 4 <= killed_at < PACKED_STEPS
        started.append(refused := train_py(run_env(data, cache, out, RESUME_FROM="latest", MAX_STEPS=str(PACKED_STEPS),
                                                   SAVE_STEPS="3", EVAL_FREQ="5"), tmp_path / "2.txt"))
        assert refused.wait() == 1
        assert "PACKING is False here but True in the checkpoint" in refused.text()
        started.append(second := train_py(run_env(data, cache, out, RESUME_FROM="latest", **packed),
                                          tmp_path / "3.txt"))
        assert second.wait() == 0, second.text()[-3000:]
        assert straight.wait() == 0, straight.text()[-3000:]
    assert "packing      64 train examples in" in straight.text()
    assert [s[0] for s in step_numbers(out)] == list(range(1, PACKED_STEPS + 1))
    assert step_numbers(out) == step_numbers(straight_out)
    diff = max_abs_diff(adapter_tensors(out), adapter_tensors(straight_out))
    print(f"packed: SIGKILL at step {killed_at}; max |resumed - straight| = {diff}")
    assert diff == 0.0


@pytest.mark.slow
def test_two_ranks_survive_sigterm_and_a_killed_worker(tmp_path, data, cache, straight_ddp):
    """`DDP=true torchrun --nproc_per_node=2 train.py`: SIGTERM to torchrun makes both ranks checkpoint the same step
    and exit; SIGKILL of one worker makes the other report it and exit; the resumed run ends bit-identical."""
    rng = random.Random(7)
    out = tmp_path / "out"
    env = run_env(data, cache, out)
    with runs() as started:
        # 1. SIGTERM to torchrun a random moment after step 15; it forwards the signal to both workers' process
        #    groups, data-loader workers included. Both ranks finish the step, write its checkpoint together and
        #    exit, well before torchrun's 30 s grace is over.
        started.append(first := torchrun({**env, "NUM_WORKERS": "1"}, tmp_path / "1.txt"))
        first.wait_for_step(15)
        workers = worker_processes(first)
        signalled = kill_after_step(first, 15, rng, signal.SIGTERM)
        assert first.wait(EXIT_TIMEOUT_S) not in (None, 0), first.text()[-3000:]  # torchrun fails on the signal
        assert time.monotonic() - signalled < EXIT_TIMEOUT_S
        assert not psutil.wait_procs(list(workers.values()), timeout=5)[1]  # no worker left behind
        stopped = max(logged_steps(out))
        checkpoint = out / f"checkpoint-{stopped}"
        assert f"stopped by SIGTERM after step {stopped}: checkpoint written to {checkpoint}" in first.text()
        assert find_latest_checkpoint(out) == checkpoint
        assert "error:" not in first.text() and "closing signal SIGKILL" not in first.text()

        # 2. Resumed; a random moment after two more steps, one worker is killed. The other must notice (an error
        #    line of its own, not only torchrun's clean-up) and everything must be gone within 60 s.
        started.append(second := torchrun({**env, "RESUME_FROM": "latest"}, tmp_path / "2.txt"))
        second.wait_for_text(f"resumed      from {checkpoint}")
        second.wait_for(f"step {stopped + 2}", lambda: max(logged_steps(out)) >= stopped + 2)
        workers = worker_processes(second)
        victim = rng.choice([0, 1])
        killed = kill_after_step(second, 0, rng, signal.SIGKILL, target=workers[victim].pid)
        assert second.wait(60) not in (None, 0), second.text()[-3000:]
        assert time.monotonic() - killed < 60
        assert not psutil.wait_procs(list(workers.values()), timeout=5)[1]
        survivor = 1 - victim
        assert f"error: [rank {survivor}] lost contact with another process" in second.text(), second.text()[-3000:]

        # 3. Resumed to the end.
        started.append(last := torchrun({**env, "RESUME_FROM": "latest"}, tmp_path / "3.txt"))
        assert last.wait() == 0, last.text()[-3000:]

    diff = assert_same_run(out, straight_ddp.result())
    print(f"two ranks: SIGTERM at step {stopped}, rank {victim} killed; max |resumed - straight| = {diff}")
    assert diff == 0.0  # bit-identical


@pytest.mark.slow
def test_fsdp_survives_kill_9_of_the_whole_job_and_of_one_worker(tmp_path, data, cache, straight_fsdp):
    """`FSDP=true torchrun --nproc_per_node=2 train.py`: kill -9 of the whole job (torchrun and both workers, as when
    a machine is lost) and, once resumed, of one worker (the other reports it and exits); RESUME_FROM=latest each
    time, and the run ends bit-identical to the uninterrupted FSDP run."""
    rng = random.Random(8)
    out = tmp_path / "out"
    env = run_env(data, cache, out)
    with runs() as started:
        # 1. SIGKILL to torchrun a random moment after step 15, and at once to its workers (which are not in its
        #    process group): every process of the job, as when its machine is lost.
        started.append(first := torchrun_fsdp(env, tmp_path / "1.txt"))
        first.wait_for_step(15)
        workers = worker_processes(first)
        kill_after_step(first, 15, rng, signal.SIGKILL)
        for worker in workers.values():
            worker.kill()
        assert first.wait(EXIT_TIMEOUT_S) == -signal.SIGKILL
        assert not psutil.wait_procs(list(workers.values()), timeout=5)[1]
        killed_at = max(logged_steps(out))
        assert 15 <= killed_at < STEPS
        before = find_latest_checkpoint(out)

        # 2. Resumed; a random moment after two steps past the killed run's last one (its rows are in metrics.jsonl
        #    until the resumed run trims them), one worker is killed: the other must say so and everything must be
        #    gone within 60 s.
        started.append(second := torchrun_fsdp({**env, "RESUME_FROM": "latest"}, tmp_path / "2.txt"))
        second.wait_for_text(f"resumed      from {before}")
        second.wait_for(f"step {killed_at + 2}", lambda: max(logged_steps(out), default=0) >= killed_at + 2)
        workers = worker_processes(second)
        victim = rng.choice([0, 1])
        killed = kill_after_step(second, 0, rng, signal.SIGKILL, target=workers[victim].pid)
        assert second.wait(60) not in (None, 0), second.text()[-3000:]
        assert time.monotonic() - killed < 60
        assert not psutil.wait_procs(list(workers.values()), timeout=5)[1]
        assert f"error: [rank {1 - victim}] lost contact with another process" in second.text(), second.text()[-3000:]

        # 3. Resumed to the end.
        started.append(last := torchrun_fsdp({**env, "RESUME_FROM": "latest"}, tmp_path / "3.txt"))
        assert last.wait() == 0, last.text()[-3000:]
        assert "processes    2 (FSDP, gloo)" in last.text()

    diff = assert_same_run(out, straight_fsdp.result())
    print(f"FSDP: whole job killed at step {killed_at}, resumed from {before.name}, rank {victim} killed; "
          f"max |resumed - straight| = {diff}")
    assert diff == 0.0  # bit-identical


def test_a_signal_is_recorded_and_a_second_ctrl_c_stops_at_once():
    """What StopSignals promises a person at a terminal; under torchrun (no forcing) a second Ctrl-C is ignored,
    because torchrun forwards the terminal's Ctrl-C to workers that already got it."""
    # What was there before (SIG_IGN, not Python's handler, when pytest itself was started in the background).
    handlers_before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for force in (True, False):
        signals = train.StopSignals()
        signals.catch(force_on_second_sigint=force)
        try:
            signal.raise_signal(signal.SIGTERM)  # returns after the Python handler has run
            assert signals.received == signal.SIGTERM
            signal.raise_signal(signal.SIGINT)
            assert signals.received == signal.SIGTERM  # the first signal is the one reported
        finally:
            signals.release()
        signals = train.StopSignals()
        signals.catch(force_on_second_sigint=force)
        try:
            signal.raise_signal(signal.SIGINT)
            assert signals.received == signal.SIGINT
            with pytest.raises(KeyboardInterrupt) if force else contextlib.nullcontext():
                signal.raise_signal(signal.SIGINT)
        finally:
            signals.release()
    assert {signum: signal.getsignal(signum) for signum in handlers_before} == handlers_before  # restored


class ItemsAndPids(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, os.getpid()


def signals_handled(pid: int) -> bool:
    """True once no signal waits for `pid` (none pending; or it has exited): an ignored signal is dropped when it is
    sent, one whose default action is to end the process is pending until the process ends."""
    status = psutil.Process(pid)
    if status.status() == psutil.STATUS_ZOMBIE:
        return True
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["SigPnd"], 16) == 0 and int(fields["ShdPnd"], 16) == 0


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {condition}"
        time.sleep(0.01)


@pytest.mark.slow  # the loader notices the dead worker at its 5-second status check
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/<pid>/status")
def test_data_loader_workers_leave_stop_signals_to_the_training_process():
    """A terminal's Ctrl-C and torchrun's SIGTERM reach the loader workers too (their process group): the workers
    ignore both, and the loader goes on to its last batch (without: "DataLoader worker ... killed by signal")."""
    loader = torch.utils.data.DataLoader(ItemsAndPids(), batch_size=None, num_workers=1, prefetch_factor=1,
                                         worker_init_fn=faults.ignore_stop_signals)
    batches = iter(loader)
    first, worker = next(batches)
    for signum in (signal.SIGINT, signal.SIGTERM):
        os.kill(worker, signum)
    wait_until(lambda: signals_handled(worker))
    assert psutil.Process(worker).status() != psutil.STATUS_ZOMBIE
    assert [first] + [index for index, _ in batches] == list(range(8))

    # Positive control: a worker that does not ignore SIGTERM has ended once the wait above is over.
    plain = iter(torch.utils.data.DataLoader(ItemsAndPids(), batch_size=None, num_workers=1, prefetch_factor=1))
    _, plain_worker = next(plain)
    os.kill(plain_worker, signal.SIGTERM)
    wait_until(lambda: signals_handled(plain_worker))
    assert psutil.Process(plain_worker).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        list(plain)


# train.main with a SIGTERM just before the line of an error that ended the loop (as torchrun's to a survivor the
# moment another worker dies), or just before the last step's adapter is written.
SIGTERM_BEFORE = """
import signal, sys
import train
from support import atomic, faults

def sigterm_before(function):
    def with_sigterm_first(*args):
        signal.raise_signal(signal.SIGTERM)  # returns after a Python handler has run; the default one ends us
        return function(*args)
    return with_sigterm_first

def failed_loop(trainer, stop_signal):
    raise faults.RunError("the loop failed")

if sys.argv[1] == "error line":
    faults.exit_code, train.Trainer.train = sigterm_before(faults.exit_code), failed_loop
else:
    train.Trainer.save_final_adapter = sigterm_before(train.Trainer.save_final_adapter)
sys.exit(train.main([]))  # the settings come from the environment
"""


@pytest.mark.slow
def test_a_sigterm_after_the_loop_waits_for_the_error_line_or_the_adapter(tmp_path, data, cache):
    """torchrun SIGTERMs the surviving workers as soon as one dies: the survivor's `lost contact` line was lost when
    the signal came between the loop's end and the line (a CI run of the FSDP test below). After the last step, the
    run writes its adapter and ends as usual."""
    with runs() as started:
        env = run_env(data, cache, tmp_path / "failed")
        started.append(failed := Run(["-c", SIGTERM_BEFORE, "error line"], env, tmp_path / "failed.txt"))
        assert failed.wait() == 1, failed.text()[-3000:]
        assert failed.text().endswith("error: the loop failed\n"), failed.text()[-3000:]

        env = run_env(data, cache, tmp_path / "finished", MAX_STEPS="2", EVAL_FREQ="0")
        started.append(finished := Run(["-c", SIGTERM_BEFORE, "final adapter"], env, tmp_path / "finished.txt"))
        assert finished.wait() == 0, finished.text()[-3000:]
        assert (tmp_path / "finished" / "adapter_model.safetensors").is_file()


# --- damaged, incomplete and incompatible checkpoints -----------------------------------------------------------------

def copy_checkpoint(straight: Straight, step: int, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(straight.result() / f"checkpoint-{step}", dest)
    return dest


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def flip_last_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[-1] ^= 0xFF
    path.write_bytes(bytes(content))


def edit_manifest_settings(path: Path) -> None:
    manifest = json.loads(path.read_text())
    manifest["identity"]["lora_r"] = 16  # as if to force a resume past the settings check
    path.write_text(json.dumps(manifest))


@pytest.mark.slow  # waits for the `straight` run, a whole train.py process
def test_latest_picks_the_newest_complete_checkpoint_and_resumes_from_it(tmp_path, straight, data, cache,
                                                                          monkeypatch, capsys):
    """What kills and crashes leave behind, crafted: latest skips each of them and the run resumes from the newest
    checkpoint that loads."""
    out = tmp_path / "out"
    copy_checkpoint(straight, 10, out / "checkpoint-10")
    truncate(copy_checkpoint(straight, 16, out / "checkpoint-16") / "trainer_state.pt")
    (copy_checkpoint(straight, 20, out / "checkpoint-20") / "manifest.json").unlink()  # never completed
    copy_checkpoint(straight, 30, out / ".checkpoint-30.tmp")  # complete, but never renamed into place
    (copy_checkpoint(straight, 32, out / "checkpoint-32") / "adapter_model.safetensors").unlink()
    (out / "checkpoint-40").write_text("not a folder")
    original = straight.result() / "checkpoint-16"
    skipped: list[str] = []
    assert find_latest_checkpoint(out, skipped) == out / "checkpoint-10"
    assert skipped == ["checkpoint-32 (adapter_model.safetensors is missing)",
                       "checkpoint-20 (manifest.json is missing: the checkpoint is incomplete (its writing was "
                       "interrupted) or was not written by this train.py)",
                       f"checkpoint-16 (trainer_state.pt is {(out / 'checkpoint-16/trainer_state.pt').stat().st_size:,}"
                       f" bytes but manifest.json says {(original / 'trainer_state.pt').stat().st_size:,}: the file "
                       "was truncated or changed after the checkpoint was written)"]

    for key, value in run_env(data, cache, out, RESUME_FROM="latest", MAX_STEPS="12").items():
        monkeypatch.setenv(key, value)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert train.main([]) == 0
    printed = capsys.readouterr().out
    assert "note: RESUME_FROM=latest: skipping checkpoint-16 (trainer_state.pt is" in printed
    assert f"resumed      from {out / 'checkpoint-10'}: step 10" in printed
    assert logged_steps(out) == [11, 12]  # metrics.jsonl is new here: only the resumed steps


def test_latest_with_no_checkpoint_starts_at_step_0_with_a_note(tmp_path, data, cache, monkeypatch, capsys):
    for key, value in run_env(data, cache, tmp_path / "out", RESUME_FROM="latest", MAX_STEPS="1").items():
        monkeypatch.setenv(key, value)
    assert train.main([]) == 0
    assert f"note: RESUME_FROM=latest: no complete checkpoint in {tmp_path / 'out'} yet; starting at step 0" in (
        capsys.readouterr().out)
    assert logged_steps(tmp_path / "out") == [1]


@pytest.mark.slow  # waits for the `straight` run, a whole train.py process
@pytest.mark.parametrize("damage, file, message", [
    (truncate, "adapter_model.safetensors", "adapter_model.safetensors is {size} bytes but manifest.json says"),
    (flip_last_byte, "trainer_state.pt", "trainer_state.pt does not match its SHA-256 in manifest.json"),
    (flip_last_byte, "adapter_config.json", "adapter_config.json does not match its SHA-256 in manifest.json"),
    (Path.unlink, "manifest.json", "manifest.json is missing: the checkpoint is incomplete"),
    (edit_manifest_settings, "manifest.json", "manifest.json was changed after the checkpoint was written"),
], ids=["truncated", "edited-state", "edited-config", "no-manifest", "edited-manifest"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, straight, data, cache, monkeypatch, capsys, damage,
                                                         file, message):
    checkpoint = copy_checkpoint(straight, 10, tmp_path / "checkpoint-10")
    damage(checkpoint / file)
    size = (checkpoint / file).stat().st_size if (checkpoint / file).exists() else 0
    for key, value in run_env(data, cache, tmp_path / "out", RESUME_FROM=str(checkpoint)).items():
        monkeypatch.setenv(key, value)
    assert train.main([]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: RESUME_FROM={checkpoint}: "
                                                     f"{message.format(size=f'{size:,}')}"), errors
    assert errors[0].endswith("resume from another checkpoint (RESUME_FROM=latest picks the newest complete one)")
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.slow  # waits for the `straight` run, a whole train.py process
def test_resuming_with_other_settings_is_refused_naming_each(tmp_path, straight, data, cache, monkeypatch, capsys):
    other_data = tmp_path / "other.json"
    records = json.loads(data.read_text())
    records[20]["output"] += " (edited)"
    other_data.write_text(json.dumps(records))
    checkpoint = copy_checkpoint(straight, 10, tmp_path / "checkpoint-10")
    for key, value in run_env(other_data, cache, tmp_path / "out", RESUME_FROM=str(checkpoint), LORA_R="4",
                              BATCH_SIZE="4", TARGET_MODULES="query_key_value,dense").items():
        monkeypatch.setenv(key, value)
    assert train.main([]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: RESUME_FROM={checkpoint}: this run would not continue the checkpoint's run: "
                      "TARGET_MODULES is query_key_value,dense here but query_key_value in the checkpoint; "
                      "LORA_R is 4 here but 8 in the checkpoint; BATCH_SIZE is 4 here but 2 in the checkpoint; "
                      "the training data differ (other records, tokenizer or prompt template). Set them back, or "
                      "start a new run in another OUTPUT_DIR"]


@pytest.mark.slow  # waits for the `straight` run, a whole train.py process
def test_save_total_limit_deletes_only_older_complete_checkpoints_oldest_first(tmp_path, straight):
    out = tmp_path / "out"
    for step in (10, 16, 20, 30, 40):
        copy_checkpoint(straight, step, out / f"checkpoint-{step}")
    (out / "checkpoint-16" / "manifest.json").unlink()  # incomplete: left for a person to look at
    # checkpoint-30 was just written; checkpoint-40 is newer (an earlier run got further): left alone.
    assert prune_checkpoints(out, 2, out / "checkpoint-30") == [out / "checkpoint-10"]
    assert visible_checkpoints(out) == ["checkpoint-16", "checkpoint-20", "checkpoint-30", "checkpoint-40"]
    copy_checkpoint(straight, 10, out / "checkpoint-10")
    assert prune_checkpoints(out, 1, out / "checkpoint-30") == [out / "checkpoint-10", out / "checkpoint-20"]
    assert visible_checkpoints(out) == ["checkpoint-16", "checkpoint-30", "checkpoint-40"] and not leftovers(out)


def test_resuming_mid_epoch_skips_batches_without_collating_them():
    """SkipSampler starts the epoch at the first unseen example: the same batches as skipping them after loading,
    but the skipped ones are never collated."""
    calls = []

    def collate(items):
        calls.append(items)
        return items

    dataset = list(range(23))
    for sampler in (torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=3),
                    train.LengthGroupedSampler([i % 7 for i in dataset], 3, num_replicas=2, rank=0, seed=3)):
        skipping = train.SkipSampler(sampler)
        loader = torch.utils.data.DataLoader(dataset, batch_size=3, sampler=skipping, collate_fn=collate)
        skipping.set_epoch(2)
        full = list(loader)
        calls.clear()
        skipping.skip = 2 * 3  # two micro-batches done
        assert list(loader) == full[2:] and len(calls) == len(full) - 2


@pytest.mark.slow  # waits for the `straight` run, a whole train.py process
def test_the_same_data_under_another_path_resumes(tmp_path, straight, data, cache, monkeypatch, capsys):
    """DATA_PATH may move (another machine, another mount): the content is compared, not the path. The run's new
    length is allowed, with a note."""
    moved = tmp_path / "moved" / "data.jsonl"
    moved.parent.mkdir()
    moved.write_text("\n".join(json.dumps(r) for r in json.loads(data.read_text())))
    checkpoint = copy_checkpoint(straight, 10, tmp_path / "checkpoint-10")
    for key, value in run_env(moved, cache, tmp_path / "out", RESUME_FROM=str(checkpoint), MAX_STEPS="11").items():
        monkeypatch.setenv(key, value)
    assert train.main([]) == 0
    assert ("note: the run now ends at step 11 instead of 40 (NUM_EPOCHS or MAX_STEPS changed): the learning-rate "
            "schedule is recomputed") in capsys.readouterr().out
    assert logged_steps(tmp_path / "out") == [11]


# --- write errors, dead data-loader workers, DDP timeout --------------------------------------------------------------

class FullDisk:
    """A stand-in for a disk that fills up: the `nth` file named `name` that atomic.write_bytes opens takes half its
    bytes, then the write fails with ENOSPC, as Python's file.write reports it (no file name)."""

    def __init__(self, name: str, nth: int) -> None:
        self.name, self.nth, self.opened = name, nth, 0

    def open(self, path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        if atomic.public_name(path).name == self.name:  # the adapter's file is staged under a hidden name
            self.opened += 1
            if self.opened == self.nth:
                return HalfWritten(file)
        return file


class HalfWritten:
    def __init__(self, file) -> None:
        self.file = file

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def write(self, data) -> int:
        self.file.write(bytes(data)[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("name", [pytest.param("adapter_model.safetensors", marks=pytest.mark.slow), "trainer_state.pt",
                                  pytest.param("manifest.json", marks=pytest.mark.slow)])
def test_a_full_disk_keeps_the_last_checkpoint_and_says_so_in_one_line(tmp_path, data, cache, monkeypatch, capsys,
                                                                       name):
    """The disk fills up while checkpoint-4 is written, in each of its files: one line says so, names the file, the
    free space, the last complete checkpoint and how to go on; nothing half-written is left."""
    monkeypatch.setattr(atomic, "open", FullDisk(name, nth=2).open, raising=False)
    out = tmp_path / "out"
    for key, value in run_env(data, cache, out, SAVE_STEPS="2", MAX_STEPS="6").items():
        monkeypatch.setenv(key, value)
    assert train.main([]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    size = sum(p.stat().st_size for p in (out / "checkpoint-2").iterdir())
    assert len(errors) == 1 and re.fullmatch(
        re.escape(f"error: the disk is full: cannot write {out / 'checkpoint-4' / name} ([Errno 28] No space left on "
                  "device; ") + r"\d+\.\d\d [KMG]iB" + re.escape(
            f" free on the disk of {out}); the last complete checkpoint is {out / 'checkpoint-2'}; free at least "
            f"{atomic.human_bytes(size)} (one checkpoint), then run the same command again with RESUME_FROM=latest"),
        errors[0]), errors
    assert "Traceback" not in captured.err
    assert visible_checkpoints(out) == ["checkpoint-2"] and not leftovers(out)
    verify_checkpoint(out / "checkpoint-2")


@pytest.mark.slow  # three runs, in this process
def test_after_a_full_disk_latest_ends_with_the_uninterrupted_runs_adapter(tmp_path, data, cache, monkeypatch):
    """Space freed, RESUME_FROM=latest goes on from checkpoint-2 and ends with the adapter, bit for bit, of a run
    that never met a full disk."""
    monkeypatch.setattr(atomic, "open", FullDisk("trainer_state.pt", nth=2).open, raising=False)
    for key, value in run_env(data, cache, tmp_path / "out", SAVE_STEPS="2", MAX_STEPS="6").items():
        monkeypatch.setenv(key, value)
    assert train.main([]) == 1
    monkeypatch.delattr(atomic, "open")  # the space is freed
    monkeypatch.setenv("RESUME_FROM", "latest")
    assert train.main([]) == 0
    assert logged_steps(tmp_path / "out") == [1, 2, 3, 4, 5, 6]  # rows 3 and 4 of the failed run redone
    monkeypatch.delenv("RESUME_FROM")
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "straight"))
    assert train.main([]) == 0
    resumed = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    assert resumed == (tmp_path / "straight" / "adapter_model.safetensors").read_bytes()
    assert resumed != (tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors").read_bytes()  # it trained on


def test_a_full_disk_in_a_librarys_own_words_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    """What safetensors and torch's zip writer raise on a full disk (measured on a 512 KiB tmpfs) becomes ENOSPC
    naming the file; torch's words alone are not enough, the disk must be (nearly) full too."""
    final = tmp_path / "weights.bin"
    safetensors_words = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    torch_words = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    for error, free, full in [(safetensors_words, 10**9, True), (torch_words, 1000, True), (torch_words, 10**9, False),
                              (RuntimeError("something else"), 0, False)]:
        monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**10, 0, free))
        with pytest.raises((OSError, RuntimeError)) as e, atomic.atomic_write(final) as staging:
            staging.write_bytes(b"half")
            raise error
        if full:
            assert e.type is OSError and e.value.errno == errno.ENOSPC and e.value.filename == str(final)
            assert e.value.__cause__ is error
        else:
            assert e.value is error
        assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_file_a_library_writes_0600_gets_the_users_umask(tmp_path):
    previous = os.umask(0o002)
    try:
        with atomic.atomic_write(tmp_path / "adapter_model.safetensors") as staging:
            os.close(os.open(staging, os.O_WRONLY | os.O_CREAT, 0o600))  # as safetensors' save_file does
        with atomic.atomic_write(tmp_path / "checkpoint", folder=True) as staging:
            os.close(os.open(staging / "a", os.O_WRONLY | os.O_CREAT, 0o600))
    finally:
        os.umask(previous)
    assert atomic.file_mode() == 0o644  # the umask is back, and read without changing it
    assert ((tmp_path / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o664
            == (tmp_path / "checkpoint" / "a").stat().st_mode & 0o777)


def test_the_last_checkpoint_is_named_or_said_to_be_none_yet(tmp_path, data, cache, capsys):
    """A second Ctrl-C before the first checkpoint: "there is no complete checkpoint yet", not "... is none"."""
    cfg = load_config([], run_env(data, cache, tmp_path / "out"))
    assert faults.exit_code(KeyboardInterrupt(), cfg, train.DistEnv()) == 130
    assert capsys.readouterr().err == ("error: interrupted by Ctrl-C, without a checkpoint; there is no complete "
                                       "checkpoint yet\n")


class DyingCollator(train.PadCollator):
    """Kills its own data-loader worker process (as the out-of-memory killer would) at its third batch."""

    calls = 0

    def __call__(self, features):
        DyingCollator.calls += 1  # counted per process: each worker has its own copy
        if torch.utils.data.get_worker_info() is not None and DyingCollator.calls == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(features)


def test_a_dead_data_loader_worker_is_one_line(tmp_path, data, cache, monkeypatch, capsys):
    monkeypatch.setattr(train, "PadCollator", DyingCollator)
    for key, value in run_env(data, cache, tmp_path / "out", NUM_WORKERS="1", MAX_STEPS="5").items():
        monkeypatch.setenv(key, value)
    assert train.main([]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err[-3000:]
    # Depending on the moment, "DataLoader worker (pid N) is killed by signal: Killed." or a broken pipe.
    assert errors[0].startswith("error: a data-loader worker process died (")
    assert "the system may have killed it for lack of memory: lower NUM_WORKERS" in errors[0]
    assert "Traceback" not in captured.err


def test_ddp_timeout_is_the_process_group_timeout(monkeypatch):
    """DDP_TIMEOUT bounds how long a rank waits for a hung peer: it is the timeout of every collective."""
    import datetime

    seen = {}
    monkeypatch.setattr(train.torch_dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    for var, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(var, value)
    train.setup_distributed(load_config([], {"DDP": "true", "DDP_TIMEOUT": "42"}))
    assert seen["timeout"] == datetime.timedelta(seconds=42)
    assert load_config([], {}).ddp_timeout == 1800
    with pytest.raises(ConfigError, match="DDP_TIMEOUT must be > 0, got 0"):
        load_config([], {"DDP_TIMEOUT": "0"})


# --- malformed input: accepted, or refused with one line --------------------------------------------------------------

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                               st.sampled_from(["instruction", "input", "output", "x"]), inner, max_size=4),
                           max_leaves=12)
FILE_BYTES = st.one_of(
    st.binary(max_size=120),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()[:-1]),  # cut short
    st.lists(JSON_VALUES, max_size=3).map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode()),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(content=FILE_BYTES, suffix=st.sampled_from([".json", ".jsonl", ".txt"]))
@example(content=b"[" + b"1" * 5000 + b"]", suffix=".json")  # Python refuses to convert so long an integer
@example(content=b"[" * 100000, suffix=".json")
def test_data_loading_accepts_or_refuses_in_one_line(content, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(content)
        try:
            validate_records(load_records(str(path), tmp), str(path))
        except DataError as err:
            assert "\n" not in str(err) and str(err)


BAD_RECORDS = st.lists(JSON_VALUES, min_size=0, max_size=3).map(lambda rows: json.dumps(rows).encode())


def refused_before_training(env: dict, content: bytes) -> bool:
    try:
        load_config([], env)
    except ConfigError:
        return True
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "data.json").write_bytes(content)
        try:
            validate_records(load_records(str(Path(tmp) / "data.json"), tmp), "data.json")
        except DataError:
            return True
    return False


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(env=st.dictionaries(st.sampled_from(FIELDS).map(str.upper), ODD_VALUES, max_size=2),
       content=st.one_of(FILE_BYTES, BAD_RECORDS))
def test_train_main_refuses_bad_input_in_one_line_and_writes_nothing(env, content):
    env = {k: v for k, v in env.items() if k not in ("DATA_PATH", "OUTPUT_DIR", "CACHE_DIR", "MODEL_PATH", "DDP")}
    assume(refused_before_training(env, content))
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        (Path(tmp) / "data.json").write_bytes(content)
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", *(f.upper() for f in FIELDS)):
            mp.delenv(var, raising=False)
        for key, value in {**env, "MODEL_PATH": str(TINY_BLOOM), "DATA_PATH": str(Path(tmp) / "data.json"),
                           "OUTPUT_DIR": str(Path(tmp) / "out"), "CACHE_DIR": str(Path(tmp) / "cache")}.items():
            if "\x00" not in value:
                mp.setenv(key, value)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = train.main([])
        lines = stderr.getvalue().splitlines()
        assert code == 1 and len([line for line in lines if line.startswith("error: ")]) == 1, lines
        assert not (Path(tmp) / "out").exists()
