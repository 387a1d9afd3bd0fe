"""What guards train.py's loop: stop signals, errors that end a run, and the exit code and one line
each gets.

Runs on borrowed machines end without warning (a Kaggle time limit, a reclaimed spot node), so:
  * SIGTERM (what a scheduler, torchrun or a spot reclaim sends) or Ctrl-C only records that the run
    should stop; the loop finishes its step, writes a checkpoint and exits with 128 + the signal
    number (after the last step, the run writes its adapter and ends as usual). A second Ctrl-C
    stops at once, without a checkpoint (not under torchrun, which forwards a terminal's Ctrl-C a
    second time). Before the first step, they act as usual.
  * A DDP rank that dies or hangs ends the others with an error (at the latest after DDP_TIMEOUT
  seconds).
  * A data-loader worker killed for lack of memory is one line saying what to lower.
Exit codes: 0 finished; 1 bad setting or data, failed run, checkpoint not written, lost DDP peer,
dead data worker; 143 (SIGTERM) or 130 (Ctrl-C) stopped after writing a checkpoint; 130 also for a
second Ctrl-C.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as torch_dist

from support.atomic import DISK_FULL_ERRNOS, describe_write_error
from support.checkpoint import resume_advice
from support.config import ConfigError
from support.data_sources import DataError

WORKER_DIED = ("a data-loader worker process died ({}); the system may have killed it for lack of "
               "memory: lower NUM_WORKERS (0 loads data in the training process) or BATCH_SIZE")


class RunError(RuntimeError):
    """A problem found while running (model cannot load, loss became NaN); printed as one line."""


class TrainingStopped(Exception):
    """SIGTERM or SIGINT stopped the run after a step; a checkpoint of that step was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def first_line(err: BaseException) -> str:
    """An exception's first line of text, or its type's name when it has none."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class StopSignals:
    """From `catch()` until `release()`, SIGTERM and SIGINT only record that the run should stop
    (`received`: the first signal's number, 0 for none); the loop reads it after each step.

    train.main releases them only after the line an error ends the run with is printed: torchrun
    SIGTERMs the other workers the moment one dies, and the survivor's own line ("lost contact with
    another process") must not be cut short. torchrun forwards the SIGTERM it gets to every worker
    and SIGKILLs them 30 s later: where a step and a checkpoint take longer, launch it with
    `--shutdown-timeout=<seconds>`.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.force_on_second_sigint = False
        self.received = 0
        self._previous: dict = {}

    def catch(self, force_on_second_sigint: bool) -> None:
        self.force_on_second_sigint = force_on_second_sigint
        # only the main thread may set handlers
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous.setdefault(signum, signal.signal(signum, self._handle))

    def release(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        # No printing here: a handler runs between two bytecodes, possibly inside another print to
        # the same stream.
        if (signum == signal.SIGINT and self.received == signal.SIGINT
                and self.force_on_second_sigint):
            raise KeyboardInterrupt
        self.received = self.received or signum


def ignore_stop_signals(worker_id: int) -> None:
    """A data-loader worker's start (DataLoader's worker_init_fn): SIGTERM and Ctrl-C are for the
    training process, which finishes its step, checkpoints and then ends its workers. torchrun
    forwards a SIGTERM to each worker's whole process group, a terminal's Ctrl-C reaches its
    foreground group and a scheduler may signal every process of the job: a loader worker the signal
    killed ended the run without its checkpoint."""
    for signum in StopSignals.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def signal_flags(signum: int, device: torch.device) -> torch.Tensor:
    """[got SIGTERM, got SIGINT] as numbers to sum over ranks (summed, they say which signal any
    rank got)."""
    return torch.tensor([float(signum == signal.SIGTERM), float(signum == signal.SIGINT)],
                        device=device, dtype=torch.float64)


def agreed_signal(sigterm_count: float, sigint_count: float) -> int:
    """The signal to stop for, from `signal_flags` summed over ranks (SIGTERM first); 0 to go on."""
    return signal.SIGTERM if sigterm_count else signal.SIGINT if sigint_count else 0


@contextlib.contextmanager
def data_worker_errors(num_workers: int):
    """A data-loader worker that dies (the out-of-memory killer, most often) as a one-line RunError.
    Depending on the moment, the DataLoader reports it as "DataLoader worker (pid N) is killed by
    signal", or the pipe it was sending a batch through breaks."""
    try:
        yield
    except (RuntimeError, ConnectionError, EOFError) as err:
        if num_workers == 0 or (isinstance(err, RuntimeError)
                                and not str(err).startswith("DataLoader worker")):
            raise
        raise RunError(WORKER_DIED.format(f"{type(err).__name__}: {err}"
                                          if not isinstance(err, RuntimeError)
                                          else str(err).strip())) from None


def communication_failure(err: RuntimeError) -> str | None:
    """The gist of an error from a collective whose peer died or hung (gloo, NCCL); None for any
    other error.

    gloo raises a plain RuntimeError such as "[.../gloo/transport/tcp/pair.cc:537] Read error
    [127.0.0.1]:3490: Connection reset by peer. This is typically caused by ..."; this returns "Read
    error [...]: Connection reset by peer".
    """
    text = str(err).strip()
    if not (isinstance(err, torch_dist.DistError) or "gloo" in text.lower()
            or "nccl" in text.lower()):
        return None
    return re.sub(r"^\[[^\]]*\]\s*", "", first_line(err)).split(". ")[0].rstrip(".")


def exit_code(err: BaseException, cfg, dist) -> int | None:
    """Print the one line `err` deserves (on stderr, prefixed with the rank under DDP or FSDP) and
    return the exit code; None for a bug, whose traceback the caller keeps. `cfg` and `dist` are
    None until they are set up."""

    def error(message: str) -> None:
        rank = f"[rank {dist.rank}] " if dist is not None and dist.distributed else ""
        print(f"error: {rank}{message}", file=sys.stderr, flush=True)

    def last_checkpoint(how_to_resume: str = "") -> str:
        return (f"; {resume_advice(Path(cfg.output_dir), how_to_resume=how_to_resume)}" if cfg
                else "")

    if isinstance(err, TrainingStopped):
        if dist.is_master:
            print(f"{err}: checkpoint written to {err.checkpoint}; continue with "
                  "RESUME_FROM=latest",
                  file=sys.stderr, flush=True)
        return 128 + err.signum
    if isinstance(err, KeyboardInterrupt):
        error(f"interrupted by Ctrl-C, without a checkpoint{last_checkpoint()}")
        return 130
    if isinstance(err, (ConfigError, DataError, RunError)):
        error(str(err))
        return 1
    if isinstance(err, torch.OutOfMemoryError):
        error(f"out of {'GPU ' if dist is not None and dist.device.type == 'cuda' else ''}memory "
              f"with BATCH_SIZE={cfg.batch_size} x MAX_LENGTH={cfg.max_length}: halve BATCH_SIZE "
              "and double GRAD_ACCUM_STEPS (the same optimizer step), set "
              "GRADIENT_CHECKPOINTING=true, or lower MAX_LENGTH"
              # A checkpoint's batch shape must match on resume (config.RESUME_MUST_MATCH); these
              # may change.
              + last_checkpoint(" (RESUME_FROM=latest continues from it with "
                                "GRADIENT_CHECKPOINTING=true or MIX_PREC_TRAIN=true; a new "
                                "BATCH_SIZE, GRAD_ACCUM_STEPS or MAX_LENGTH starts a new run)"))
        return 1
    # disk full or folder read-only while writing metrics or the final adapter
    if isinstance(err, OSError):
        if err.errno in DISK_FULL_ERRNOS:
            advice = f"; {resume_advice(Path(cfg.output_dir), disk_full=True)}" if cfg else ""
            error(f"{describe_write_error(err)}{advice}")
        else:
            error(f"{err}{last_checkpoint()}")
        return 1
    if isinstance(err, RuntimeError) and str(err).startswith("DataLoader worker"):
        # Raised by the DataLoader's SIGCHLD handler, wherever the main thread is at that moment.
        error(WORKER_DIED.format(str(err).strip()) + last_checkpoint())
        return 1
    distributed = dist is not None and dist.distributed
    gist = communication_failure(err) if isinstance(err, RuntimeError) and distributed else None
    if gist is None:
        return None
    waited = f" for DDP_TIMEOUT={cfg.ddp_timeout} s" if "time" in gist.lower() else ""
    error(f"lost contact with another process ({gist}): it died or hung{waited}; its own error "
          f"line, if it printed one, says why{last_checkpoint()}")
    return 1
