"""Checkpoints that are complete or absent, and the checks that decide whether a run may resume from
one.

A checkpoint is OUTPUT_DIR/checkpoint-<step>/ holding:
    adapter_config.json, adapter_model.safetensors
        the adapter, in PEFT's layout (loadable on its own)
    trainer_state.pt
        optimizer, schedule, GradScaler, every rank's RNG, data position
    manifest.json
        step, run identity, and each file's size and SHA-256

It is written into a hidden staging folder, flushed to disk and renamed into place (atomic.py); the
manifest goes in last, so a folder without one is an interrupted save. A resume is resolved once
(`resolve_resume`: RESUME_FROM or the newest complete checkpoint, each file hashed once), then
checked against this run's identity (config.RESUME_MUST_MATCH, the number of processes, the data).
The trainer's position is one `Progress`, saved and restored as a unit. train.py decides when to
save; this module decides what a checkpoint holds, how it reaches the disk and when it is trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import re
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from support.atomic import (DISK_FULL_ERRNOS, atomic_write, describe_write_error, human_bytes,
                            write_bytes)
from support.config import RESUME_MUST_MATCH, ConfigError, TrainConfig
from support.distributed import DistEnv, broadcast_from_master, note
from support.peft_format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

TRAINER_STATE_NAME = "trainer_state.pt"
MANIFEST_NAME = "manifest.json"
# bumped if the checkpoint layout changes; older ones are then refused, not misread
CHECKPOINT_FORMAT = 1
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_RE = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")
# What interrupted saves and deletions leave behind: hidden staging folders
# (".checkpoint-20.<pid>-<hex>.tmp") and checkpoints renamed for deletion
# (".checkpoint-20.old-<pid>").
LEFTOVER_RE = re.compile(rf"\.+{CHECKPOINT_PREFIX}\d+\.")


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete or damaged; the message names the file."""


# --- what a checkpoint holds besides the adapter --------------------------------------------------

@dataclass
class Progress:
    """Where a run is: everything about its position that a resumed run must continue from, saved
    and restored as a unit (in trainer_state.pt, beside the optimizer, schedule, GradScaler and
    random generators)."""

    step: int = 0            # optimizer steps done
    epoch: int = 0           # the current epoch, counted from 0
    batches_done: int = 0    # micro-batches of the current epoch already trained on
    skipped_steps: int = 0   # fp16 steps the GradScaler skipped for inf/NaN gradients
    last_eval: dict = field(default_factory=dict)  # the latest evaluation's metrics

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state})


def trainer_state(progress: Progress, optimizer_state: dict, scheduler, scaler,
                  rng_states: list) -> dict:
    """Everything besides the adapter that an exact resume needs (`optimizer_state`: the optimizer's
    state_dict(), whole also under FSDP; `rng_states`: every rank's `rng_state()`)."""
    return {**dataclasses.asdict(progress), "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_states}


def checkpoint_manifest(progress: Progress, total_steps: int, precision: str, identity: dict,
                        cfg: TrainConfig) -> dict:
    """What manifest.json records besides the files (added by `write_manifest`)."""
    return {"format": CHECKPOINT_FORMAT, "step": progress.step, "epoch": progress.epoch,
            "batches_done": progress.batches_done, "total_steps": total_steps,
            "precision": precision, "config_hash": identity_hash(identity), "identity": identity,
            "config": dataclasses.asdict(cfg)}


def read_trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / TRAINER_STATE_NAME, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """Every random generator this process uses, in types `torch.load(weights_only=True)`
    accepts."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- files and folders ----------------------------------------------------------------------------

def file_digest(path: Path) -> dict:
    """Size and SHA-256 of a file, as the manifest records them."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
            size += len(block)
    return {"size": size, "sha256": sha.hexdigest()}


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Every checkpoint-<step> folder in `output_dir`, complete or not, newest (highest step)
    first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT_RE.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=checkpoint_step, reverse=True)


# --- what makes a checkpoint trustworthy: the run's identity, the manifest ------------------------

