"""Tokenised response pairs that carry their labels, margins and costs into the training loop.

This is OpenRLHF's `RewardDataset` in DPO mode (same chat-template formatting via its
`preprocess_data`, same truncation, EOS and right-padding collate) with one change: the per-row
`extra` slot, which OpenRLHF fills with the prompt length, carries a record of everything
Safe-MM-DPO needs (prompt length, both label ids, both margins, both costs, cached reference
log-probs, row index). `collate_fn` turns those records into tensors (`PairExtras`).
Response 0 rides in OpenRLHF's "chosen" slot and response 1 in "rejected": which one is preferred
is a per-dimension label, not a property of the slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from safealign.domain.cost_loss import SAFE, UNKNOWN, UNSAFE
from safealign.domain.data import PreferenceRow, flatten_messages
from safealign.openrlhf import RewardDataset, preprocess_data

_NAN = math.nan


@dataclass
class PairExtras:
    """Per-row labels and numbers of one batch, as tensors of shape `[B]` (NaN: not present)."""

    prompt_lens: list[int]
    row_index: torch.Tensor
    better_id: torch.Tensor
    safer_id: torch.Tensor
    safe_0: torch.Tensor  # 1 safe, 0 unsafe, −1 unknown (safealign.domain.cost_loss encoding)
    safe_1: torch.Tensor
    delta_h: torch.Tensor
    delta_s: torch.Tensor
    cost_0: torch.Tensor
    cost_1: torch.Tensor
    ref_logps_0: torch.Tensor
    ref_logps_1: torch.Tensor

    @property
    def has_costs(self) -> bool:
        return bool(torch.isfinite(self.cost_0).all() and torch.isfinite(self.cost_1).all())

    @property
    def has_ref_logps(self) -> bool:
        return bool(torch.isfinite(self.ref_logps_0).all() and torch.isfinite(self.ref_logps_1).all())


def _or_nan(value: float | None) -> float:
    return _NAN if value is None else value


def _safety(value: bool | None) -> int:
    return UNKNOWN if value is None else (SAFE if value else UNSAFE)


class PreferencePairDataset(RewardDataset):
    """OpenRLHF's pair dataset over `PreferenceRow`s; `dropped` counts prompts too long to train on.

    `for_reward_model=False` is OpenRLHF's DPO mode (right padding, for log-probs); True is its
    reward-model mode (left padding, for a value head reading the last token). Both drop the same rows,
    so every stage sees the same pairs.
    """

    def __init__(
        self,
        rows: list[PreferenceRow],
        tokenizer,
        max_length: int,
        strategy,
        input_template=None,
        for_reward_model: bool = False,
    ) -> None:
        from datasets import Dataset

        records = [
            {
                "prompt": row.prompt,
                "response_0": row.response_0,
                "response_1": row.response_1,
                "extra": {
                    "row_index": index,
                    "better_id": row.better_response_id,
                    "safer_id": row.safer_response_id,
                    "safe_0": _safety(row.is_response_0_safe),
                    "safe_1": _safety(row.is_response_1_safe),
                    "delta_h": _or_nan(row.delta_h),
                    "delta_s": _or_nan(row.delta_s),
                    "cost_0": _or_nan(row.cost_0),
                    "cost_1": _or_nan(row.cost_1),
                    "ref_logps_0": _or_nan(row.ref_logps_0),
                    "ref_logps_1": _or_nan(row.ref_logps_1),
                },
            }
            for index, row in enumerate(rows)
        ]
        # Tokenising a few thousand rows in-process beats spawning OpenRLHF's default 8 workers. `None`,
        # not 1: datasets >= 5 forks a pool for any num_proc >= 1, and a fork in a process with gloo's
        # threads can deadlock (a torchrun rank hung in it, building Ĵ_C's scoring set).
        workers = min(8, len(rows) // 5000) or None
        is_dpo = not for_reward_model
        super().__init__(Dataset.from_list(records), tokenizer, max_length, strategy, input_template, is_dpo, workers)
        self.dropped = len(rows) - len(self)

    def process_data(self, data: dict) -> dict:
        """Format with OpenRLHF's `preprocess_data`, then keep the row's extras beside the prompt length."""
        if self.apply_chat_template:
            sample = {
                "prompt": data["prompt"],
                "response_0": [{"role": "assistant", "content": data["response_0"]}],
                "response_1": [{"role": "assistant", "content": data["response_1"]}],
            }
        else:
            sample = {**data, "prompt": flatten_messages(data["prompt"])}
        prompt, response_0, response_1, _ = preprocess_data(
            sample, self.input_template, "prompt", "response_0", "response_1", self.apply_chat_template, is_dpo=True
        )
        prompt_len = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if prompt_len >= self.max_length - 2:  # OpenRLHF's DPO rule, in both modes: room for an answer
            prompt = None
        return {
            "prompt": prompt,
            "chosen": response_0,
            "reject": response_1,
            "extra": {**data["extra"], "prompt_len": prompt_len},
        }

    def collate_fn(self, item_list):
        ids_0, mask_0, ids_1, mask_1, extras = super().collate_fn(item_list)

        def column(key: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([e[key] for e in extras], dtype=dtype)

        return (
            ids_0,
            mask_0,
            ids_1,
            mask_1,
            PairExtras(
                prompt_lens=[e["prompt_len"] for e in extras],
                row_index=column("row_index", torch.long),
                better_id=column("better_id", torch.long),
                safer_id=column("safer_id", torch.long),
                safe_0=column("safe_0", torch.long),
                safe_1=column("safe_1", torch.long),
                delta_h=column("delta_h", torch.float32),
                delta_s=column("delta_s", torch.float32),
                cost_0=column("cost_0", torch.float32),
                cost_1=column("cost_1", torch.float32),
                ref_logps_0=column("ref_logps_0", torch.float32),
                ref_logps_1=column("ref_logps_1", torch.float32),
            ),
        )
