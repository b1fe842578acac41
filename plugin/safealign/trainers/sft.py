"""The distill stage's dSFT trainer: OpenRLHF's `SFTTrainer`, unchanged, plus a `metrics.jsonl` line per step.

`SFTTrainer.fit` already does what dSFT needs (prompt tokens masked by `SFTDataset`, the loss a token
mean over the whole optimizer step, DeepSpeed checkpoints with `consumed_samples` for resume), so it
runs as is. The one addition is the same per-step record the other stages write, which the report
and the tests read: `step`, `loss` (token-mean NLL of the teacher's answers over the step, averaged
across ranks), `lr` and `grad_norm`.
"""

from __future__ import annotations

from pathlib import Path

from safealign._openrlhf import SFTTrainer
from safealign.metrics import MetricsLog


class DistillSFTTrainer(SFTTrainer):
    def __init__(self, *args, metrics_path: Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = MetricsLog(metrics_path, enabled=self.strategy.is_rank_0())

    def fit(self, args, consumed_samples: int = 0, num_update_steps_per_epoch: int | None = None) -> None:
        self.metrics.truncate_after(consumed_samples // args.train.batch_size)  # lines a crashed run logged
        super().fit(args, consumed_samples, num_update_steps_per_epoch)

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