def run_identity(cfg: TrainConfig, world_size: int, data_fingerprint: str) -> dict:
    """What a checkpoint's run and a resumed run must share for the second to continue the first:
    the settings in config.RESUME_MUST_MATCH, the number of processes (it decides which examples
    each rank trains on, and each rank has its own dropout stream) and the training data's
    fingerprint."""
    hints = typing.get_type_hints(TrainConfig)
    identity = {}
    for name in RESUME_MUST_MATCH:
        value = getattr(cfg, name)
        # 16 and 16.0 are the same alpha
        identity[name] = float(value) if hints[name] is float else value
    identity["target_modules"] = cfg.target_module_list  # "q, k" and "q,k" are the same targets
    identity["world_size"] = world_size
    identity["data"] = data_fingerprint
    return identity


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _manifest_is_well_formed(manifest) -> bool:
    """The manifest has every field this version writes, and its settings hash matches its settings
    (an edit to the recorded settings, made to force a resume past the check, is caught here)."""
    if not (isinstance(manifest, dict) and manifest.get("format") == CHECKPOINT_FORMAT
            and isinstance(manifest.get("files"), dict)
            and isinstance(manifest.get("identity"), dict)
            and type(manifest.get("total_steps")) is int
            and isinstance(manifest.get("precision"), str)):
        return False
    files = manifest["files"]
    required = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, TRAINER_STATE_NAME)
    return (all(name in files for name in required)
            and all(Path(name).name == name and isinstance(entry, dict)
                    and type(entry.get("size")) is int
                    and isinstance(entry.get("sha256"), str) for name, entry in files.items())
            and manifest.get("config_hash") == identity_hash(manifest["identity"]))


def verify_checkpoint(checkpoint: Path) -> dict:
    """Check a checkpoint folder against its manifest: every file present, of the recorded size and
    SHA-256.

    Returns:
        The manifest.

    Raises:
        CheckpointError: naming the missing, truncated or changed file (or the manifest itself).
    """
    if not checkpoint.is_dir():
        raise CheckpointError("no such folder")
    try:
        manifest = json.loads((checkpoint / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{MANIFEST_NAME} is missing: the checkpoint is incomplete (its "
                              "writing was interrupted) or was not written by this "
                              "train.py") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{MANIFEST_NAME} is unreadable ({err})") from None
    if not _manifest_is_well_formed(manifest):
        raise CheckpointError(f"{MANIFEST_NAME} was changed after the checkpoint was written, or "
                              "comes from another version of train.py")
    for name, expected in manifest["files"].items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{name} is missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{name} is {size:,} bytes but {MANIFEST_NAME} says "
                                  f"{expected['size']:,}: the file was truncated or changed after "
                                  "the checkpoint was written")
        if file_digest(path)["sha256"] != expected["sha256"]:
            raise CheckpointError(f"{name} does not match its SHA-256 in {MANIFEST_NAME}: the file "
                                  "was changed after the checkpoint was written")
    return manifest


def newest_complete_checkpoint(output_dir: Path, skipped: list[str] | None = None
                               ) -> tuple[Path, dict] | None:
    """The newest complete checkpoint in `output_dir` and its manifest, or None; each file is hashed
    once.

    Incomplete or damaged folders are passed over (each with its reason appended to `skipped`): a
    run killed while writing, or a disk that lost a file, must not leave a checkpoint that
    RESUME_FROM=latest picks and then cannot load.
    """
    for checkpoint in checkpoint_dirs(output_dir):
        try:
            return checkpoint, verify_checkpoint(checkpoint)
        except CheckpointError as err:
            if skipped is not None:
                skipped.append(f"{checkpoint.name} ({err})")
    return None


def find_latest_checkpoint(output_dir: Path, skipped: list[str] | None = None) -> Path | None:
    """The newest complete checkpoint's folder (see `newest_complete_checkpoint`), or None."""
    found = newest_complete_checkpoint(output_dir, skipped)
    return found[0] if found else None


# --- writing and pruning: complete or absent ------------------------------------------------------

def resume_advice(output_dir: Path, disk_full: bool = False, how_to_resume: str = "") -> str:
    """For a line that ends a run: the last complete checkpoint in `output_dir` (or that there is
    none yet) followed by `how_to_resume`, or, after a full disk, how much to free and how to go
    on."""
    found = find_latest_checkpoint(output_dir)
    if found is None:
        return "there is no complete checkpoint yet" + ("; free some space and start the run again"
                                                        if disk_full
                                                        else "")
    if not disk_full:
        return f"the last complete checkpoint is {found}{how_to_resume}"
    size = sum(p.stat().st_size for p in found.iterdir() if p.is_file())
    return (f"the last complete checkpoint is {found}; free at least {human_bytes(size)} (one "
            "checkpoint), then run the same command again with RESUME_FROM=latest")


def write_manifest(folder: Path, manifest: dict) -> None:
    """The manifest goes in last: a folder without one is, by definition, an incomplete
    checkpoint."""
    manifest = {**manifest, "files": {p.name: file_digest(p) for p in sorted(folder.iterdir())}}
    write_bytes(folder / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))


