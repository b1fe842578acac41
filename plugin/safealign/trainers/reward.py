"""The RM stage's trainers: OpenRLHF's `RewardModelTrainer` (value-head model, DeepSpeed) with our loop.

Both read the same pair batches as the align trainer (response 0 and 1 in one forward, labels in
`PairExtras`) and differ only in the loss:
- `HelpfulRMTrainer`: OpenRLHF's own pairwise loss (`self.loss_fn`, −log σ(r_better − r_other)) on the
  helpfulness label;
- `CostModelTrainer`: Safe RLHF's cost loss (`safealign.domain.cost_loss`) on the harmlessness label and the
  per-response safety signs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from safealign.domain.cost_loss import cost_model_loss
from safealign.domain.metrics import MetricsLog
from safealign.openrlhf import RewardModelTrainer
from safealign.openrlhf.pair_dataset import PairExtras
from safealign.openrlhf.pair_forward import PairValues
from safealign.openrlhf.settings import Settings
from safealign.trainers.loop import StepLoop


class PairValueTrainer(StepLoop, RewardModelTrainer):
    """A value-head model trained on response pairs; subclasses define the loss."""

    def __init__(self, model, strategy, optim, train_dataloader, eval_dataloader, scheduler, tokenizer, *,
                 settings: Settings, metrics_path: Path) -> None:  # fmt: skip
        super().__init__(
            model, strategy, optim, train_dataloader, eval_dataloader, scheduler, tokenizer,
            max_norm=settings.max_norm, max_epochs=settings.train.max_epochs, loss=settings.model.loss_type,
            disable_ds_ckpt=settings.ckpt.disable_ds, save_hf_ckpt=settings.ckpt.save_hf,
        )  # fmt: skip
        self.metrics = MetricsLog(metrics_path, enabled=strategy.is_rank_0())
        self.device = next(self.model.parameters()).device
        self.pair_values = PairValues(tokenizer, strategy, self.device)

    def values(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The value head's output for response 0 and 1 (fp32), from one forward over both."""
        return self.pair_values(self.model, batch)


class HelpfulRMTrainer(PairValueTrainer):
    """Helpful reward model: OpenRLHF's pairwise loss oriented by `better_response_id`."""

    progress_name = "helpful-rm"
    bar_keys = ("loss", "acc")

    def batch_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        extras: PairExtras = batch[-1]
        value_0, value_1 = self.values(batch)
        better_is_0 = extras.better_id.to(self.device) == 0
        preferred = torch.where(better_is_0, value_0, value_1)
        other = torch.where(better_is_0, value_1, value_0)
        loss = self.loss_fn(preferred, other)
        return loss, {
            "loss": loss.item(),
            "acc": (preferred > other).float().mean().item(),
            "reward_mean": torch.cat([value_0, value_1]).mean().item(),
        }


class CostModelTrainer(PairValueTrainer):
    """Cost model: Safe RLHF's pairwise + sign loss (cost > 0 means unsafe)."""

    progress_name = "cost-model"
    bar_keys = ("loss", "pair_acc", "sign_acc")

    def __init__(self, *args, regularization: float = 1e-3, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.regularization = regularization

    def batch_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        extras: PairExtras = batch[-1]
        cost_0, cost_1 = self.values(batch)
        d = self.device
        return cost_model_loss(
            cost_0, cost_1, extras.safer_id.to(d), extras.safe_0.to(d), extras.safe_1.to(d), self.regularization
        )
