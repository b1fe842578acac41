"""The one place the plugin imports OpenRLHF from.

OpenRLHF imports `flash_attn` at module level and assumes CUDA, so the CPU patches of
`safealign.compat` must run before its first import. Every module takes OpenRLHF's classes from
here, which makes that ordering impossible to get wrong.
"""

import warnings

from safealign.compat import apply_cpu_patches
from safealign.errors import SafeAlignError

# torchdata's StatefulDataLoader warns on every construction about an internal torch API it calls.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

try:
    apply_cpu_patches()
    import datasets

    datasets.disable_progress_bars()  # per-split map/filter bars: noise next to the training bar
    from openrlhf.datasets import RewardDataset, SFTDataset
    from openrlhf.datasets.reward_dataset import preprocess_data
    from openrlhf.models import Actor, get_llm_for_sequence_regression
    from openrlhf.trainer.dpo_trainer import DPOTrainer
    from openrlhf.trainer.rm_trainer import RewardModelTrainer
    from openrlhf.trainer.sft_trainer import SFTTrainer
    from openrlhf.utils import get_strategy, get_tokenizer
    from openrlhf.utils.deepspeed import DeepspeedStrategy
    from openrlhf.utils.distributed_sampler import DistributedSampler
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    if exc.name and exc.name.split(".")[0] in {"openrlhf", "deepspeed"}:
        raise SafeAlignError(
            f"{exc.name} is not installed: run `make setup` (CPU), or on a GPU machine `pip install -r "
            "requirements/gpu.txt && pip install --no-deps -r requirements/gpu-no-deps.txt` (docs/install.md)"
        ) from None
    raise

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
