"""One run per OUTPUT_DIR: a run owns its folder while it runs, and never mixes its results with
another run's.

  * From the moment its data and settings are checked, before the model loads, until it ends, rank 0
    of a run holds an OS lock (flock) on OUTPUT_DIR/run.lock, which names it (pid, start time,
    host). The kernel releases it when the process ends, however it ends (kill -9 included), so a
    lock is never stale. A second run into the folder stops at once with one line naming the running
    one, and writes nothing; of two started together, the second stops before loading the model. A
    run that fails before writing anything removes its lock file again.
  * A new run (no RESUME_FROM, or a checkpoint of another folder) into a folder that holds another
    run's results (adapter, checkpoints, metrics) is refused, with the two ways on:
    RESUME_FROM=latest continues that run, OVERWRITE_OUTPUT_DIR=true starts over after moving the
    old results aside to <OUTPUT_DIR>.replaced-<time>/, so that RESUME_FROM=latest can never pick a
    checkpoint of another run.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from support.checkpoint import CHECKPOINT_RE
from support.config import ConfigError, TrainConfig
from support.distributed import DistEnv, broadcast_from_master, note
from support.metrics import LOSS_CURVE_NAME, METRICS_NAME
from support.peft_format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

LOCK_NAME = "run.lock"
RESULT_NAMES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, METRICS_NAME, LOSS_CURVE_NAME)


def earlier_results(output_dir: Path) -> list[Path]:
    """What a run leaves in its folder (the adapter, metrics, loss curve, checkpoints), found in
    `output_dir`."""
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if p.name in RESULT_NAMES
                  or CHECKPOINT_RE.fullmatch(p.name))


def running_owner(output_dir: Path) -> str | None:
    """Who holds `output_dir`'s lock ("pid 123, started ... on host"), or None when no running
    process does. Only reads: the lock file is opened, never created or written."""
    try:
        fd = os.open(output_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: fails only while a run holds it
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _describe_owner(os.read(fd, 4096))
    finally:
        os.close(fd)


def _describe_owner(raw: bytes) -> str:
    try:
        owner = json.loads(raw)
        return f"pid {owner['pid']}, started {owner['started']} on {owner['host']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def output_dir_problem(cfg: TrainConfig) -> str:
    """Why this run may not use OUTPUT_DIR ("" if it may): another run is using it, or a new run
    would mix its results with another run's. Reads only."""
    output_dir = Path(cfg.output_dir)
    owner = running_owner(output_dir)
    if owner:
        return (f"OUTPUT_DIR={output_dir} is in use by another run ({owner}); wait for it to end, "
                "or choose another OUTPUT_DIR")
    resuming_here = cfg.resume_from == "latest" or (
        cfg.resume_from and Path(cfg.resume_from).resolve().parent == output_dir.resolve())
    found = earlier_results(output_dir)
    if found and not resuming_here and not cfg.overwrite_output_dir:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        return (f"OUTPUT_DIR={output_dir} holds another run's results ({names}); continue that run "
                "with RESUME_FROM=latest, start over with OVERWRITE_OUTPUT_DIR=true (its results "
                "are moved aside), or choose another OUTPUT_DIR")
    return ""


def check_output_dir(cfg: TrainConfig, dist: DistEnv) -> None:
    """Refuse at once, on every rank, when `output_dir_problem` finds one (rank 0 looks, the others
    are told).

    Raises:
        ConfigError: one line naming the folder, the running process or the results, and what to do.
    """
    problem = broadcast_from_master(output_dir_problem(cfg) if dist.is_master else "", dist)
    if problem:
        raise ConfigError(problem)


@contextlib.contextmanager
def own_output_dir(cfg: TrainConfig, dist: DistEnv) -> Iterator[None]:
    """Hold OUTPUT_DIR for the run (rank 0 takes the lock; every rank learns whether it got it), and
    with OVERWRITE_OUTPUT_DIR move another run's results aside first, saying where.

    Raises:
        ConfigError: on every rank, when another run took the folder first.
    """
    lock_fd, problem, moved, created = None, "", None, False
    if dist.is_master:
        created = not Path(cfg.output_dir).exists()
        lock_fd, problem = _take_lock(Path(cfg.output_dir))
        if lock_fd is not None and cfg.overwrite_output_dir and not cfg.resume_from:
            moved = move_aside(Path(cfg.output_dir))
    problem = broadcast_from_master(problem, dist)
    if problem:
        raise ConfigError(problem)
    if moved:
        note(f"OVERWRITE_OUTPUT_DIR: the earlier run's results in {cfg.output_dir} were moved to "
             f"{moved}", dist)
    try:
        yield
    finally:
        if lock_fd is not None:
            _release_lock(Path(cfg.output_dir), lock_fd, created)


def _release_lock(output_dir: Path, fd: int, created: bool) -> None:
    """Close the lock (closing the last descriptor releases it, as the kernel does on exit). A run
    that wrote nothing (it failed before its first step: out of memory in the longest-batch trial, a
    model that does not load) leaves no lock file behind, nor the folder if it created it."""
    try:
        if [p.name for p in output_dir.iterdir()] == [LOCK_NAME]:
            # while still held: a run waiting for it takes a new file (_take_lock)
            (output_dir / LOCK_NAME).unlink()
            if created:
                output_dir.rmdir()
    except OSError:
        pass  # the folder changed meanwhile: leave it
    finally:
        os.close(fd)


def _is_lock_file(fd: int, path: Path) -> bool:
    """Whether the locked descriptor is still the file at `path` (not one a run removed when it
    ended, see `_release_lock`)."""
    try:
        here, locked = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (locked.st_dev, locked.st_ino)


def _take_lock(output_dir: Path) -> tuple[int | None, str]:
    """(descriptor holding the lock, "") or (None, why not). A few tries: a `running_owner` check by
    another process holds a shared lock for an instant."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        fd = os.open(output_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            time.sleep(0.1 * (attempt + 1))
            continue
        if _is_lock_file(fd, output_dir / LOCK_NAME):
            break
        os.close(fd)  # its holder ended and removed it: lock the file now at the path
    else:
        return None, (f"OUTPUT_DIR={output_dir} is in use by another run "
                      f"({running_owner(output_dir) or 'unknown'}); wait for it to end, or choose "
                      "another OUTPUT_DIR")
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": datetime.datetime.now().isoformat(sep=" ", timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    return fd, ""


def move_aside(output_dir: Path) -> Path | None:
    """OVERWRITE_OUTPUT_DIR: move another run's results to a new sibling folder
    <OUTPUT_DIR>.replaced-<time>/."""
    found = earlier_results(output_dir)
    if not found:
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = output_dir.with_name(f"{output_dir.name}.replaced-{stamp}")
    for n in range(2, 100):
        if not target.exists():
            break
        target = output_dir.with_name(f"{output_dir.name}.replaced-{stamp}-{n}")
    target.mkdir()
    for path in found:
        os.replace(path, target / path.name)
    return target
