"""The GPU image's build steps that stopped a first `docker build` or a first GPU run (issue 24), checked
without Docker (none runs here): the Dockerfile is read, and its user step is run on a copy of the base
image's /etc. The optimizer step (no JIT-built DeepSpeed op) is checked on the rendered GPU config in
tests/openrlhf/test_openrlhf_patches.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from support import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
ENSURE_USER = ROOT / "docker" / "ensure-user.sh"

#: What nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 (Ubuntu 24.04) has for uid 1000: user and group "ubuntu".
UBUNTU_2404_ETC = {
    "passwd": "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    "ubuntu:x:1000:1000:Ubuntu:/home/ubuntu:/bin/bash\n",
    "group": "root:x:0:\nnogroup:x:65534:\nubuntu:x:1000:\n",
    "shadow": "root:*:20000:0:99999:7:::\nnobody:*:20000:0:99999:7:::\nubuntu:!:20000:0:99999:7:::\n",
    "gshadow": "root:*::\nnogroup:*::\nubuntu:!::\n",
}


def run_instructions() -> list[str]:
    """The Dockerfile's RUN instructions, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line[4:] for line in joined.splitlines() if line.startswith("RUN ")]


def apt_packages() -> set[str]:
    install = next(run for run in run_instructions() if "apt-get install" in run)
    words = install.split("apt-get install", 1)[1].split("&&")[0].split()
    return {w for w in words if not w.startswith("-")}


def base_root(tmp_path, etc: dict[str, str], homes: tuple[str, ...] = ()):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name, text in etc.items():
        (root / "etc" / name).write_text(text)
    for home in homes:
        (root / "home" / home).mkdir(parents=True)
    (root / "home").mkdir(exist_ok=True)
    return root


def uid_1000(root) -> list[str]:
    return [line for line in (root / "etc/passwd").read_text().splitlines() if line.split(":")[2] == "1000"]


needs_shadow_tools = pytest.mark.skipif(
    shutil.which("useradd") is None or os.geteuid() != 0, reason="needs root and shadow's useradd/usermod (Debian's passwd)"
)


@needs_shadow_tools
def test_the_user_step_renames_the_bases_uid_1000_instead_of_failing(tmp_path):
    root = base_root(tmp_path, UBUNTU_2404_ETC, homes=("ubuntu",))
    # What the old step did on this base, to show the copy of /etc is faithful: the build stopped here.
    old = subprocess.run(["useradd", "--prefix", str(root), "--uid", "1000", "--create-home", "safealign"],
                         capture_output=True, text=True)  # fmt: skip
    assert old.returncode != 0 and "UID 1000 is not unique" in old.stderr
    result = subprocess.run(["sh", str(ENSURE_USER)], env={**os.environ, "ROOT": str(root)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert uid_1000(root) == ["safealign:x:1000:1000:Ubuntu:/home/safealign:/bin/bash"]
    assert "safealign:x:1000:" in (root / "etc/group").read_text().splitlines()
    assert (root / "home/safealign").is_dir() and not (root / "home/ubuntu").exists()
    # Idempotent: a rebuild on a base that already has safealign changes nothing.
    again = subprocess.run(["sh", str(ENSURE_USER)], env={**os.environ, "ROOT": str(root)}, capture_output=True, text=True)
    assert again.returncode == 0 and uid_1000(root) == ["safealign:x:1000:1000:Ubuntu:/home/safealign:/bin/bash"]


@needs_shadow_tools
def test_the_user_step_creates_the_user_on_a_base_without_uid_1000(tmp_path):
    etc = {name: "\n".join(line for line in text.splitlines() if "ubuntu" not in line) + "\n"
           for name, text in UBUNTU_2404_ETC.items()}  # fmt: skip
    root = base_root(tmp_path, etc)
    result = subprocess.run(["sh", str(ENSURE_USER)], env={**os.environ, "ROOT": str(root)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert uid_1000(root) == ["safealign:x:1000:1000::/home/safealign:/bin/bash"]
    assert (root / "home/safealign").is_dir()


def test_the_dockerfile_runs_the_user_step_before_the_long_pip_layer_and_runs_as_uid_1000():
    runs = run_instructions()
    user_step = next(i for i, run in enumerate(runs) if "ensure-user.sh" in run)
    pip_step = next(i for i, run in enumerate(runs) if "requirements/gpu.txt" in run)
    assert user_step < pip_step  # a failing user step costs seconds, not the pip layer
    assert not any("useradd" in run for run in runs)  # only through the script, which handles uid 1000
    assert "COPY docker/ensure-user.sh" in DOCKERFILE
    assert re.search(r"^USER 1000$", DOCKERFILE, re.M)


def test_the_image_has_what_triton_compiles_its_launcher_with():
    """vLLM's engine start: Triton compiles a C launcher with gcc against the interpreter's Python.h."""
    python = re.search(r"(python3\.\d+) -m venv", DOCKERFILE).group(1)
    assert {python, f"{python}-venv", f"{python}-dev", "gcc", "libc6-dev"} <= apt_packages()
    # The image's last step proves it: the same compile, then every stage's import, then the user.
    assert "check-image.sh" in run_instructions()[-1]
    check = (ROOT / "docker" / "check-image.sh").read_text()
    assert 'gcc "$dir/probe.c"' in check and "-shared -fPIC" in check and 'sysconfig.get_paths()["include"]' in check

