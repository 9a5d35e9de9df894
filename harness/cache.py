"""The on-disk cache: model folders this project builds once and reuses (the tiny model,
GGUF conversions), under --cache-dir, else $SDPG_CACHE, else ~/.cache/sdpg.

Runs start side by side (a benchmark, a user comparing two algorithms) and get killed
mid-way, so every entry is filled by `filled_once`, whose contract is:

  - complete or absent: an entry is built in a temporary sibling folder and renamed
    into place (rename(2) is atomic on one filesystem), so its name never points at a
    half-written folder;
  - one builder: the build runs under an exclusive advisory lock (fcntl.flock) on
    `.<entry>.lock`; a process that finds the lock taken waits, then finds the
    winner's entry and returns it without building again;
  - repaired after a kill: the kernel drops a dead process's lock, and the next
    builder removes the temporary folders the dead one left before building.

flock is POSIX (Linux, macOS); the lock file stays behind, empty, by design.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from harness.errors import UsageError


def cache_root(cache_dir: str | None = None) -> Path:
    """--cache-dir, else $SDPG_CACHE, else ~/.cache/sdpg."""
    return Path(cache_dir or os.environ.get("SDPG_CACHE") or Path.home() / ".cache" / "sdpg")


def filled_once(entry: Path, build: Callable[[Path], None], what: str) -> Path:
    """The folder `entry`, built by `build(folder)` into a temporary folder on first use.

    A finished entry is returned at once, even from a read-only cache. `what` names the
    entry in the line printed once it is built and in errors (a cache that cannot be
    written, a full disk)."""
    if entry.is_dir():  # only a finished build is ever renamed to this name
        return entry
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        lock = (entry.parent / f".{entry.name}.lock").open("a")
    except OSError as e:
        raise cache_error(entry, what, e) from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by close, or by the kernel if we die
        if entry.is_dir():  # another process built it while we waited
            return entry
        for stale in entry.parent.glob(f".{entry.name}.tmp-*"):  # left by a killed builder
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
            try:
                (tmp / "entry").mkdir()  # the umask's permissions (mkdtemp's own are 0700)
                build(tmp / "entry")
                os.replace(tmp / "entry", entry)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors wrap ENOSPC
            raise cache_error(entry, what, e) from e
    print(f"built {what} into {entry} (once; later runs reuse it)", file=sys.stderr)
    return entry


def cache_error(entry: Path, what: str, e: Exception) -> UsageError:
    """One line for a cache that cannot be written: read-only, full, or not a folder."""
    in_the_way = "a file is in the way of a folder"
    reasons = {errno.ENOSPC: "the disk is full", errno.EEXIST: in_the_way, errno.ENOTDIR: in_the_way}
    full = "No space left" in str(e)  # safetensors and torch.save report ENOSPC in their message
    reason = (
        "the disk is full"
        if full
        else reasons.get(getattr(e, "errno", None), str(e)[:120] or type(e).__name__)
    )
    return UsageError(
        f"cannot write {what} into the cache {entry.parent}: {reason}. Free some space, or point "
        "--cache-dir (or $SDPG_CACHE) at a writable folder; nothing half-written is left there"
    )
