"""The few, named patches that let OpenRLHF 0.11.2 run where its CUDA-toolchain assumptions do not hold.

OpenRLHF is written for a CUDA machine with a compiler and flash-attn installed. Two of its assumptions
break on *every* machine our images and venvs produce, GPU nodes included: it imports `flash_attn` at
module level (no flash-attn wheel exists for torch 2.13 / CUDA 13, so our GPU image has none), and it
asks DeepSpeed for an AdamW that DeepSpeed JIT-compiles with nvcc/g++ (the CUDA *runtime* image has
neither). Three more hold only without a GPU (DeepSpeed's CPU accelerator, CUDA device calls, a
shared-memory op built with g++). Each gap is one function below, named for what it fixes, idempotent,
and covered by a test (tests/openrlhf/test_openrlhf_patches.py). Nothing in site-packages is edited: at run time
a patch replaces attributes of OpenRLHF or DeepSpeed modules (or installs the stand-in `flash_attn`
modules), and none replaces anything in `torch` itself.

`apply_patches()` applies what this machine needs (docs/cpu.md has the table): on a GPU node with the
real flash-attn only the optimizer choice. `enable_fp32()` is separate because full precision is a user
choice, not a workaround (it is also what a GPU user asks for when debugging numerics).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types
from functools import wraps

import torch

from safealign.core.process import gpu_available

#: Names of the patches applied by this process, in order (for logs and tests).
APPLIED: list[str] = []


def _mark(name: str) -> bool:
    """Record a patch; False if it was already applied (patches are idempotent)."""
    if name in APPLIED:
        return False
    APPLIED.append(name)
    return True


# --- 1. flash_attn.bert_padding stub ---------------------------------------------------------------


def _index_first_axis(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of `tensor` (flattened over its first two axes upstream) at `indices`."""
    return tensor.reshape(-1, *tensor.shape[1:])[indices]


def _unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask=None):
    """Pure-torch twin of flash_attn.bert_padding.unpad_input (same five return values)."""
    all_masks = attention_mask + unused_mask if unused_mask is not None else attention_mask
    seqlens_in_batch = all_masks.sum(dim=-1, dtype=torch.int32)
    used_seqlens_in_batch = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max().item())
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens_in_batch, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return flat[indices], indices, cu_seqlens, max_seqlen_in_batch, used_seqlens_in_batch


def _pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Pure-torch twin of flash_attn.bert_padding.pad_input."""
    output = torch.zeros(
        batch * seqlen, *hidden_states.shape[1:], device=hidden_states.device, dtype=hidden_states.dtype
    )
    output[indices] = hidden_states
    return output.reshape(batch, seqlen, *hidden_states.shape[1:])


def _all_gather(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """flash_attn.utils.distributed.all_gather: concatenate every rank's tensor along dim 0."""
    world = torch.distributed.get_world_size(group)
    out = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(out, tensor.contiguous(), group=group)
    return torch.cat(out, dim=0)


