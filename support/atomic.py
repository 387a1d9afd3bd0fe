"""The one way this repo writes a file or a folder: complete or not at all.

Content goes to a hidden temporary name beside its final place, is flushed to disk (fsync), then
renamed into place (a rename within a folder is atomic), and the folder is flushed so that the
rename itself survives a power cut. A crash at any moment leaves the old version or the new one,
never half of one; the temporary name is removed on an error, and a kill's leftover is a hidden
`.<name>.<pid>-<hex>.tmp` that the next write of a checkpoint clears. What is written gets the
permissions the user's umask gives a new file (0644 under the usual 022), whatever the library that
wrote it chose (safetensors writes 0600, which another user of a shared machine cannot read). A
write that fails names the file by its final name, and `describe_write_error` turns a full disk into
one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Force a file's data, or a folder's list of names, onto the disk (without it, a rename may
    reach the disk before the data it points at)."""
    if path.is_dir() and os.name != "posix":
        return  # Windows cannot open a folder to flush it
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A staging name (see `staging_path`): ".<name>.<pid>-<hex>.tmp".
STAGING_RE = re.compile(r"\.(.+)\.\d+-[0-9a-f]{8}\.tmp")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# free space below this, after a write failed, means the write hit a full disk
NEARLY_FULL_BYTES = 1 << 20


def staging_path(final: Path) -> Path:
    """A hidden name beside `final`, unique per process and call. (Not tempfile's: its files and
    folders are private, 0600/0700, and what they become should get the usual permissions.)"""
    return final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def replace_path(staging: Path, final: Path) -> None:
    """Rename `staging` onto `final`. A folder cannot be renamed onto a non-empty one, so an old
    folder is first renamed aside and deleted after: there is always one complete copy under one of
    the two names."""
    old = None
    if staging.is_dir() and final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_mode() -> int:
    """The permission bits a new file gets from the user's umask (0o644 under the usual umask
    022)."""
    try:  # Linux reports the umask without changing it; os.umask can only read it by setting it
        with open("/proc/self/status", encoding="ascii") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def give_umask_permissions(staging: Path) -> None:
    """The staged file, or every file in the staged folder, gets `file_mode()`."""
    mode = file_mode()
    for path in [*sorted(staging.rglob("*")), staging] if staging.is_dir() else [staging]:
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 != mode:
            os.chmod(path, mode)


def public_name(path: str | os.PathLike) -> Path:
    """`path` with every staging name in it turned back into the name it is written for."""
    return Path(*(STAGING_RE.sub(r"\1", part) for part in Path(path).parts))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` (an atomic_write staging path), raising an OSError that names the file
    (Python's write errors name none)."""
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as err:
        if err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise


def disk_is_full(err: Exception, folder: Path) -> bool:
    """Whether a library's error (not an OSError) means the disk is full: safetensors says "No space
    left on device (os error 28)"; torch's zip writer says only "[enforce fail at
    inline_container.cc] unexpected pos", so for it the disk is asked, while the partly written file
    still holds what space there was."""
    text = str(err)
    if "No space left on device" in text or "os error 28" in text:
        return True
    return "inline_container" in text and shutil.disk_usage(folder).free < NEARLY_FULL_BYTES


def describe_write_error(err: OSError) -> str:
    """One line for a failed write: which file (by its final name) and why; a full disk says how
    much is free."""
    path = public_name(err.filename) if err.filename else None
    reason = f"[Errno {err.errno}] {err.strerror}" if err.strerror else str(err)
    if err.errno not in DISK_FULL_ERRNOS:
        return f"cannot write {path}: {reason}" if path else reason
    free = ""
    folder = next((p for p in (path.parents if path else []) if p.is_dir()), None)
    if folder is not None:
        free = f"; {human_bytes(shutil.disk_usage(folder).free)} free on the disk of {folder}"
    return f"the disk is full: cannot write {path or 'a file'} ({reason}{free})"


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.2f} {unit}"
        count /= 1024


def _publish_unless_present(staging: Path, final: Path) -> None:
    # A plain rename refuses to replace a non-empty folder: the first process to publish wins, and a
    # reader of its folder never sees it deleted under it.
    try:
        os.replace(staging, final)
    except OSError:
        if not final.exists():
            raise


@contextlib.contextmanager
def atomic_write(final: str | os.PathLike, folder: bool = False,
                 keep_existing: bool = False) -> Iterator[Path]:
    """Write `final` through a staging path: `with atomic_write(path) as tmp: write tmp`.

    Args:
        final: the file or folder to write; its parent folder is created.
        folder: the staging path is a new, empty folder (else a file path, not yet created).
        keep_existing: a folder that another process published at `final` first (the same content)
            is kept and what was written is dropped.

    Raises:
        Whatever the block raises (an OSError naming a staged file names it by its final name, see
        `public_name`); the staging path is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(final)
    if folder:
        staging.mkdir()
    try:
        try:
            yield staging
        except OSError as err:
            if err.filename and str(err.filename).startswith(str(staging)):
                err.filename = str(final) + str(err.filename)[len(str(staging)):]
            elif err.filename is None and err.errno is not None and not folder:
                err.filename = str(final)
            raise
        except Exception as err:
            if disk_is_full(err, staging.parent):  # a library's own words for ENOSPC
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final)) from err
            raise
        give_umask_permissions(staging)
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
