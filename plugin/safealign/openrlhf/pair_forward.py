"""Both responses of a pair in one forward, through OpenRLHF's own trainer methods.

The align trainer, the RM trainers, the RM stage's scoring and cached reference log-probs, the eval
stage's held-out measure and λ's cost sampler all read pairs this way, so every one of them runs the
very same code OpenRLHF's `DPOTrainer` and `RewardModelTrainer` run.
"""

from __future__ import annotations

import torch

from safealign.openrlhf import DPOTrainer, RewardModelTrainer


class _PairForward:
    """One forward over both responses of a batch, with OpenRLHF trainer methods borrowed as helpers
    (they read only `self.tokenizer` and `self.strategy`)."""

    def __init__(self, tokenizer, strategy, device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.strategy = strategy
        self.device = device


class PairLogProbs(_PairForward):
    """Sum and mean response log-probs of both responses of a batch, from one forward over both.

    These are OpenRLHF's `DPOTrainer.concatenated_inputs` and `_get_batch_logps` (borrowed, not
    copied), so the align trainer's live reference pass and the RM stage's cached reference
    log-probs run the very same code.
    """

    concatenated_inputs = DPOTrainer.concatenated_inputs
    _get_batch_logps = DPOTrainer._get_batch_logps

    def __call__(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ids_0, mask_0, ids_1, mask_1, extras = batch
        d = self.device
        input_ids, masks, prompt_lens = self.concatenated_inputs(
            ids_0.to(d), mask_0.to(d), ids_1.to(d), mask_1.to(d), extras.prompt_lens
        )
        log_probs = model(
            input_ids, attention_mask=masks, return_logprobs=True, ring_attn_group=self.strategy.ring_attn_group
        )
        sums, means = self._get_batch_logps(log_probs, masks, prompt_lens)
        n = ids_0.shape[0]
        return sums[:n], sums[n:], means[:n], means[n:]


class PairValues(_PairForward):
    """A value head's output for both responses of a batch, from one forward over both.

    OpenRLHF's `RewardModelTrainer.concatenated_inputs`/`concatenated_forward`, borrowed, so the RM
    trainers and the RM stage's scoring pass run the same code.
    """

    concatenated_inputs = RewardModelTrainer.concatenated_inputs
    concatenated_forward = RewardModelTrainer.concatenated_forward

    def __call__(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        ids_0, mask_0, ids_1, mask_1, _ = batch
        d = self.device
        value_0, value_1, _ = self.concatenated_forward(model, ids_0.to(d), mask_0.to(d), ids_1.to(d), mask_1.to(d))
        return value_0.float(), value_1.float()
