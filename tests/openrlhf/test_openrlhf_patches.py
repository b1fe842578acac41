"""Each patch of safealign.openrlhf.patches, and which of them a GPU node gets (faked CUDA: no GPU here)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from safealign.openrlhf import patches


def test_all_cpu_patches_applied_and_idempotent():
    assert {"stub_flash_attn_padding", "use_torch_adamw", "map_cuda_device_to_cpu", "skip_shm_op"} <= set(patches.APPLIED)
    before = list(patches.APPLIED)
    patches.apply_patches()
    assert patches.APPLIED == before


def test_flash_attn_padding_stub_round_trips():
    from flash_attn.bert_padding import index_first_axis, pad_input, unpad_input

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    flat, indices, cu_seqlens, max_len, used = unpad_input(hidden, mask)
    assert flat.shape == (5, 3) and cu_seqlens.tolist() == [0, 3, 5] and max_len == 3 and used.tolist() == [3, 2]
    restored = pad_input(flat, indices, 2, 4)
    assert torch.equal(restored, hidden * mask.unsqueeze(-1))
    assert torch.equal(index_first_axis(hidden.reshape(8, 3), indices), flat)
    # transformers must still see FlashAttention as unavailable: the stub has no distribution metadata.
    from transformers.utils import is_flash_attn_2_available

    assert not is_flash_attn_2_available()


def test_cuda_device_calls_map_to_cpu_inside_openrlhfs_strategy_only():
    import openrlhf.utils.deepspeed.deepspeed as ds_strategy
    import openrlhf.utils.deepspeed.deepspeed_utils as ds_utils

    cuda = ds_strategy.torch.cuda  # the `torch.cuda` OpenRLHF's strategy code sees
    cuda.set_device(0)
    cuda.synchronize()
    assert torch.zeros(2).to(cuda.current_device()).device.type == "cpu"
    assert ds_utils.torch.cuda is cuda and ds_strategy.torch.float32 is torch.float32  # the rest is torch's
    assert ds_strategy.torch_dist_barrier_and_cuda_sync.__name__ == "_barrier_without_cuda_sync"
    assert ds_strategy.init_device_mesh.__wrapped__ is not ds_strategy.init_device_mesh
    # Everyone else keeps torch's own: an index to do arithmetic with, or the error a CPU machine gives.
    assert torch.cuda.current_device.__module__ == "torch.cuda"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()


def test_fp32_dtype():
    import openrlhf.utils.utils as orl_utils

    patches.enable_fp32()
    assert orl_utils.convert_to_torch_dtype("fp32") is torch.float32
    assert orl_utils.convert_to_torch_dtype("bf16") is torch.bfloat16


ADAMW = {"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}}


def test_no_jit_compiled_ops():
    import importlib

    import openrlhf.utils.deepspeed.deepspeed as ds_strategy

    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None
    config = ds_strategy.get_train_ds_config(offload=False, optim_config=copy.deepcopy(ADAMW))
    assert config["optimizer"]["params"]["torch_adam"] is True
    assert config["optimizer"]["params"]["fused"] is True  # torch's single-kernel AdamW


#: A process that sees one CUDA GPU (torch's answers faked: no GPU is lent here) and no flash-attn, as
#: in the GPU image: what it prints is checked by the test below.
ON_A_GPU_NODE = """
import importlib, json, os, sys, torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
assert importlib.util.find_spec("flash_attn") is None
from safealign.openrlhf import Actor, patches
from safealign.stages import load_builtin_stages
from safealign.openrlhf.settings import resolve_attention
from safealign.core.errors import SafeAlignError
import openrlhf.utils.deepspeed.deepspeed as ds_strategy
from deepspeed.runtime.engine import DeepSpeedEngine

stages = sorted(load_builtin_stages())
try:
    resolve_attention("flash_attention_2")
    explicit = "accepted"
except SafeAlignError as exc:
    explicit = str(exc)

class Engine:  # what DeepSpeed's optimizer choice asks of its engine, with and without adam_offload
    def __init__(self, offload): self.offload = offload
    def zero_use_cpu_optimizer(self): return self.offload
    zenflow = False
    def bf16_optimizer_states(self): return False

chosen = {}
for offload in (False, True):
    config = ds_strategy.get_train_ds_config(offload=False, adam_offload=offload, optim_config=json.loads(sys.argv[1]))
    params = dict(config["optimizer"]["params"])
    cls, kwargs = DeepSpeedEngine.get_optimizer_configuration(Engine(offload), params, adam_w_mode=True)
    chosen[str(offload)] = {"class": cls.__module__ + "." + cls.__name__, "params": config["optimizer"]["params"]}
print(json.dumps({
    "applied": patches.APPLIED, "accelerator": os.environ.get("DS_ACCELERATOR"), "stages": stages,
    "strategy_torch_is_torch": ds_strategy.torch is torch, "auto": resolve_attention("auto"),
    "explicit": explicit, "optimizer": chosen,
}))
"""


def test_a_gpu_node_without_flash_attn_imports_every_stage_and_builds_no_optimizer():
    """Blockers 2 and 3 of a first GPU start: OpenRLHF imports `flash_attn` at module level (the image has
    none), and DeepSpeed's AdamW is JIT-built with nvcc/g++ (the CUDA runtime image has neither)."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # this test process runs on the CPU
    result = subprocess.run([sys.executable, "-c", ON_A_GPU_NODE, json.dumps(ADAMW)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    # The stand-in and torch's AdamW, nothing CPU-only: OpenRLHF's strategy keeps torch's own CUDA.
    assert seen["applied"] == ["stub_flash_attn_padding", "use_torch_adamw"]
    assert seen["accelerator"] is None and seen["strategy_torch_is_torch"] is True
    assert seen["stages"] == ["align", "distill", "eval", "rm"]
    # transformers' own check decides attention: the stand-in never selects flash_attention_2.
    assert seen["auto"] == "sdpa"
    assert seen["explicit"].startswith("model.attn_implementation: flash_attention_2 needs the flash-attn package")
    # The GPU optimizer config, fed to DeepSpeed's own choice: torch's fused AdamW, never FusedAdam
    # (nvcc) and, under adam_offload, never DeepSpeedCPUAdam (g++).
    for offload in ("False", "True"):
        assert seen["optimizer"][offload]["class"] == "torch.optim.adamw.AdamW"
        assert seen["optimizer"][offload]["params"]["torch_adam"] is True
        assert seen["optimizer"][offload]["params"]["fused"] is True
