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
from tqdm import tqdm

from safealign._openrlhf import DPOTrainer
from safealign.errors import SafeAlignError
from safealign.lagrange import LagrangeMultiplier, implicit_cost_estimate
from safealign.losses import PreferenceBatch, PreferenceLoss
from safealign.metrics import MetricsLog, StatsAccumulator
from safealign.pair_dataset import PairExtras

#: Shown on the progress bar; everything else goes to metrics.jsonl / TensorBoard / wandb.
BAR_KEYS = ("loss", "loss_h", "loss_s", "acc_h", "acc_s", "lambda", "cost_estimate")


class SafeMMDPOTrainer(DPOTrainer):
    """Safe-MM-DPO (or any registered preference loss) through OpenRLHF's DPO machinery."""

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

    # --- one micro-batch ---------------------------------------------------------------------------

    def pair_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sum and mean response log-probs of responses 0 and 1, from one forward over both."""
        ids_0, mask_0, ids_1, mask_1, extras = batch
        input_ids, masks, prompt_lens = self.concatenated_inputs(
            ids_0.to(self.device),
            mask_0.to(self.device),
            ids_1.to(self.device),
            mask_1.to(self.device),
            extras.prompt_lens,
        )
        log_probs = model(
            input_ids, attention_mask=masks, return_logprobs=True, ring_attn_group=self.strategy.ring_attn_group
        )
        sums, means = self._get_batch_logps(log_probs, masks, prompt_lens)
        n = ids_0.shape[0]
        return sums[:n], sums[n:], means[:n], means[n:]

    def reference_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached reference log-probs when the rows carry them, else one reference forward."""
        extras: PairExtras = batch[-1]
        if extras.has_ref_logps:
            return extras.ref_logps_0.to(self.device), extras.ref_logps_1.to(self.device)
        if self.ref_model is None:
            raise SafeAlignError("rows carry no ref_logps_0/1 and no reference model was loaded")
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

    # --- the loop ----------------------------------------------------------------------------------

    def fit(self, args, consumed_samples: int = 0, num_update_steps_per_epoch: int | None = None) -> None:
        """OpenRLHF's DPO loop with our loss, per-step λ update and metrics; resumes from checkpoints."""
        accumulation = self.strategy.accumulated_gradient
        if num_update_steps_per_epoch is None:
            num_update_steps_per_epoch = len(self.train_dataloader) // accumulation
        if num_update_steps_per_epoch <= 0:
            raise SafeAlignError("fewer training pairs than one global batch: lower align.batch_size or add data")
        if args.eval.steps == -1:
            args.eval.steps = num_update_steps_per_epoch
        if args.ckpt.save_steps == -1:
            args.ckpt.save_steps = float("inf")

        steps_done = consumed_samples // args.train.batch_size
        step = steps_done * accumulation + 1  # micro-batch counter, as in DPOTrainer.fit
        start_epoch = steps_done // num_update_steps_per_epoch
        consumed_samples %= num_update_steps_per_epoch * args.train.batch_size
        self.metrics.truncate_after(steps_done)
        # Every epoch is exactly `num_update_steps_per_epoch` optimizer steps (the scheduler is sized for
        # that): micro-batches past the last full global batch are dropped, not spilled into the next epoch.
        micro_per_epoch = num_update_steps_per_epoch * accumulation
        accumulator = StatsAccumulator()

        for epoch in range(start_epoch, self.epochs):
            resumed = consumed_samples if epoch == start_epoch else 0
            done = resumed // args.train.batch_size * accumulation
            sampler = self.train_dataloader.sampler
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch, consumed_samples=resumed)
            step_bar = tqdm(
                total=micro_per_epoch,
                initial=done,
                desc=f"align epoch {epoch + 1}/{self.epochs}",
                disable=not self.strategy.is_rank_0(),
            )
            self.model.train()
            if self.ref_model is not None:
                self.ref_model.eval()
            for batch in self.train_dataloader:
                if done >= micro_per_epoch:
                    break
                loss, stats = self.batch_loss(batch)
                self.strategy.backward(loss, self.model, self.optimizer)
                self.strategy.optimizer_step(self.optimizer, self.model, self.scheduler)
                accumulator.add(stats)
                step_bar.update()
                done += 1

                if step % accumulation == 0:
                    global_step = step // accumulation
                    logs = self.finish_step(accumulator, global_step, epoch)
                    step_bar.set_postfix({k: f"{logs[k]:.4g}" for k in BAR_KEYS if k in logs})
                    client_states = {
                        "consumed_samples": global_step * args.train.batch_size,
                        "lagrange": self.lagrange.state_dict(),
                    }
                    self.save_logs_and_checkpoints(args, global_step, step_bar, logs, client_states)
                step += 1
            step_bar.close()

        if self._wandb is not None and self.strategy.is_rank_0():
            self._wandb.finish()
        if self._tensorboard is not None and self.strategy.is_rank_0():
            self._tensorboard.close()

    def finish_step(self, accumulator: StatsAccumulator, global_step: int, epoch: int) -> dict[str, float]:
        """Reduce the step's statistics over ranks, move λ by the dual update, and log the step."""
        logs = accumulator.reduce(self.strategy)
        estimate = logs.get("cost_estimate", math.nan)
        if self.update_lambda and math.isfinite(estimate):
            self.lagrange.update(estimate)
        logs["lambda_next"] = self.lagrange.value
        logs["lr"] = self.scheduler.get_last_lr()[0]
        logs["grad_norm"] = self.strategy.get_grad_norm(self.model)
        self.metrics.write({"step": global_step, "epoch": epoch, **logs})
        return logs

    def evaluate(self, eval_dataloader, steps: int = 0) -> dict[str, float]:
        """Held-out loss and per-dimension accuracy at the current λ (replaces DPOTrainer.evaluate)."""
        self.model.eval()
        accumulator = StatsAccumulator()
        with torch.no_grad():
            for batch in tqdm(eval_dataloader, desc=f"eval at step {steps}", disable=not self.strategy.is_rank_0()):
                accumulator.add(self.batch_loss(batch)[1])
        logs = {f"eval_{k}": v for k, v in accumulator.reduce(self.strategy).items()}
        self.metrics.write({"step": steps, **logs})
        if self.strategy.is_rank_0():
            if self._wandb is not None:
                self._wandb.log({f"eval/{k}": v for k, v in {**logs, "global_step": steps}.items()})
            elif self._tensorboard is not None:
                for key, value in logs.items():
                    self._tensorboard.add_scalar(f"eval/{key}", value, steps)
        self.model.train()
        return logs
