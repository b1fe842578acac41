"""Files that survive crashes and full disks: torn append-only lines, ENOSPC as one line, resume after."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import subprocess
import sys
import textwrap

import pytest
from support import clean_env, tiny_recipe

from safealign.core.errors import SafeAlignError
from safealign.core.files import disk_full, read_appended_jsonl
from safealign.domain.metrics import MetricsLog
from safealign.eval.judges import ChatClient


def test_a_torn_last_line_is_dropped_with_a_warning_and_cut_from_the_file(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="safealign"):
        assert read_appended_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert "torn last line" in caplog.text
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_whole_last_record_without_its_newline_gets_one(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}')
    assert read_appended_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert path.read_text().endswith('{"a": 2}\n')


def test_damage_before_the_last_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\xff\xfe garbage\n{"step": 3}\n')
    with pytest.raises(SafeAlignError, match=r"metrics.jsonl:2: not a JSON record"):
        read_appended_jsonl(path)


def test_resume_over_a_torn_metrics_line(tmp_path):
    """The reported crash: `MetricsLog.truncate_after` on a half-written line."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    log = MetricsLog(path)
    log.truncate_after(2)
    log.write({"step": 3, "loss": 0.5})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1}, {"step": 2}, {"step": 3, "loss": 0.5},
    ]  # fmt: skip


def test_a_torn_judge_cache_is_repaired_and_appended_to_cleanly(tmp_path, judge_api):
    url, _ = judge_api
    cache = tmp_path / "cache" / "judge" / "llm.jsonl"
    first = ChatClient(url, "m", cache_path=cache)
    first.complete([[{"role": "user", "content": "a"}]])
    with cache.open("a") as handle:
        handle.write('{"key": "torn", "cont')
    second = ChatClient(url, "m", cache_path=cache)
    assert second.complete([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]])
    assert second.calls == 1  # "a" came from the cache
    assert [sorted(json.loads(line)) for line in cache.read_text().splitlines()] == [["content", "key"]] * 2


def test_disk_full_is_recognised_however_a_library_reports_it():
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("saving the checkpoint failed") from inner
    except RuntimeError as outer:
        assert disk_full(outer)
    assert disk_full(RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write failed"))
    assert disk_full(Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'))
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))


FULL_DISK_RUN = """
set -u
mount -t tmpfs -o size=48m tmpfs "$DISK" || exit 97
run="$DISK/run"
"$PY" -m safealign.cli run "$RECIPE" --run-dir "$run" > "$OUT/first.log" 2>&1 &
pid=$!
until [ "$(cat "$run/.align.partial/metrics.jsonl" 2>/dev/null | wc -l)" -ge 3 ]; do
  kill -0 $pid 2>/dev/null || break
  sleep 0.02
done
dd if=/dev/zero of="$DISK/filler" bs=64k 2>/dev/null   # the disk fills mid-run
wait $pid; echo $? > "$OUT/first.code"
rm "$DISK/filler"                                      # the user frees space...
"$PY" -m safealign.cli run "$RECIPE" --run-dir "$run" > "$OUT/second.log" 2>&1   # ...and reruns the same command
echo $? > "$OUT/second.code"
cp -r "$run" "$OUT/run"
"""


@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_line_and_the_same_command_resumes(tmp_path, tokenizer_dir, scored_rows):
    """A real full disk: a 48 MiB tmpfs in a private mount namespace, filled while align trains."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a private tmpfs")
    recipe = tiny_recipe(tmp_path, tokenizer_dir, scored_rows, align={"epochs": 6, "checkpoint_steps": 2})
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    env = {**clean_env(), "DISK": str(disk), "OUT": str(out), "PY": sys.executable, "RECIPE": str(recipe)}
    done = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", textwrap.dedent(FULL_DISK_RUN)],
                          env=env, cwd=tmp_path, timeout=900)  # fmt: skip
    if done.returncode == 97:
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    first = (out / "first.log").read_text()
    assert (out / "first.code").read_text().strip() == "2", first
    errors = [line for line in first.splitlines() if line.startswith("safealign: error:")]
    assert len(errors) == 1 and "Traceback" not in first, first
    assert "no space left on the device writing" in errors[0] and "free" in errors[0] and str(disk) in errors[0]
    second = (out / "second.log").read_text()
    assert (out / "second.code").read_text().strip() == "0", second
    assert "resuming the unfinished run" in second
    steps = [r for r in read_appended_jsonl(out / "run" / "align" / "metrics.jsonl", repair=False) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 25))