def remove_leftovers(output_dir: Path) -> None:
    """Delete what interrupted saves and deletions left (hidden staging and to-be-deleted
    folders)."""
    for path in output_dir.iterdir():
        if LEFTOVER_RE.match(path.name):
            shutil.rmtree(path, ignore_errors=True)


def write_checkpoint(final: Path, model: torch.nn.Module, state: dict, manifest: dict,
                     adapter: dict | None = None) -> None:
    """Write a checkpoint folder so that it is complete or absent (atomic.atomic_write): the adapter
    (`adapter`, the whole tensors under FSDP, or the model's own), trainer_state.pt, then the
    manifest with every file's size and SHA-256, in a hidden staging folder renamed to `final` once
    everything is on disk. A crash's staging folder is removed by the next save."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final.parent)
    with atomic_write(final, folder=True) as staging:
        model.save_pretrained(staging, state_dict=adapter)
        # Serialized in memory, written by Python: a full disk is then an OSError naming the file,
        # where torch's own writer says "[enforce fail at inline_container.cc] unexpected pos".
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes(staging / TRAINER_STATE_NAME, buffer.getbuffer())
        write_manifest(staging, manifest)


def save_checkpoint_folder(final: Path, model: torch.nn.Module, state: dict, manifest: dict,
                           keep: int, adapter: dict | None = None) -> str:
    """Write a checkpoint (`write_checkpoint`), then keep only the newest `keep` (SAVE_TOTAL_LIMIT;
    0 keeps all).

    Returns:
        "" when the checkpoint is on disk, else one line saying why it is not (disk full, read-only
        folder), the last complete checkpoint and how to go on.
    """
    try:
        write_checkpoint(final, model, state, manifest, adapter)
    except OSError as err:
        if err.errno in DISK_FULL_ERRNOS:
            return f"{describe_write_error(err)}; {resume_advice(final.parent, disk_full=True)}"
        reason = f"[Errno {err.errno}] {err.strerror}" if err.strerror else str(err)
        return f"cannot write checkpoint to {final}: {reason}; {resume_advice(final.parent)}"
    if keep > 0:
        try:
            prune_checkpoints(final.parent, keep, final)
        # the new checkpoint is safe; failing to delete an old one must not end the run
        except OSError as err:
            # rank 0
            print(f"note: SAVE_TOTAL_LIMIT: could not delete an old checkpoint: {err}", flush=True)
    return ""


def prune_checkpoints(output_dir: Path, keep: int, written: Path) -> list[Path]:
    """SAVE_TOTAL_LIMIT: delete the complete checkpoints older than `written` beyond the newest
    `keep` (`written` counts as one of them), oldest first.

    Incomplete folders are left for a person to look at, and newer ones (an earlier run that got
    further before this one resumed from an older checkpoint) are left too. Each is renamed to a
    hidden name before it is deleted, so a kill halfway through a deletion never leaves a damaged
    checkpoint-<step> that looks like one.

    Returns:
        The checkpoints deleted, in that order.
    """
    older = [p for p in checkpoint_dirs(output_dir)
             if checkpoint_step(p) < checkpoint_step(written)]
    complete = []
    for path in older:
        try:
            verify_checkpoint(path)
            complete.append(path)
        except CheckpointError:
            pass
    doomed = complete[max(keep - 1, 0):][::-1]  # oldest first
    for path in doomed:
        trash = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


# --- resuming -------------------------------------------------------------------------------------

def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """What differs between the checkpoint's run identity and this run's, one phrase each."""
    conflicts = []
    # A setting added after the checkpoint was written (QUANTIZE) had its default then.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key, value in current.items():
        old = saved.get(key, defaults.get(key))
        if old == value:
            continue
        if key == "world_size":
            conflicts.append(f"{value} process(es) here but {old} in the checkpoint (each rank's "
                             "share of the data and its dropout stream would differ)")
        elif key == "data":
            if saved.get("max_length") == current["max_length"] and (
                    saved.get("train_on_inputs") == current["train_on_inputs"]):
                conflicts.append("the training data differ (other records, tokenizer or prompt "
                                 "template)")
        else:
            show = (lambda v: ",".join(v)) if key == "target_modules" else repr
            conflicts.append(f"{key.upper()} is {show(value)} here but {show(old)} in the "
                             "checkpoint")
    return conflicts


def resolve_resume(cfg: TrainConfig, dist: DistEnv) -> tuple[Path, dict] | None:
    """RESUME_FROM as a checkpoint folder and its manifest, every file checked (hashed) once; None
    for a new run.

    "latest" is the newest complete checkpoint in OUTPUT_DIR; with none yet the run starts at step 0
    with a note (naming the folder, so a mistyped OUTPUT_DIR shows), so that a job that is simply
    started again until it finishes can always set it. Under DDP rank 0 picks it and tells the
    others, which check their own copy.

    Raises:
        ConfigError: the named checkpoint is damaged (naming the file).
    """
    output_dir = Path(cfg.output_dir)
    if not cfg.resume_from:
        return None
    if cfg.resume_from != "latest":
        return Path(cfg.resume_from), verify_resume_checkpoint(Path(cfg.resume_from))
    skipped: list[str] = []
    found = broadcast_from_master(newest_complete_checkpoint(output_dir, skipped) if dist.is_master
                                  else None, dist)
    for reason in skipped:
        note(f"RESUME_FROM=latest: skipping {reason}", dist)
    if found is None:
        note(f"RESUME_FROM=latest: no complete checkpoint in {output_dir} yet; starting at step 0",
             dist)
        return None
    folder, manifest = found
    return Path(folder), manifest if dist.is_master else verify_resume_checkpoint(Path(folder))


def resume_notes(manifest: dict, total_steps: int, precision: str) -> list[str]:
    """What a resumed run that may go on (config.RESUME_MAY_CHANGE_WITH_NOTE) should say about what
    changed."""
    notes = []
    if manifest["total_steps"] != total_steps:
        notes.append(f"the run now ends at step {total_steps} instead of {manifest['total_steps']} "
                     "(NUM_EPOCHS or MAX_STEPS changed): the learning-rate schedule is recomputed "
                     "for the new length, so the rest of the run differs from an uninterrupted one")
    if manifest["precision"] != precision:
        notes.append(f"precision is {precision} here but was {manifest['precision']}: the rest of "
                     "the run differs slightly from an uninterrupted one")
    return notes


def verify_resume_checkpoint(checkpoint: Path) -> dict:
    """RESUME_FROM=<folder>: the checkpoint's manifest, once every file is checked against it
    (hashed once).

    Raises:
        ConfigError: one line naming the damaged file.
    """
    try:
        return verify_checkpoint(checkpoint)
    except CheckpointError as err:
        raise ConfigError(f"RESUME_FROM={checkpoint}: {err}; resume from another checkpoint "
                          "(RESUME_FROM=latest picks the newest complete one)") from None


def check_resumable(checkpoint: Path, manifest: dict, identity: dict) -> None:
    """Refuse a (verified) checkpoint that this run would not continue.

    Raises:
        ConfigError: one line naming every setting that differs.
    """
    conflicts = resume_conflicts(manifest["identity"], identity)
    if conflicts:
        raise ConfigError(f"RESUME_FROM={checkpoint}: this run would not continue the checkpoint's "
                          f"run: {'; '.join(conflicts)}. Set them back, or start a new run in "
                          "another OUTPUT_DIR")
