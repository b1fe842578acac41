"""One writer per run directory: a second run is refused at once naming the holder; a dead holder's
lock is taken over; appends to a shared file from several processes never interleave."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from support import assert_one_line_error, clean_env, run_cli, tiny_recipe, train_steps

from safealign.core.errors import SafeAlignError
from safealign.core.locks import RunLock, locked_file


def test_a_second_run_is_refused_at_once_naming_the_holder(tmp_path, tokenizer_dir, scored_rows):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, scored_rows)
    run_dir = tmp_path / "runs" / "tiny"
    with RunLock(run_dir / ".lock"):
        started = time.time()
        result = run_cli("run", str(recipe), cwd=tmp_path)
        assert time.time() - started < 60
    assert_one_line_error(result, f"pid {os.getpid()}", os.uname().nodename, "in use by another run")
    assert not (run_dir / "align").exists() and not (run_dir / ".align.partial").exists()


@pytest.mark.slow
def test_a_run_alongside_a_running_one_leaves_it_untouched(tmp_path, tokenizer_dir, scored_rows):
    """The reported failure: the second run joined the first ('resuming'), doubled its metrics and
    crashed; with another --set it wiped the first run's partial work."""
    recipe = tiny_recipe(tmp_path, tokenizer_dir, scored_rows, align={"epochs": 12})  # long enough to overlap
    run_dir = tmp_path / "runs" / "tiny"
    first = subprocess.Popen([sys.executable, "-m", "safealign.cli", "run", str(recipe)], cwd=tmp_path,
                             env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not (run_dir / ".align.partial" / "fingerprint").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = run_cli("run", str(recipe), "--set", "align.learning_rate=1e-3", cwd=tmp_path)
    assert first.poll() is None, "the first run ended before the second started: lengthen it"
    assert_one_line_error(second, "in use by another run", f"pid {first.pid}")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    steps = train_steps(run_dir)
    assert [m["step"] for m in steps] == list(range(1, len(steps) + 1))


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    lock = tmp_path / "run" / ".lock"
    holder = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys\nfrom safealign.core.locks import RunLock\n"
         f"RunLock(__import__('pathlib').Path({str(lock)!r})).acquire()\nos.kill(os.getpid(), signal.SIGKILL)"],
        env=clean_env(),
    )  # fmt: skip
    assert holder.returncode == -signal.SIGKILL
    assert json.loads(lock.read_text())["pid"]  # the dead holder's record is still there
    with caplog.at_level(logging.WARNING, logger="safealign"), RunLock(lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "ended without releasing it; taking over" in caplog.text
    assert lock.read_text() == ""  # released cleanly: the next run has nothing to warn about


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SafeAlignError, match="cannot use it as a run directory"):
        RunLock(tmp_path / "file" / ".lock").acquire()


APPENDER = """
import sys
from pathlib import Path
from safealign.core.locks import locked_file
path, tag = Path(sys.argv[1]), sys.argv[2]
for i in range(300):
    with locked_file(path) as handle:
        handle.write(tag * 5000 + "\\n")
"""


def test_locked_appends_from_several_processes_never_interleave(tmp_path):
    path = tmp_path / "shared.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), tag], env=clean_env()) for tag in "abc"]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = path.read_text().splitlines()
    assert len(lines) == 900 and all(len(set(line)) == 1 and len(line) == 5000 for line in lines)
    with locked_file(path, "r") as handle:
        assert handle.read().count("\n") == 900


def test_a_run_dir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """Root can write anywhere here, so the refusal a user would meet is injected at mkdir."""

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(tmp_path), "mkdir", refuse)
    uid, gid = os.getuid(), os.getgid()
    with pytest.raises(SafeAlignError) as caught:
        RunLock(tmp_path / "runs" / "x" / ".lock").acquire()
    # The uid, and the usual cause in a pod: an NFS/EFS volume, where fsGroup is not applied.
    assert str(caught.value) == (
        f"run directory {tmp_path / 'runs' / 'x'} is not writable by uid {uid} (gid {gid}): Permission denied; "
        f"make it writable by uid {uid} (on Kubernetes, NFS/EFS volumes ignore fsGroup: chown the export to "
        f"{uid}:{gid}, docs/kubernetes.md step 2)"
    )


def test_a_model_cache_that_cannot_be_written_is_one_line(tmp_path, tokenizer_dir, monkeypatch):
    """A GGUF conversion or a random model goes to $SAFEALIGN_CACHE (/models in a pod): the refusal to
    write there (injected: root writes anywhere) is one line before any model is built."""
    from safealign.models.resolve import build_random
    from safealign.recipe import RandomModel

    monkeypatch.setenv("SAFEALIGN_CACHE", str(tmp_path / "models"))
    real_mkdir = type(tmp_path).mkdir

    def refuse(self, *args, **kwargs):
        if self.is_relative_to(tmp_path / "models"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "mkdir", refuse)
    with pytest.raises(SafeAlignError, match=rf"^model directory {tmp_path / 'models'}\S* is not writable by uid \d+"):
        build_random(RandomModel(tokenizer=str(tokenizer_dir), config={"hidden_size": 32}))


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    """Release truncates the lock file: through a symlink it would have emptied whatever it points at."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / ".lock").symlink_to(target)
    with pytest.raises(SafeAlignError, match=r"\.lock: is a symbolic link; a run's lock file is never followed: remove it"):
        RunLock(run / ".lock").acquire()
    assert target.read_text() == "keep me\n"


def test_a_filesystem_without_locks_warns_once_and_releases_cleanly(tmp_path, monkeypatch, caplog):
    """NFSv3 without lockd answers ENOLCK to lock *and* unlock: the documented warning, then no traceback."""
    import errno

    from safealign.core import locks

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    lock = RunLock(tmp_path / ".lock")
    with caplog.at_level("WARNING", logger="safealign"):
        lock.acquire()
        lock.release()
        with locks.locked_file(tmp_path / "cache.jsonl") as handle:
            handle.write("x\n")
    assert caplog.text.count("does not support locks") == 2
    assert (tmp_path / "cache.jsonl").read_text() == "x\n"  # appended, and nothing raised
