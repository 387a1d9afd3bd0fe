"""`python tests/crash_worker.py`: train.py's main(), configured by the environment like train.py, except that the
process dies in the middle of writing its first checkpoint, as if killed there. Used by tests/test_faults.py.

    CRASH_BEFORE=manifest  dies after the adapter and trainer_state.pt are in the staging folder, before the manifest
    CRASH_BEFORE=rename    dies after the manifest is written and flushed, before the folder is renamed into place

os._exit skips every `finally` and `except`, as SIGKILL would: the staging folder stays behind, half done.
Not collected by pytest (the name does not start with test_).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from support import atomic, checkpoint  # noqa: E402

CRASH_EXIT_CODE = 137  # what a shell reports for SIGKILL


def die(*args, **kwargs) -> None:
    sys.stdout.flush()
    os._exit(CRASH_EXIT_CODE)


def die_before_renaming_a_checkpoint(staging, final) -> None:
    if final.name.startswith(checkpoint.CHECKPOINT_PREFIX):
        die()
    real_replace_path(staging, final)


real_replace_path = atomic.replace_path


if __name__ == "__main__":
    # write_checkpoint looks write_manifest up in checkpoint's namespace, and atomic_write replace_path in atomic's.
    point = os.environ["CRASH_BEFORE"]
    if point == "manifest":
        checkpoint.write_manifest = die
    elif point == "rename":
        atomic.replace_path = die_before_renaming_a_checkpoint
    else:
        sys.exit(f"CRASH_BEFORE must be manifest or rename, got {point!r}")
    sys.exit(train.main())
