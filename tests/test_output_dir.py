"""One run per OUTPUT_DIR (support/output_dir.py): a folder in use or holding another run's results is refused in one
line and left exactly as it was; OVERWRITE_OUTPUT_DIR moves the old results aside; two runs started a second apart
leave the first one's results exactly as a lone run's."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from conftest import REPO, SAMPLE, TINY_BLOOM, metric_rows
from support import output_dir

RUN = {"MODEL_PATH": str(TINY_BLOOM), "MAX_LENGTH": "128", "BATCH_SIZE": "4", "GRAD_ACCUM_STEPS": "1",
       "SIZE_VALID_SET": "8", "EVAL_FREQ": "0", "SAVE_STEPS": "2", "MAX_STEPS": "2", "WARMUP_STEPS": "0"}


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(json.loads(SAMPLE.read_text(encoding="utf-8"))[:48]), encoding="utf-8")
    return path


def main_with(monkeypatch, tmp_path: Path, data: Path, **settings) -> int:
    """train.main() configured by the environment, as `SETTING=... python train.py` runs."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RESUME_FROM"):
        monkeypatch.delenv(var, raising=False)
    env = {**RUN, "DATA_PATH": str(data), "OUTPUT_DIR": str(tmp_path / "out"), "CACHE_DIR": str(tmp_path / "cache"),
           **settings}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return train.main([])


def snapshot(folder: Path) -> dict:
    """Every file and folder below `folder`: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_a_folder_in_use_is_refused_at_once_naming_the_running_process(tmp_path, data, monkeypatch, capsys):
    out = tmp_path / "out"
    held, problem = output_dir._take_lock(out)  # another run holds the folder (a lock is per open file)
    assert problem == ""
    try:
        before = snapshot(out)
        assert main_with(monkeypatch, tmp_path, data) == 1
        [line] = error_lines(capsys)
        assert re.fullmatch(rf"error: OUTPUT_DIR={re.escape(str(out))} is in use by another run \(pid {os.getpid()}, "
                            r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d on .+\); wait for it to end, or choose another "
                            r"OUTPUT_DIR", line), line
        assert snapshot(out) == before
    finally:
        os.close(held)
    assert main_with(monkeypatch, tmp_path, data) == 0  # the lock is gone with its holder


@pytest.mark.slow  # whole training runs
def test_of_two_runs_started_together_the_second_stops_before_the_model_loads(tmp_path, data, monkeypatch, capsys):
    """Both passed the first look at the folder (check_output_dir) at the same moment; the first took the lock. The
    second must stop before loading the model, let alone trying the longest batch (on a GPU, beside the first)."""
    out = tmp_path / "out"
    monkeypatch.setattr(train, "check_output_dir", lambda cfg, dist: None)  # as if it looked before the lock was taken
    monkeypatch.setattr(train, "load_pretrained_model", lambda *a, **k: pytest.fail("the second run loaded the model"))
    monkeypatch.setattr(train, "try_longest_batch", lambda trainer: pytest.fail("the second run tried a batch"))
    held, problem = output_dir._take_lock(out)
    assert problem == ""
    try:
        assert main_with(monkeypatch, tmp_path, data) == 1
        [line] = error_lines(capsys)
        assert line.startswith(f"error: OUTPUT_DIR={out} is in use by another run (pid {os.getpid()}, started "), line
    finally:
        os.close(held)
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]


@pytest.mark.slow  # whole training runs
def test_a_new_run_into_a_finished_runs_folder_is_refused_and_changes_nothing(tmp_path, data, monkeypatch, capsys):
    assert main_with(monkeypatch, tmp_path, data) == 0
    out = tmp_path / "out"
    before = snapshot(out)
    capsys.readouterr()
    assert main_with(monkeypatch, tmp_path, data, MAX_STEPS="3") == 1
    [line] = error_lines(capsys)
    assert line.startswith(f"error: OUTPUT_DIR={out} holds another run's results (adapter_config.json, ")
    assert "continue that run with RESUME_FROM=latest, start over with OVERWRITE_OUTPUT_DIR=true" in line
    assert snapshot(out) == before
    # RESUME_FROM=latest is the way on: the run continues from its checkpoint.
    assert main_with(monkeypatch, tmp_path, data, MAX_STEPS="3", RESUME_FROM="latest") == 0
    assert [row["step"] for row in metric_rows(out) if "loss" in row] == [1, 2, 3]


@pytest.mark.slow  # whole training runs
def test_overwrite_output_dir_moves_the_old_results_aside_and_starts_over(tmp_path, data, monkeypatch, capsys):
    assert main_with(monkeypatch, tmp_path, data, SEED="1") == 0
    out = tmp_path / "out"
    old = snapshot(out)
    capsys.readouterr()
    assert main_with(monkeypatch, tmp_path, data, SEED="2", MAX_STEPS="3", SAVE_STEPS="1",
                     OVERWRITE_OUTPUT_DIR="true") == 0
    [moved] = [p for p in tmp_path.iterdir() if p.name.startswith("out.replaced-")]
    assert f"note: OVERWRITE_OUTPUT_DIR: the earlier run's results in {out} were moved to {moved}" in (
        capsys.readouterr().out)
    assert {name: content for name, (content, _) in snapshot(moved).items()} == {
        name: content for name, (content, _) in old.items() if name != "run.lock"}
    # Only the new run's checkpoints (seed 2), and only its metrics rows.
    checkpoints = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    for name in checkpoints:
        assert json.loads((out / name / "manifest.json").read_text())["identity"]["seed"] == 2
    assert [row["step"] for row in metric_rows(out) if "loss" in row] == [1, 2, 3]


@pytest.mark.slow
def test_two_debug_runs_a_second_apart_leave_the_first_exactly_as_a_lone_run(tmp_path):
    """Bar: two DEBUG runs started 1 s apart into one OUTPUT_DIR; the second exits non-zero within 30 s with one
    line, having written nothing; the first finishes exactly as it would alone."""
    base = {**os.environ, "DEBUG": "true", "MODEL_PATH": str(TINY_BLOOM), "MAX_STEPS": "10",
            "CACHE_DIR": str(tmp_path / "cache")}
    for var in ("RESUME_FROM", "OVERWRITE_OUTPUT_DIR", "OUTPUT_DIR"):
        base.pop(var, None)

    def start(out: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "train.py"], cwd=REPO, env={**base, "OUTPUT_DIR": str(out)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    lone = start(tmp_path / "lone")
    assert lone.wait(timeout=300) == 0, lone.stderr.read()[-2000:]
    shared = tmp_path / "shared"
    first = start(shared)
    time.sleep(1)
    started = time.monotonic()
    second = start(shared)
    _, second_err = second.communicate(timeout=120)
    # On a failure, say which run took the folder: the first's state and both runs' last lines.
    assert second.returncode == 1 and time.monotonic() - started < 30, (
        second.returncode, time.monotonic() - started, first.poll(), second_err[-1000:],
        first.stderr.read()[-1000:] if first.poll() is not None else "first still running")
    errors = [line for line in second_err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"OUTPUT_DIR={shared} is in use by another run (pid {first.pid}," in errors[0], errors
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]

    def results(out: Path) -> dict:
        files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
                 if p.is_file() and p.name not in ("metrics.jsonl", "manifest.json", "run.lock", "loss_curve.png")}
        rows = [{k: v for k, v in row.items() if k not in ("tokens_per_s", "time")} for row in metric_rows(out)]
        return {"files": files, "metrics": rows}

    assert results(shared) == results(tmp_path / "lone")
    assert json.loads((shared / "run.lock").read_text())["pid"] == first.pid  # the second never wrote its name
