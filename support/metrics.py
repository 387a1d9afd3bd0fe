"""OUTPUT_DIR/metrics.jsonl, one JSON line per optimizer step and per evaluation (epochs counted from 1, each line
stamped with its local time to the millisecond, which bench/bench_vs_hf_trainer.py times steps by), and the loss
curve drawn from it.

Only rank 0 writes; a log made by another rank is a no-op, so the trainer can log without asking who it is.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from pathlib import Path

from support.atomic import atomic_write, write_text_atomically

METRICS_NAME = "metrics.jsonl"
LOSS_CURVE_NAME = "loss_curve.png"


class MetricsLog:
    """Appends rows to `output_dir/metrics.jsonl` when `enabled` (rank 0)."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.path, self.enabled = Path(output_dir) / METRICS_NAME, enabled

    def write(self, row: dict) -> None:
        """Append `row`, stamped with the local time it was written."""
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            row = {**row, "time": datetime.datetime.now().isoformat(timespec="milliseconds")}
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as err:  # Python's write errors name no file; the run's last line should
                raise OSError(err.errno, err.strerror, str(self.path)) if err.filename is None else err from None

    def rows(self) -> list[dict]:
        """Every complete row (a line a kill cut short is skipped)."""
        rows = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
        return [row for row in rows if isinstance(row, dict) and isinstance(row.get("step"), int)]

    def trim(self, step: int) -> None:
        """Drop the rows past `step`, and any line a kill cut short: a resumed run logs those steps again, and the
        file (and the loss curve drawn from it) should read as one run."""
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