def stub_flash_attn_padding() -> None:
    """Patch 1: `openrlhf.models.ring_attn_utils` imports `flash_attn.bert_padding` at module level.

    flash-attn is a CUDA extension with no wheel for our torch/CUDA pair, so neither the CPU venv nor the
    GPU image has it, and without this every stage dies on its first OpenRLHF import — on a GPU node too.
    Only the padding helpers are needed on the non-packed path, so provide pure-torch versions under the
    same module names. The stand-in carries a ModuleSpec but no distribution metadata, so transformers'
    own check (`is_flash_attn_2_available`, which `settings.resolve_attention` asks) still reports
    FlashAttention as unavailable and it is never selected. Skipped when the real flash_attn is importable.
    """
    if "flash_attn" not in sys.modules and importlib.util.find_spec("flash_attn") is not None:
        return
    if not _mark("stub_flash_attn_padding"):
        return
    from einops import rearrange

    def module(name: str, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
        mod.__path__ = []
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod

    root = module("flash_attn", __version__="0.0.0+safealign.cpu.stub")
    root.bert_padding = module(
        "flash_attn.bert_padding",
        index_first_axis=_index_first_axis,
        pad_input=_pad_input,
        unpad_input=_unpad_input,
        rearrange=rearrange,
    )
    root.utils = module("flash_attn.utils")
    root.utils.distributed = module("flash_attn.utils.distributed", all_gather=_all_gather)


# --- 2. CUDA device calls -> CPU, inside OpenRLHF's strategy only --------------------------------------


class _CpuCuda:
    """`torch.cuda` as OpenRLHF's strategy modules use it, on a machine without CUDA: `set_device` and
    `synchronize` do nothing, `current_device()` names the CPU (the strategy only moves tensors to it);
    every other attribute is torch.cuda's own."""

    @staticmethod
    def set_device(*args, **kwargs) -> None:
        return None

    @staticmethod
    def synchronize(*args, **kwargs) -> None:
        return None

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """`torch` with `cuda` replaced by `_CpuCuda`, for the module globals of OpenRLHF's strategy code."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()

    def __getattr__(self, name: str):
        return getattr(torch, name)


#: OpenRLHF modules whose CUDA calls the CPU run must map: the strategy (`set_device` in
#: setup_distributed, `current_device()` as the all-reduce/all-gather buffer device) and its offload
#: helpers (`synchronize`).
CUDA_CALLERS = ("openrlhf.utils.deepspeed.deepspeed", "openrlhf.utils.deepspeed.deepspeed_utils")


def _barrier_without_cuda_sync() -> None:
    """`torch_dist_barrier_and_cuda_sync` (the strategy's barrier before saving) minus the CUDA sync."""
    torch.distributed.barrier()


def map_cuda_device_to_cpu() -> None:
    """Patch 2: `DeepspeedStrategy` hard-codes CUDA.

    It calls `torch.cuda.set_device`, moves all-reduce buffers to `torch.cuda.current_device()`, calls
    `torch.cuda.synchronize()` after barriers, and builds its device mesh with
    `init_device_mesh("cuda", ...)`. Without CUDA each of these raises; mapped to the CPU they are exactly
    what the CPU run needs (one device, nothing to synchronise, gloo collectives on CPU tensors).
    The mapping is scoped: only the `torch` those modules see is replaced, so every other caller of
    `torch.cuda.current_device()` (transformers, DeepSpeed, ours) keeps torch's own answer — an int, or
    the error a machine without CUDA should give. Only applied when CUDA is absent.
    """
    if not _mark("map_cuda_device_to_cpu"):
        return
    torch_on_cpu = _TorchOnCpu()
    for name in CUDA_CALLERS:
        importlib.import_module(name).torch = torch_on_cpu

    import openrlhf.utils.deepspeed.deepspeed as ds_strategy

    ds_strategy.torch_dist_barrier_and_cuda_sync = _barrier_without_cuda_sync  # it imports torch inside

    original = ds_strategy.init_device_mesh

    @wraps(original)
    def init_device_mesh(device_type: str, *args, **kwargs):
        return original("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    ds_strategy.init_device_mesh = init_device_mesh


# --- 3. fp32 as a parameter dtype ------------------------------------------------------------------


def enable_fp32() -> None:
    """Patch 3: OpenRLHF accepts only bf16/fp16 parameters; add fp32.

    fp16 does not train on DeepSpeed's CPU accelerator, and fp32 is the reference precision for
    numerics checks anywhere. OpenRLHF's DeepSpeed config already disables both bf16 and fp16 blocks for
    any other dtype name, so only `convert_to_torch_dtype` needs to know "fp32".
    """
    if not _mark("enable_fp32"):
        return
    import openrlhf.utils.utils as orl_utils

    original = orl_utils.convert_to_torch_dtype

    @wraps(original)
    def convert_to_torch_dtype(param_dtype: str) -> torch.dtype:
        return torch.float32 if param_dtype == "fp32" else original(param_dtype)

    orl_utils.convert_to_torch_dtype = convert_to_torch_dtype


# --- 4. no JIT-compiled ops ------------------------------------------------------------------------


def use_torch_adamw() -> None:
    """Patch 4: DeepSpeed's AdamW is JIT-compiled with a CUDA/C++ toolchain on first use; use torch's.

    OpenRLHF asks DeepSpeed for an "AdamW" optimizer block, for which DeepSpeed builds FusedAdam (nvcc +
    g++) on a GPU, or DeepSpeedCPUAdam (g++) under `adam_offload` and on a CPU, at every pod start (~90 s
    each, the build cache does not outlive the pod). The CUDA *runtime* image has no nvcc, so every
    training stage died there. Ask for torch's own AdamW instead (`torch_adam: true`: the same update) in
    its fused kernel (`fused: true`: one multi-tensor pass over the parameters, on CUDA as on CPU; on
    SmolLM2's 135M parameters 0.09 s per CPU step instead of 0.7 s for the for-loop default,
    docs/benchmarks.md). With `adam_offload` the offloaded fp32 states are stepped by the same fused
    kernel on the CPU. Applied everywhere: docs/install.md says why this beats a `-devel` base image.
    """
    if not _mark("use_torch_adamw"):
        return
    import openrlhf.utils.deepspeed.deepspeed as ds_strategy

    original = ds_strategy.get_train_ds_config

    @wraps(original)
    def get_train_ds_config(*args, **kwargs) -> dict:
        config = original(*args, **kwargs)
        optimizer = config.get("optimizer")
        if optimizer and optimizer.get("type") == "AdamW":
            optimizer["params"].update(torch_adam=True, fused=True)
        return config

    ds_strategy.get_train_ds_config = get_train_ds_config


def skip_shm_op() -> None:
    """Patch 5: DeepSpeed's CPU accelerator builds a shared-memory all-reduce op with g++ when its
    communication backend starts (~90 s); skip it, so gloo does the all-reduce. CPU only."""
    if not _mark("skip_shm_op"):
        return
    # importlib, not `import deepspeed.comm.torch`: that statement resolves to the `torch` package
    # re-exported by deepspeed.comm, and would patch the wrong module.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def apply_patches() -> list[str]:
    """Apply what this machine needs; return the names applied so far.

    Everywhere: the flash_attn stand-in (when the real package is absent) and torch's AdamW. Without a
    GPU also DeepSpeed's CPU accelerator, the CUDA device mapping and no shared-memory op. Must run
    before `openrlhf.models` is first imported (patch 1 replaces an import-time dependency).
    """
    on_cpu = not gpu_available()
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    stub_flash_attn_padding()
    use_torch_adamw()
    if on_cpu:
        map_cuda_device_to_cpu()
        skip_shm_op()
    return list(APPLIED)
