"""OUTPUT_DIR/metrics.jsonl, one JSON line per optimizer step and per evaluation (epochs counted
from 1, each line stamped with its local time to the millisecond, which bench/bench_vs_hf_trainer.py
times steps by), and the loss curve drawn from it. With REPORT_TO=tensorboard, every row is also
streamed to TensorBoard (OUTPUT_DIR/tensorboard/), as scalars at the row's step: train/loss,
train/lr, train/grad_norm, train/tokens_per_s, eval/loss, eval/ppl, eval/rouge_l, ... (a key
"eval_x" becomes "eval/x", any other "train/<key>").

Only rank 0 writes; a log made by another rank is a no-op, so the trainer can log without asking who
it is.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
from pathlib import Path

from support.atomic import atomic_write, write_text_atomically

METRICS_NAME = "metrics.jsonl"
LOSS_CURVE_NAME = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"
# What each tracker needs installed: (module, how to install it); pinned in requirements.txt.
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard==2.21.0")}
NOT_SCALARS = ("step", "epoch", "time")


def missing_tracker(report_to: list[str]) -> str:
    """"" when every tracker in `report_to` can be imported, else one line saying what to install.
    Looks the packages up without importing them (start-up stays as fast without REPORT_TO)."""
    for name in report_to:
        module, install = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            return f"REPORT_TO={name}: {module} is not installed: {install}"
    return ""


def scalar_tag(key: str) -> str:
    """A metrics.jsonl key as a tracker's scalar: eval_loss -> eval/loss, loss -> train/loss."""
    return f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl row by scalar name (step, epoch and time left out)."""
    return {scalar_tag(key): value for key, value in row.items() if key not in NOT_SCALARS
            and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoardTracker:
    """Event files in OUTPUT_DIR/tensorboard/ (`tensorboard --logdir OUTPUT_DIR/tensorboard`)."""

    def __init__(self, output_dir: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides the events a killed run wrote past its checkpoint, as
        # trim() drops those rows of metrics.jsonl.
        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / TENSORBOARD_DIR),
                                    purge_step=purge_step)

    def log(self, row: dict) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, row["step"])
        self.writer.flush()  # on disk at once: a killed run loses no row

    def close(self) -> None:
        self.writer.close()


TRACKER_CLASSES = {"tensorboard": TensorBoardTracker}


class MetricsLog:
    """Appends rows to `output_dir/metrics.jsonl` when `enabled` (rank 0), and streams them to the
    trackers named in `report_to` (opened at the first row: nothing is written before the run owns
    its folder)."""

    def __init__(self, output_dir: Path, enabled: bool, report_to: list[str] | None = None) -> None:
        self.path, self.enabled = Path(output_dir) / METRICS_NAME, enabled
        self.report_to, self.trackers, self._purge_step = list(report_to or []), None, None

    def write(self, row: dict) -> None:
        """Append `row`, stamped with the local time it was written, and send it to the trackers."""
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            row = {**row, "time": datetime.datetime.now().isoformat(timespec="milliseconds")}
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as err:  # Python's write errors name no file; the run's last line should
                raise OSError(err.errno, err.strerror,
                              str(self.path)) if err.filename is None else err from None
            if self.trackers is None:
                self.trackers = [TRACKER_CLASSES[name](self.path.parent, self._purge_step)
                                 for name in self.report_to]
            for tracker in self.trackers:
                tracker.log(row)

    def close(self) -> None:
        """Close the trackers (metrics.jsonl needs nothing: each row is appended and closed)."""
        for tracker in self.trackers or []:
            tracker.close()
        self.trackers = None

    def rows(self) -> list[dict]:
        """Every complete row (a line a kill cut short is skipped)."""
        rows = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
        return [row for row in rows if isinstance(row, dict) and isinstance(row.get("step"), int)]

    def trim(self, step: int) -> None:
        """Drop the rows past `step`, and any line a kill cut short: a resumed run logs those steps
        again, and the file (and the loss curve drawn from it) should read as one run."""
        self._purge_step = step + 1 if step else None
        if self.enabled and self.path.is_file():
            kept = [json.dumps(row) + "\n" for row in self.rows() if row["step"] <= step]
            write_text_atomically(self.path, "".join(kept))

    def plot(self) -> None:
        """Training and validation loss against optimizer steps, as OUTPUT_DIR/loss_curve.png."""
        if not (self.enabled and self.path.is_file()):
            return
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt

        rows = self.rows()
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        valid = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1)
        if valid:
            ax.plot(*zip(*valid), "o-", label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_write(self.path.with_name(LOSS_CURVE_NAME)) as staging:
            fig.savefig(staging, dpi=100, format="png")
        plt.close(fig)
