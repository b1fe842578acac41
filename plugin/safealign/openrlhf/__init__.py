"""The OpenRLHF adapter: the one package that touches OpenRLHF.

- this module: OpenRLHF's classes (`from safealign.openrlhf import Actor`). OpenRLHF imports
  `flash_attn` at module level and assumes CUDA, so the patches (`patches`: a flash_attn stand-in,
  torch's AdamW, the CPU fixes) must run before its first import; every class is taken from here, which makes that ordering impossible to get wrong.
  They load on first use (PEP 562), so importing this package — or `settings` — applies nothing and
  imports nothing heavy;
- `settings`: the settings object OpenRLHF's strategy, models, datasets and trainers read, built once
  from the recipe and frozen (field for field OpenRLHF 0.11.2's `train_dpo`/`train_rm`/`train_sft`
  parsers: tests/openrlhf/test_openrlhf_settings.py);
- `engine`: the strategy, the models and tokenizer on it, the optimizer config, resume and publish;
- `pair_forward`: both responses of a pair in one forward, with OpenRLHF's own trainer methods.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from safealign.core.errors import SafeAlignError
from safealign.openrlhf.patches import apply_patches

#: Each class or function we use from OpenRLHF, and the module it comes from.
EXPORTS = {
    "Actor": "openrlhf.models",
    "get_llm_for_sequence_regression": "openrlhf.models",
    "RewardDataset": "openrlhf.datasets",
    "SFTDataset": "openrlhf.datasets",
    "preprocess_data": "openrlhf.datasets.reward_dataset",
    "DPOTrainer": "openrlhf.trainer.dpo_trainer",
    "RewardModelTrainer": "openrlhf.trainer.rm_trainer",
    "SFTTrainer": "openrlhf.trainer.sft_trainer",
    "get_strategy": "openrlhf.utils",
    "get_tokenizer": "openrlhf.utils",
    "DeepspeedStrategy": "openrlhf.utils.deepspeed",
    "DistributedSampler": "openrlhf.utils.distributed_sampler",
}

__all__ = [
    "Actor",
    "DPOTrainer",
    "DeepspeedStrategy",
    "DistributedSampler",
    "RewardDataset",
    "RewardModelTrainer",
    "SFTDataset",
    "SFTTrainer",
    "get_llm_for_sequence_regression",
    "get_strategy",
    "get_tokenizer",
    "preprocess_data",
]

if TYPE_CHECKING:  # what a type checker sees; at run time `__getattr__` imports them after the patches
    from openrlhf.datasets import RewardDataset, SFTDataset
    from openrlhf.datasets.reward_dataset import preprocess_data
    from openrlhf.models import Actor, get_llm_for_sequence_regression
    from openrlhf.trainer.dpo_trainer import DPOTrainer
    from openrlhf.trainer.rm_trainer import RewardModelTrainer
    from openrlhf.trainer.sft_trainer import SFTTrainer
    from openrlhf.utils import get_strategy, get_tokenizer
    from openrlhf.utils.deepspeed import DeepspeedStrategy
    from openrlhf.utils.distributed_sampler import DistributedSampler


def __getattr__(name: str) -> Any:
    """OpenRLHF's `name`, imported after the patches this machine needs."""
    if name not in EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    apply_patches()
    try:
        module = importlib.import_module(EXPORTS[name])
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        if exc.name and exc.name.split(".")[0] in {"openrlhf", "deepspeed"}:
            raise SafeAlignError(
                f"{exc.name} is not installed: run `make setup` (CPU), or on a GPU machine `pip install -r "
                "requirements/gpu.txt && pip install --no-deps -r requirements/gpu-no-deps.txt` (docs/install.md)"
            ) from None
        raise
    value = getattr(module, name)
    globals()[name] = value
    return value
