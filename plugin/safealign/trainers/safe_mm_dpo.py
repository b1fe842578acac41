"""`SafeMMDPOTrainer`: OpenRLHF's `DPOTrainer` with a registry loss and Safe RLHF's dual update.

What is OpenRLHF's and reused as is: the DeepSpeed engine and its `backward`/`optimizer_step`,
`concatenated_inputs` (both responses in one forward), `_get_batch_logps`, the sampler/epoch/resume
bookkeeping, `save_logs_and_checkpoints` (TensorBoard, wandb, DeepSpeed checkpoints).
What is ours: the batch carries labels, margins and costs (`PairExtras`); the loss comes from
`safealign.losses` (so `dpo`, `mm_dpo` and `safe_mm_dpo` share this one code path); λ is updated
once per optimizer step from Ĵ_C and saved in the checkpoint; statistics go to `metrics.jsonl`.

Per micro-batch there is one policy forward over both responses and, unless the rows carry cached
reference log-probs, one reference forward: both objectives read the same four log-prob sums.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from safealign._openrlhf import DPOTrainer
from safealign.errors import SafeAlignError
from safealign.lagrange import LagrangeMultiplier, implicit_cost_estimate
from safealign.losses import PreferenceBatch, PreferenceLoss
from safealign.metrics import MetricsLog
from safealign.pair_dataset import PairExtras
from safealign.trainers.loop import PairLogProbs, StepLoop


class SafeMMDPOTrainer(StepLoop, DPOTrainer):
    """Safe-MM-DPO (or any registered preference loss) through OpenRLHF's DPO machinery."""

    bar_keys = ("loss", "loss_h", "loss_s", "acc_h", "acc_s", "lambda", "cost_estimate")
    progress_name = "align"

    def __init__(
        self,
        model,
        ref_model,
        strategy,
        tokenizer,
        optim,
        train_dataloader,
        eval_dataloader,
        scheduler,
        *,
        loss: PreferenceLoss,
        lagrange: LagrangeMultiplier,
        update_lambda: bool,
        metrics_path: Path,
        max_norm: float = 1.0,
        max_epochs: int = 1,
    ) -> None:
        super().__init__(
            model,
            ref_model,
            strategy,
            tokenizer,
            optim,
            train_dataloader,
            eval_dataloader,
            scheduler,
            max_norm=max_norm,
            beta=loss.settings.beta_ori,
            max_epochs=max_epochs,
        )
        self.preference_loss = loss
        self.lagrange = lagrange
        self.update_lambda = update_lambda and loss.uses_lambda
        self.metrics = MetricsLog(metrics_path, enabled=strategy.is_rank_0())
        self.device = next(self.model.parameters()).device
        self.pair_logps = PairLogProbs(tokenizer, strategy, self.device)

    def reference_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached reference log-probs when the rows carry them, else one reference forward."""
        extras: PairExtras = batch[-1]
        if extras.has_ref_logps:
            return extras.ref_logps_0.to(self.device), extras.ref_logps_1.to(self.device)
        if self.ref_model is None:
            raise SafeAlignError("rows carry no ref_logps_0/1 and no reference model was loaded")
        self.ref_model.eval()
        with torch.no_grad():
            ref_0, ref_1, _, _ = self.pair_logps(self.ref_model, batch)
        return ref_0, ref_1

    def batch_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The registry loss at the current λ, its statistics, and Ĵ_C when the rows carry costs."""
        extras: PairExtras = batch[-1]
        policy_0, policy_1, mean_0, mean_1 = self.pair_logps(self.model, batch)
        ref_0, ref_1 = self.reference_logps(batch)
        inputs = PreferenceBatch(
            policy_logps_0=policy_0,
            policy_logps_1=policy_1,
            ref_logps_0=ref_0,
            ref_logps_1=ref_1,
            better_id=extras.better_id.to(self.device),
            safer_id=extras.safer_id.to(self.device),
            delta_h=extras.delta_h.to(self.device).nan_to_num(0.0),
            delta_s=extras.delta_s.to(self.device).nan_to_num(0.0),
        )
        loss, stats = self.preference_loss(inputs, self.lagrange.value)
        stats = {**stats, "loss": loss.item(), "lambda": self.lagrange.value}
        if extras.has_costs:
            stats["cost_estimate"] = implicit_cost_estimate(mean_0, mean_1, extras.cost_0, extras.cost_1)
        return loss, stats

    def after_step(self, logs: dict[str, float]) -> None:
        """Safe RLHF's dual update, once per optimizer step, from the step's (all-reduced) Ĵ_C."""
        estimate = logs.get("cost_estimate", math.nan)
        if self.update_lambda and math.isfinite(estimate):
            self.lagrange.update(estimate)
        logs["lambda_next"] = self.lagrange.value

    def client_state(self) -> dict:
        return {"lagrange": self.lagrange.state_dict()}
