"""The distill stage's dSFT trainer: OpenRLHF's `SFTTrainer`, unchanged, plus a `metrics.jsonl` line per step.

`SFTTrainer.fit` already does what dSFT needs (prompt tokens masked by `SFTDataset`, the loss a token
mean over the whole optimizer step, DeepSpeed checkpoints with `consumed_samples` for resume), so it
runs as is. The one addition is the same per-step record the other stages write, which the report
and the tests read: `step`, `loss` (token-mean NLL of the teacher's answers over the step, averaged
across ranks), `lr` and `grad_norm`.
"""

from __future__ import annotations

from pathlib import Path

from safealign.domain.metrics import MetricsLog
from safealign.openrlhf import SFTTrainer
from safealign.openrlhf.settings import Settings, for_fit


class DistillSFTTrainer(SFTTrainer):
    def __init__(self, model, strategy, optim, train_dataloader, scheduler, tokenizer, *,
                 settings: Settings, metrics_path: Path) -> None:  # fmt: skip
        super().__init__(
            model, strategy, optim, train_dataloader, None, scheduler,
            max_norm=settings.max_norm, pretrain_mode=settings.model.pretrain_mode_enable,
            batch_size=settings.train.batch_size, max_epochs=settings.train.max_epochs, tokenizer=tokenizer,
            save_hf_ckpt=settings.ckpt.save_hf, disable_ds_ckpt=settings.ckpt.disable_ds,
        )  # fmt: skip
        self.metrics = MetricsLog(metrics_path, enabled=self.strategy.is_rank_0())

    def fit(self, args: Settings, consumed_samples: int = 0, num_update_steps_per_epoch: int | None = None) -> None:
        """OpenRLHF's own loop, handed a copy whose -1 cadences are already resolved (it would otherwise
        write them into the frozen settings)."""
        self.metrics.truncate_after(consumed_samples // args.train.batch_size)  # lines a crashed run logged
        super().fit(for_fit(args, num_update_steps_per_epoch), consumed_samples, num_update_steps_per_epoch)

    def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
        if logs_dict and "loss_mean" in logs_dict:
            loss = self.strategy.all_reduce({"loss": logs_dict["loss_mean"]})["loss"]
            self.metrics.write(
                {
                    "step": int(global_step),
                    "loss": float(loss),
                    "lr": logs_dict["lr"],
                    "grad_norm": logs_dict["grad_norm"],
                }
            )
        super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)
