"""The GPU image's Python set resolves from wheels alone (the Dockerfile installs requirements/gpu.txt).

No GPU and no Docker here, so the image is not built; what broke it before is checked instead: pip
resolves every requirement for linux x86_64 / Python 3.12 (glibc up to 2.39, the base image's Ubuntu
24.04) with `--only-binary=:all:`, i.e. nothing would be compiled, and flash-attn (an sdist whose build
needs torch and nvcc) is not in the set. deepspeed is the one sdist, pure Python (its CUDA ops are JIT-built
on first use); it is checked to exist at its pin. Needs PyPI (CI has it); skipped with the reason otherwise.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import ROOT

pytestmark = pytest.mark.slow

GPU = ROOT / "requirements" / "gpu.txt"
PLATFORMS = [f"manylinux_2_{x}_x86_64" for x in range(39, 4, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]


def pip(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


def requirement_lines() -> list[str]:
    return [line.strip() for line in GPU.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_the_gpu_set_resolves_from_wheels_without_flash_attn(tmp_path):
    wheels = [r for r in requirement_lines() if not r.startswith("deepspeed")]
    assert not [r for r in requirement_lines() if r.lower().startswith(("flash-attn", "flash_attn"))]
    (tmp_path / "wheels.txt").write_text("\n".join(wheels) + "\n")
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    result = pip("install", "--dry-run", "--ignore-installed", "--only-binary=:all:", *platforms,
                 "--python-version", "3.12", "--target", str(tmp_path / "target"), "-r", str(tmp_path / "wheels.txt"))  # fmt: skip
    if result.returncode and ("NewConnectionError" in result.stderr or "Network is unreachable" in result.stderr):
        pytest.skip("PyPI is not reachable from here")
    assert result.returncode == 0, result.stderr[-3000:]
    planned = next(line for line in result.stdout.splitlines() if line.startswith("Would install"))
    packages = {item.rsplit("-", 1)[0].lower(): item.rsplit("-", 1)[1] for item in planned.split()[2:]}
    assert packages["torch"] == "2.13.0" and packages["vllm"] == "0.29.0"
    assert "flash-attn" not in packages and "flash_attn" not in packages  # nor pulled in by anything else

    deepspeed = next(r for r in requirement_lines() if r.startswith("deepspeed"))
    listed = pip("index", "versions", "deepspeed", timeout=120)
    assert listed.returncode == 0 and deepspeed.split("==")[1] in listed.stdout, listed.stderr[-2000:]
