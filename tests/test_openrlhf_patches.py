"""Each CPU patch of safealign.openrlhf.patches, and that none is applied where a GPU is present."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from safealign.openrlhf import patches


def test_all_cpu_patches_applied_and_idempotent():
    assert {"stub_flash_attn_padding", "map_cuda_device_to_cpu", "avoid_jit_ops"} <= set(patches.APPLIED)
    before = list(patches.APPLIED)
    patches.apply_cpu_patches()
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


def test_no_jit_compiled_ops():
    import importlib

    import openrlhf.utils.deepspeed.deepspeed as ds_strategy

    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None
    config = ds_strategy.get_train_ds_config(
        offload=False,
        optim_config={"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}},
    )
    assert config["optimizer"]["params"]["torch_adam"] is True
    assert config["optimizer"]["params"]["fused"] is True  # torch's single-kernel CPU AdamW


def test_nothing_is_patched_where_a_gpu_is_present():
    code = (
        "import sys, torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "torch.cuda.device_count = lambda: 1\n"
        "from safealign.openrlhf import patches\n"
        "assert patches.apply_cpu_patches() == [], patches.APPLIED\n"
        "assert 'flash_attn' not in sys.modules and 'openrlhf' not in sys.modules\n"
        "print('untouched')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "untouched" in result.stdout
