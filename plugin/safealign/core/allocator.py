"""A caching memory allocator for CPU runs: `safealign run`/`sweep` re-execute themselves with tcmalloc
preloaded when it is installed.

Why: glibc's malloc hands every block above its mmap threshold (at most 32 MiB) back to the OS when it
is freed, so each micro-batch's logits (~300 MB for 8 sequences × 192 tokens × 49k vocabulary in fp32)
and its larger activations are page-faulted back in, zeroed, on the next micro-batch. tcmalloc keeps
them. `benchmarks/step_floor.py` measured a SmolLM2 Safe-MM-DPO step 1.6× faster with it on this CPU
(docs/benchmarks.md). PyTorch's own CPU launcher (`python -m torch.backends.xeon.run_cpu
--enable-tcmalloc`) does the same through `LD_PRELOAD`, which the dynamic loader reads only at process
start: hence the re-exec, which keeps the process id (torchrun's agent and Kubernetes see one process).

`SAFEALIGN_ALLOCATOR`: `auto` (default: tcmalloc, else jemalloc, when installed and no NVIDIA GPU is
present: on a GPU node the host allocator is not what limits a step), `tcmalloc` or `jemalloc` (that one,
or a one-line error when it is missing), `system` (glibc, nothing preloaded).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from safealign.core.errors import SafeAlignError

log = logging.getLogger("safealign")

#: Allocator -> shared-library file names, best first (Debian: libtcmalloc-minimal4, libjemalloc2).
LIBRARIES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2",),
}
SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
SETTINGS = ("auto", *LIBRARIES, "system")
PACKAGES = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}


def find_library(allocator: str) -> str | None:
    """The first installed shared library of `allocator`, or None."""
    for name in LIBRARIES[allocator]:
        for directory in SEARCH_DIRS:
            path = Path(directory) / name
            if path.is_file():
                return str(path)
    return None


def preloaded(preload: str) -> str | None:
    """Which of our allocators `LD_PRELOAD` already carries, if any."""
    return next((name for name in LIBRARIES if name in preload), None)


def choose(setting: str, preload: str, has_gpu: bool, find: Callable[[str], str | None] = find_library) -> str | None:
    """The library to preload for `SAFEALIGN_ALLOCATOR=setting`, or None to run as is."""
    if setting not in SETTINGS:
        raise SafeAlignError(f"SAFEALIGN_ALLOCATOR={setting!r}: choose one of {', '.join(SETTINGS)}")
    if setting == "system" or preloaded(preload):
        return None
    if setting == "auto":
        return None if has_gpu else next(filter(None, map(find, LIBRARIES)), None)
    library = find(setting)
    if library is None:
        raise SafeAlignError(
            f"SAFEALIGN_ALLOCATOR={setting}: no {' or '.join(LIBRARIES[setting])} in {', '.join(SEARCH_DIRS)}; "
            f"install it (Debian/Ubuntu: apt-get install {PACKAGES[setting]}) or set SAFEALIGN_ALLOCATOR=system"
        )
    return library


def use_caching_allocator() -> None:
    """Re-execute this process with the chosen allocator preloaded (returns only when there is nothing to
    do); in the re-executed process, log which allocator runs."""
    preload = os.environ.get("LD_PRELOAD", "")
    has_gpu = Path("/dev/nvidiactl").exists()
    library = choose(os.environ.get("SAFEALIGN_ALLOCATOR", "auto"), preload, has_gpu)
    if library is None:
        if preloaded(preload):
            log.info("memory allocator: %s (LD_PRELOAD; SAFEALIGN_ALLOCATOR=system for glibc's)", preloaded(preload))
        return
    env = {**os.environ, "LD_PRELOAD": f"{library} {preload}".strip()}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
