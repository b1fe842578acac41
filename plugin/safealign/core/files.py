"""Files that survive crashes and full disks: atomic writes, append-only JSONL that tolerates a torn
last line, and one place that recognises "the disk is full" whichever library hit it."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from safealign.core.errors import SafeAlignError

log = logging.getLogger("safealign")


def write_text_atomically(path: Path, text: str) -> None:
    """Write to a sibling temporary file, then rename it over `path` (atomic on one filesystem)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # unique: writers may race
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; results are for everyone who can read the run
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a full disk must not also leave the half-written temporary behind
        raise


def read_appended_jsonl(path: Path, repair: bool = True) -> list[dict]:
    """The records of an append-only JSONL file (metrics, λ samples, the judge cache).

    A crash or a full disk in the middle of an append leaves a torn last line: it is dropped with a
    warning and, with `repair`, cut from the file so the next append starts on a line of its own. A
    bad line anywhere else is damage we did not cause: an error naming `path:line`. Callers that
    repair hold the file's lock (`locks.locked_file`) where other processes may be appending.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, good_end, offset = [], 0, 0
    for number, line in enumerate(lines, start=1):
        end = offset + len(line) + 1
        if line.strip():
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                if any(rest.strip() for rest in lines[number:]):
                    raise SafeAlignError(
                        f"{path}:{number}: not a JSON record (the file is damaged); delete the file to start it afresh"
                    ) from None
                log.warning("%s: dropped a torn last line (%d bytes; a crash or a full disk while it was written)",
                            path, len(line))  # fmt: skip
                if repair:
                    os.truncate(path, good_end)
                return records
            records.append(record)
        offset = end
        good_end = min(end, len(data))
    if repair and data and not data.endswith(b"\n"):
        with path.open("ab") as handle:  # a whole record whose newline was lost: the next append needs one
            handle.write(b"\n")
    return records


#: Free space below which a failed write is blamed on the disk, whatever the exception says.
LOW_SPACE = 1 << 20


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds `path` (or would: its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """Whether `exc` is a write that found no space. Python says ENOSPC; PyTorch's serializer says
    "file write failed", "unexpected pos 128 vs 0" or "basic_ios::clear: iostream error"; safetensors
    says "StorageFull". Rather than chase every wording, a failure while the filesystem of `where` is
    (all but) full counts as a full disk too; any other failure keeps its traceback."""
    if where is not None and free_bytes(where) < LOW_SPACE:
        return True
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "StorageFull" in text or "file write failed" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(exc: BaseException, where: Path, needed: int | None = None) -> SafeAlignError:
    """The one line a full disk deserves: what was being written, the free space left, what is needed."""
    path = Path(getattr(exc, "filename", None) or where)
    free = free_bytes(path)
    need = f"; about {_size(needed)} more is needed (the largest checkpoint or model written so far)" if needed else ""
    return SafeAlignError(
        f"no space left on the device writing {path} ({_size(free)} free{need}); free space and run the same "
        "command again: it resumes where it stopped"
    )


def tree_size(path: Path) -> int:
    """Bytes under `path` (a file or a directory tree; links not followed)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def unusable_dir_error(path: Path, exc: OSError) -> SafeAlignError:
    """One line for a directory that cannot be made or used (a file in the way, a read-only mount, ...)."""
    problem = "not a directory" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
    return SafeAlignError(f"{path}: cannot use it as a run directory ({problem}); give --run-dir a writable directory")


def unwritable_error(what: str, path: Path, exc: OSError) -> SafeAlignError:
    """The one line for a directory this process may not write: which uid and gid it runs as, and the
    usual cause on Kubernetes, where pods run as uid 1000 and NFS/EFS volumes ignore `fsGroup`."""
    uid, gid = os.getuid(), os.getgid()
    return SafeAlignError(
        f"{what} {path} is not writable by uid {uid} (gid {gid}): {exc.strerror or exc}; make it writable by "
        f"uid {uid} (on Kubernetes, NFS/EFS volumes ignore fsGroup: chown the export to {uid}:{gid}, "
        "docs/kubernetes.md step 2)"
    )


def require_writable_dir(what: str, path: Path) -> None:
    """Create `path` if needed and write a file in it, so a read-only volume stops a run at its start
    with `unwritable_error`, not hours later with a traceback (a permission check such as `os.access`
    is not enough: NFS decides on the server)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except PermissionError as exc:
        raise unwritable_error(what, path, exc) from None
