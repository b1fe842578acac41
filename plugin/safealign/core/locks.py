"""One writer at a time: an exclusive lock per run directory, and short locks around shared appends.

Both are `flock(2)` locks on an open file. The kernel drops them when the holder's process dies
(SIGKILL, OOM, a node lost), so a stale lock is never left to clean up: the next run takes it over and
says whose it was. On a Kubernetes volume shared by pods (NFSv4 and CephFS ReadWriteMany volumes)
Linux implements `flock` as a lock held by the file server, so pods on different nodes exclude each
other too; a node that dies loses its locks when its lease with the server expires (NFSv4: 90 s by
default). A filesystem without locks (`ENOLCK`, e.g. NFSv3 without lockd) gets a warning and no lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from safealign.core.errors import SafeAlignError
from safealign.core.files import unusable_dir_error, unwritable_error

log = logging.getLogger("safealign")

#: errnos meaning "this filesystem cannot lock", as opposed to "somebody holds the lock".
NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


def _flock(handle: IO, operation: int, path: Path) -> bool:
    """flock, or False (with a warning) where the filesystem has no locks."""
    try:
        fcntl.flock(handle.fileno(), operation)
    except OSError as exc:
        if exc.errno not in NO_LOCKING:
            raise
        log.warning("%s: the filesystem does not support locks (%s); nothing stops a second writer", path,
                    os.strerror(exc.errno))  # fmt: skip
        return False
    return True


@contextmanager
def locked_file(path: Path, mode: str = "a+") -> Iterator[IO]:
    """`path` opened and held under an exclusive lock (waiting for it): for files that several processes
    append to, e.g. the judge cache a sweep's trials share. Readers take it too, so what they repair
    (a torn last line) is never a line another process is still writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open(mode, encoding="utf-8") as handle:
        locked = _flock(handle, fcntl.LOCK_EX, path)
        try:
            yield handle
        finally:
            if locked:  # where the filesystem cannot lock, it cannot unlock either (ENOLCK again)
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class RunLock:
    """An exclusive, non-waiting lock on a run directory, held for a command's life.

    The lock file holds its holder (pid, host, start time, command) so a refused run can say who is
    in the way; a clean release empties it, so a holder found in a lock that could be taken is one
    that died: that is said, and the lock is taken over.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO | None = None
        self._locked = False

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a lock file replaced by a symlink would have its target truncated on release
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            handle = os.fdopen(fd, "a+", encoding="utf-8")
        except PermissionError as exc:
            raise unwritable_error("run directory", self.path.parent, exc) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SafeAlignError(
                    f"{self.path}: is a symbolic link; a run's lock file is never followed: remove it"
                ) from None
            raise unusable_dir_error(self.path.parent, exc) from None
        try:
            if not _flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB, self.path):
                self._handle = handle
                return
            self._locked = True
        except BlockingIOError:
            holder = self._holder(handle)
            handle.close()
            raise SafeAlignError(
                f"{self.path.parent} is in use by another run ({holder}); wait for it to finish or stop it"
            ) from None
        previous = self._holder(handle)
        if previous != "holder unknown":
            log.warning("%s: the last run here (%s) ended without releasing it; taking over", self.path, previous)
        handle.seek(0)
        handle.truncate()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "command": " ".join(sys.argv)}  # fmt: skip
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is None:
            return
        self._handle.seek(0)
        self._handle.truncate()
        if self._locked:  # a filesystem without locks refuses the unlock too (ENOLCK)
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        self._handle.close()
        self._handle, self._locked = None, False

    @staticmethod
    def _holder(handle: IO) -> str:
        handle.seek(0)
        try:
            h = json.loads(handle.read() or "null")
            return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
        except (ValueError, TypeError, KeyError):
            return "holder unknown"

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
