"""The training loop shared by our OpenRLHF trainer subclasses.

OpenRLHF's `DPOTrainer.fit` and `RewardModelTrainer.fit` are one loop each with the loss inlined. Our
trainers need a different loss, extra per-row inputs and per-step hooks (λ), so `StepLoop` is that
loop with the loss as a method: the same sampler/epoch/resume bookkeeping, `strategy.backward` /
`optimizer_step`, and OpenRLHF's `save_logs_and_checkpoints` (TensorBoard, wandb, DeepSpeed
checkpoints), plus statistics reduced over micro-batches and ranks into `metrics.jsonl`.
Every epoch is exactly `num_update_steps_per_epoch` optimizer steps, which is what the LR scheduler
was sized for, and what makes resume arithmetic exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import torch
from tqdm import tqdm

from safealign.core.errors import SafeAlignError
from safealign.domain.metrics import MetricsLog, StatsAccumulator
from safealign.openrlhf.settings import Settings, for_fit


def global_batches(loader: Iterable, size: int) -> Iterator[list]:
    """The loader's micro-batches in groups of `size`, one group per optimizer step; a short tail is
    dropped (the LR schedule was sized for whole steps)."""
    group: list = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


class StepLoop:
    """Mixin for an OpenRLHF trainer: implement `batch_loss`; optionally `begin_global_batch`,
    `after_step`, `client_state`.

    The loop holds one optimizer step's micro-batches before the first forward (token ids only), so a
    loss can be normalised over the whole global batch (`begin_global_batch`) rather than per
    micro-batch, which would make its weighting depend on how rows fall into micro-batches.
    """

    #: Shown on the progress bar; everything else goes to metrics.jsonl / TensorBoard / wandb.
    bar_keys: tuple[str, ...] = ("loss",)
    #: Statistics that are a micro-batch's share of a global quantity: summed, not averaged.
    summed_stats: frozenset[str] = frozenset()
    progress_name: str = "train"
    metrics: MetricsLog

    def batch_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch to back-propagate, and its statistics."""
        raise NotImplementedError

    def begin_global_batch(self, micro_batches: list) -> None:
        """Called with all micro-batches of one optimizer step (of this rank) before any forward, and
        with the whole held-out set before an evaluation."""

    def after_step(self, global_step: int, logs: dict[str, float]) -> None:
        """Called once per optimizer step with the step's reduced statistics (may add to them)."""

    def client_state(self) -> dict:
        """Extra state saved in DeepSpeed checkpoints beside `consumed_samples`."""
        return {}

    def fit(self, args: Settings, consumed_samples: int = 0, num_update_steps_per_epoch: int | None = None) -> None:
        """OpenRLHF's `fit` signature; `args` are the frozen settings the trainer was built from."""
        accumulation = self.strategy.accumulated_gradient
        if num_update_steps_per_epoch is None:
            num_update_steps_per_epoch = len(self.train_dataloader) // accumulation
        if num_update_steps_per_epoch <= 0:
            raise SafeAlignError("fewer training pairs than one global batch: lower the batch_size or add data")
        args = for_fit(args, num_update_steps_per_epoch)
        self.num_update_steps_per_epoch = num_update_steps_per_epoch  # RewardModelTrainer's eval cadence reads it

        global_step = consumed_samples // args.train.batch_size
        start_epoch = global_step // num_update_steps_per_epoch
        consumed_samples %= num_update_steps_per_epoch * args.train.batch_size
        self.metrics.truncate_after(global_step)
        accumulator = StatsAccumulator(self.summed_stats)

        for epoch in range(start_epoch, self.epochs):
            resumed = consumed_samples if epoch == start_epoch else 0
            done = resumed // args.train.batch_size  # optimizer steps of this epoch already taken
            sampler = self.train_dataloader.sampler
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch, consumed_samples=resumed)
            step_bar = tqdm(
                total=num_update_steps_per_epoch * accumulation,
                initial=done * accumulation,
                desc=f"{self.progress_name} epoch {epoch + 1}/{self.epochs}",
                disable=not self.strategy.is_rank_0(),
            )
            self.model.train()
            steps = islice(global_batches(self.train_dataloader, accumulation), num_update_steps_per_epoch - done)
            for micro_batches in steps:
                self.begin_global_batch(micro_batches)
                for batch in micro_batches:
                    loss, stats = self.batch_loss(batch)
                    self.strategy.backward(loss, self.model, self.optimizer)
                    self.strategy.optimizer_step(self.optimizer, self.model, self.scheduler)
                    accumulator.add(stats)
                    step_bar.update()
                global_step += 1
                logs = accumulator.reduce(self.strategy)
                self.after_step(global_step, logs)
                logs["lr"] = self.scheduler.get_last_lr()[0]
                logs["grad_norm"] = self.strategy.get_grad_norm(self.model)
                self.metrics.write({"step": global_step, "epoch": epoch, **logs})
                step_bar.set_postfix({k: f"{logs[k]:.4g}" for k in self.bar_keys if k in logs})
                client_states = {"consumed_samples": global_step * args.train.batch_size, **self.client_state()}
                self.save_logs_and_checkpoints(args, global_step, step_bar, logs, client_states)
            step_bar.close()

        if self._wandb is not None and self.strategy.is_rank_0():
            self._wandb.finish()
        if self._tensorboard is not None and self.strategy.is_rank_0():
            self._tensorboard.close()

    def evaluate(self, eval_dataloader, steps: int = 0) -> dict[str, float]:
        """Held-out statistics of `batch_loss` (replaces the OpenRLHF trainer's own evaluate)."""
        self.model.eval()
        accumulator = StatsAccumulator(self.summed_stats)
        batches = list(eval_dataloader)  # token ids only; the whole held-out set is one "global batch"
        self.begin_global_batch(batches)
        with torch.no_grad():
            for batch in tqdm(batches, desc=f"eval at step {steps}", disable=not self.strategy.is_rank_0()):
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
