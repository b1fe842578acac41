"""This process's place in the (possibly one-process) distributed world; no heavy imports."""

from __future__ import annotations

import os
import socket


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
