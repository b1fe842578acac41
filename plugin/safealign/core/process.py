"""This process's place in the (possibly one-process) distributed world; heavy imports stay inside."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def gpu_available() -> bool:
    """True when CUDA can run (decides NCCL vs gloo, which patches apply, dtype and attention defaults)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


#: The oldest NVIDIA driver that runs the GPU image's PyTorch (CUDA 13 wheels; docs/install.md).
DRIVER_FLOOR = 580


def nvidia_driver_version() -> str | None:
    """The node's NVIDIA driver version as NVML reports it ("570.86.15"), or None where NVML cannot be
    asked (no driver, no pynvml). A CUDA build of torch on an older driver sees no GPU at all, so this is
    how a pod says *why*."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - any NVML failure means "cannot tell"
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def no_gpu_reason() -> str:
    """Why a pod that asked for GPUs sees none, as far as can be told from inside it."""
    driver = nvidia_driver_version()
    major = driver.split(".")[0] if driver else ""
    if major.isdigit() and int(major) < DRIVER_FLOOR:
        return (
            f"the node's NVIDIA driver is {driver}, older than the {DRIVER_FLOOR} this image's CUDA 13 PyTorch "
            f"needs: upgrade it (GPU Operator: driver.version) or schedule on nodes with driver >= {DRIVER_FLOOR}"
        )
    found = f"driver {driver} found" if driver else "no NVIDIA driver answers"
    return (
        f"{found}: check the node's NVIDIA driver (>= {DRIVER_FLOOR}) and device plugin, the pod's nvidia.com/gpu "
        "request, and that the image's PyTorch is a CUDA build"
    )


def release_memory() -> None:
    """Free what finished work held: unreachable objects, then PyTorch's cached GPU blocks (back to the
    driver, so the next model or engine — possibly another process's — can have them)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


#: The port `ensure_process_env` chose, so a launcher's (torchrun sets its own MASTER_PORT, even in a
#: process that inherited ours) is told apart and never changed.
_OWN_PORT = "SAFEALIGN_OWN_MASTER_PORT"


def ensure_process_env() -> None:
    """A plain `safealign run` is a one-process world; torchrun and the deepspeed launcher set these."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    port = _free_port()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    os.environ[_OWN_PORT] = port


def repick_own_port() -> bool:
    """Another free port for a one-process world whose port was taken between `ensure_process_env`
    choosing it and the process group listening on it (another process can bind it in between: seen on a
    busy machine as EADDRINUSE). False under a launcher: its port is not ours to change."""
    if os.environ.get("MASTER_PORT") != os.environ.get(_OWN_PORT):
        return False
    os.environ["MASTER_PORT"] = os.environ[_OWN_PORT] = _free_port()
    return True


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def is_rank_0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def barrier() -> None:
    """Wait for every rank; a no-op without a process group (one-process runs, before training starts)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def init_process_group(timeout: timedelta = timedelta(minutes=60)) -> None:
    """Under a launcher (WORLD_SIZE > 1), join the process group now: before any stage decides what to
    skip, resume or wipe, so `barrier()` and `agree()` hold from the first line (DeepSpeed later finds
    the group up and uses it). gloo on CPUs; NCCL on GPUs, with this rank's device set first."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if gpu_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if gpu_available() else "gloo", timeout=timeout)


def agree(value: T) -> T:
    """Rank 0's `value` on every rank: a decision about shared files ("is this stage done?", "is this
    model already trained?") made once, so no rank can act on a file rank 0 is about to replace."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def leave_process_group() -> None:
    """At the end of a run under a launcher: wait for every rank, then tear the group down, so no rank's
    communication threads see a peer vanish mid-exit (gloo aborts the process when they do)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def source_commit() -> str | None:
    """The git commit the running package was imported from (`+changes` when its tree differs), or None
    for an installed wheel: what a report cites so a number can be traced to code."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if dirty else "") if commit else None
