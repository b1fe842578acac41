"""This process's place in the (possibly one-process) distributed world; heavy imports stay inside."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import TypeVar

T = TypeVar("T")


def gpu_available() -> bool:
    """True when CUDA can run (decides NCCL vs gloo, which patches apply, dtype and attention defaults)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def ensure_process_env() -> None:
    """A plain `safealign run` is a one-process world; torchrun and the deepspeed launcher set these."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


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
