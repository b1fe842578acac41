"""The CLI's caching allocator: which library it preloads, and that the re-executed process really runs on it."""

from __future__ import annotations

import pytest
from support import assert_one_line_error, run_cli

from safealign.core.allocator import choose, find_library
from safealign.core.errors import SafeAlignError

INSTALLED = {"tcmalloc": "/lib/libtcmalloc_minimal.so.4", "jemalloc": "/lib/libjemalloc.so.2"}


def test_auto_prefers_tcmalloc_then_jemalloc_and_stays_out_of_gpu_nodes():
    assert choose("auto", "", has_gpu=False, find=INSTALLED.get) == INSTALLED["tcmalloc"]
    assert choose("auto", "", has_gpu=False, find={"jemalloc": INSTALLED["jemalloc"]}.get) == INSTALLED["jemalloc"]
    assert choose("auto", "", has_gpu=False, find={}.get) is None  # nothing installed: glibc, no error
    assert choose("auto", "", has_gpu=True, find=INSTALLED.get) is None


def test_an_explicit_choice_is_honoured_or_refused_in_one_line():
    assert choose("jemalloc", "", has_gpu=True, find=INSTALLED.get) == INSTALLED["jemalloc"]
    assert choose("system", "", has_gpu=False, find=INSTALLED.get) is None
    with pytest.raises(SafeAlignError, match=r"apt-get install libtcmalloc-minimal4\) or set SAFEALIGN_ALLOCATOR=system"):
        choose("tcmalloc", "", has_gpu=False, find={}.get)
    with pytest.raises(SafeAlignError, match="choose one of auto, tcmalloc, jemalloc, system"):
        choose("mimalloc", "", has_gpu=False, find=INSTALLED.get)


def test_a_process_already_on_a_caching_allocator_is_not_re_executed():
    """The re-executed process sees its own LD_PRELOAD: no second exec, no loop."""
    assert choose("auto", "/lib/libtcmalloc_minimal.so.4", has_gpu=False, find=INSTALLED.get) is None
    assert choose("jemalloc", "/x/libjemalloc.so.2 /y/other.so", has_gpu=False, find=INSTALLED.get) is None


@pytest.mark.skipif(find_library("tcmalloc") is None, reason="libtcmalloc-minimal4 not installed on this machine")
def test_safealign_run_re_executes_itself_on_tcmalloc(tmp_path):
    """A real re-exec: the process that reads the recipe runs with tcmalloc mapped (it says so), then
    fails on the missing recipe as usual; with SAFEALIGN_ALLOCATOR=system nothing is preloaded."""
    result = run_cli("run", "missing.yaml", cwd=tmp_path, timeout=120, extra_env={"SAFEALIGN_ALLOCATOR": "tcmalloc"})
    assert "memory allocator: tcmalloc" in result.stderr
    assert_one_line_error(result, "missing.yaml")
    plain = run_cli("run", "missing.yaml", cwd=tmp_path, timeout=120, extra_env={"SAFEALIGN_ALLOCATOR": "system"})
    assert "memory allocator" not in plain.stderr
    assert_one_line_error(plain, "missing.yaml")
