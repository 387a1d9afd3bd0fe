"""The one way this repo writes a file or a folder: complete or not at all.

Content goes to a hidden temporary name beside its final place, is flushed to disk (fsync), then renamed into place
(a rename within a folder is atomic), and the folder is flushed so that the rename itself survives a power cut. A
crash at any moment leaves the old version or the new one, never half of one; the temporary name is removed on an
error, and a kill's leftover is a hidden `.<name>.<pid>-<hex>.tmp` that the next write of a checkpoint clears.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Force a file's data, or a folder's list of names, onto the disk (without it, a rename may reach the disk
    before the data it points at)."""
    if path.is_dir() and os.name != "posix":
        return  # Windows cannot open a folder to flush it
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_path(final: Path) -> Path:
    """A hidden name beside `final`, unique per process and call. (Not tempfile's: its files and folders are
    private, 0600/0700, and what they become should get the usual permissions.)"""
    return final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def replace_path(staging: Path, final: Path) -> None:
    """Rename `staging` onto `final`. A folder cannot be renamed onto a non-empty one, so an old folder is first
    renamed aside and deleted after: there is always one complete copy under one of the two names."""
    old = None
    if staging.is_dir() and final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _publish_unless_present(staging: Path, final: Path) -> None:
    # A plain rename refuses to replace a non-empty folder: the first process to publish wins, and a reader of
    # its folder never sees it deleted under it.
    try:
        os.replace(staging, final)
    except OSError:
        if not final.exists():
            raise


@contextlib.contextmanager
def atomic_write(final: str | os.PathLike, folder: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """Write `final` through a staging path: `with atomic_write(path) as tmp: write tmp`.

    Args:
        final: the file or folder to write; its parent folder is created.
        folder: the staging path is a new, empty folder (else a file path, not yet created).
        keep_existing: a folder that another process published at `final` first (the same content) is kept and
            what was written is dropped.

    Raises:
        Whatever the block raises; the staging path is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(final)
    if folder:
        staging.mkdir()
    try:
        yield staging
        for path in sorted(staging.rglob("*")) if folder else []:
            if path.is_file():
                fsync_path(path)
        fsync_path(staging)
        if keep_existing:
            _publish_unless_present(staging, final)
        else:
            replace_path(staging, final)
        fsync_path(final.parent)
    finally:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """A text file (UTF-8), complete or not at all."""
    with atomic_write(path) as staging:
        staging.write_text(text, encoding="utf-8")
