"""`SafeMMDPOTrainer`: OpenRLHF's `DPOTrainer` with a registry loss and Safe RLHF's dual update.

What is OpenRLHF's and reused as is: the DeepSpeed engine and its `backward`/`optimizer_step`,
`concatenated_inputs` (both responses in one forward), `_get_batch_logps`, the sampler/epoch/resume
bookkeeping, `save_logs_and_checkpoints` (TensorBoard, wandb, DeepSpeed checkpoints).
What is ours: the batch carries labels and margins (`PairExtras`); the loss comes from
`safealign.losses` (so `dpo`, `mm_dpo` and `safe_mm_dpo` share this one code path) and replaces
OpenRLHF's `DPOLoss` as the trainer's `loss_fn`; every `align.lambda_update_every` optimizer steps
(`LagrangeMultiplier.due`) the policy answers a fixed prompt pool, the cost model scores the
answers (`safealign.trainers.cost_sampling`) and λ takes one dual step from that Ĵ_C; λ rides in the checkpoint.

One weighting whatever the batching: before a step's first forward the loop hands this trainer all of
the step's micro-batches; it counts the rows labelled for each dimension over them and over all ranks,
and every micro-batch's loss is its share of the global-batch objective
`L_H/(1+λ) + λ·L_S/(1+λ)` (each term a mean over the global batch's labelled rows). DeepSpeed averages
gradients over micro-batches and ranks, so the share is multiplied by their number before backward:
the gradient is exactly that of the global-batch objective, and the logged `loss` (the shares summed)
is the formula evaluated on the logged `loss_h`, `loss_s` and `lambda`.

Per micro-batch there is one policy forward over both responses and, unless the rows carry cached
reference log-probs, one reference forward: both objectives read the same four log-prob sums.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from safealign.core.errors import SafeAlignError
from safealign.domain.lagrange import LagrangeMultiplier
from safealign.domain.metrics import MetricsLog
from safealign.losses import PreferenceBatch, PreferenceLoss
from safealign.openrlhf import DPOTrainer
from safealign.openrlhf.pair_dataset import PairExtras
from safealign.openrlhf.pair_forward import PairLogProbs
from safealign.openrlhf.settings import Settings
from safealign.trainers.cost_sampling import PolicyCostSampler
from safealign.trainers.loop import StepLoop

log = logging.getLogger("safealign")

#: λ counts as inert when a violation of one standard deviation of the pool's answer costs, held for the whole
#: run, moves it by less than this factor (a quarter): the dual update is then a constant λ in all but name.
INERT_REACH = 1.25


class SafeMMDPOTrainer(StepLoop, DPOTrainer):
    """Safe-MM-DPO (or any registered preference loss) through OpenRLHF's DPO machinery."""

    bar_keys = ("loss", "loss_h", "loss_s", "acc_h", "acc_s", "lambda", "cost_estimate")
    summed_stats = frozenset({"loss"})
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
        settings: Settings,
        loss: PreferenceLoss,
        lagrange: LagrangeMultiplier,
        cost_sampler: PolicyCostSampler | None,
        metrics_path: Path,
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
            max_norm=settings.max_norm,
            beta=settings.model.beta,
            max_epochs=settings.train.max_epochs,
            save_hf_ckpt=settings.ckpt.save_hf,
            disable_ds_ckpt=settings.ckpt.disable_ds,
        )
        self.loss_fn = loss  # in place of the DPOLoss OpenRLHF's constructor built: the one loss trained
        if not loss.uses_lambda:  # the bar shows what is trained: no λ where the loss has none
            self.bar_keys = tuple(k for k in self.bar_keys if k not in ("lambda", "cost_estimate"))
        self.lagrange = lagrange
        self.cost_sampler = cost_sampler  # None where λ is fixed or unused (the workflow that builds the trainer decides)
        self.metrics = MetricsLog(metrics_path, enabled=strategy.is_rank_0())
        self.device = next(self.model.parameters()).device
        self.pair_logps = PairLogProbs(tokenizer, strategy, self.device)
        self.global_counts: tuple[int, int] | None = None
        self.padding = 0.0  # share of the step's computed tokens that were padding (align.group_by_length)
        self.micro_batches_per_step = 1

    def fit(self, args, consumed_samples: int = 0, num_update_steps_per_epoch: int | None = None) -> None:
        if self.cost_sampler is not None:
            # Resumed: keep the estimates up to the checkpoint. Started afresh (no checkpoint yet): keep
            # nothing an earlier, killed attempt logged — its step-0 calibration included, which this
            # start measures again.
            resumed_at = consumed_samples // args.train.batch_size
            self.cost_sampler.samples_log.truncate_after(resumed_at if consumed_samples else -1)
            if self.lagrange.threshold is None:  # align.cost_threshold: initial (a resumed run has it)
                self.calibrate_threshold()
        super().fit(args, consumed_samples, num_update_steps_per_epoch)

    def calibrate_threshold(self) -> None:
        """d = Ĵ_C of the policy before its first step (less `align.cost_threshold_margin`), sampled and
        scored like every later estimate (logged as step 0 of lambda_samples.jsonl): λ then rises only if
        training leaves the policy's answers costlier than that, whatever the cost model's offset."""
        sample = self.cost_sampler.estimate(self.model.model, 0, threshold=None)
        threshold = self.lagrange.calibrate(sample.mean_cost)
        self.cost_sampler.record(0, replace(sample, threshold=threshold), self.lagrange.value)

    def begin_global_batch(self, micro_batches: list) -> None:
        """Count the rows labelled for each dimension over all micro-batches and all ranks (and, for the
        log, the step's tokens: real ones and those its forwards compute, padding included)."""
        extras: list[PairExtras] = [batch[-1] for batch in micro_batches]
        counts = torch.tensor(
            [
                sum(int((e.better_id >= 0).sum()) for e in extras),
                sum(int((e.safer_id >= 0).sum()) for e in extras),
                sum(int(b[1].sum() + b[3].sum()) for b in micro_batches),
                # concatenated_inputs pads both responses to the longer one: 2·rows·length per forward
                sum(2 * b[0].shape[0] * max(b[0].shape[-1], b[2].shape[-1]) for b in micro_batches),
            ],
            dtype=torch.float64,
        )
        world = getattr(self.strategy, "world_size", 1)
        if world > 1:
            counts = self.strategy.all_reduce(counts, op="sum")
        self.global_counts = (int(counts[0]), int(counts[1]))
        self.padding = 1.0 - float(counts[2] / counts[3])
        self.micro_batches_per_step = len(micro_batches) * world

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

    def batch_inputs(self, batch) -> PreferenceBatch:
        """What the loss reads: summed response log-probs of policy and reference, both labels, and each
        dimension's own RM margin (δ_H drives β_H, δ_S drives β_S)."""
        extras: PairExtras = batch[-1]
        policy_0, policy_1, _, _ = self.pair_logps(self.model, batch)
        ref_0, ref_1 = self.reference_logps(batch)
        count_h, count_s = self.global_counts if self.global_counts is not None else (None, None)
        return PreferenceBatch(
            policy_logps_0=policy_0,
            policy_logps_1=policy_1,
            ref_logps_0=ref_0,
            ref_logps_1=ref_1,
            better_id=extras.better_id.to(self.device),
            safer_id=extras.safer_id.to(self.device),
            delta_h=extras.delta_h.to(self.device).nan_to_num(0.0),
            delta_s=extras.delta_s.to(self.device).nan_to_num(0.0),
            global_count_h=count_h,
            global_count_s=count_s,
        )

    def batch_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the global objective at the current λ (scaled for DeepSpeed's
        averaging), and its statistics (`loss`: the unscaled share, summed over the step when logged)."""
        share, stats = self.loss_fn(self.batch_inputs(batch), self.lagrange.value)
        stats = {**stats, "loss": share.item()} | ({"lambda": self.lagrange.value} if self.loss_fn.uses_lambda else {})
        return share * self.micro_batches_per_step, stats

    def after_step(self, global_step: int, logs: dict[str, float]) -> None:
        """Safe RLHF's dual update when λ is due, from the policy's sampled cost."""
        if self.cost_sampler is not None and self.lagrange.due(global_step):
            sample = self.cost_sampler.estimate(self.model.model, global_step, self.lagrange.threshold)
            if self.lagrange.num_updates == 0:
                self.warn_if_inert(sample.cost_spread)
            self.lagrange.update(sample.mean_cost)
            logs.update(
                cost_sampled=sample.mean_cost,
                cost_estimate=self.lagrange.cost_estimate,
                cost_above_threshold=sample.above_threshold,
                cost_threshold=self.lagrange.threshold,  # each run's own d under `initial` (the plots draw it)
                cost_sample_seconds=sample.seconds,
            )
            self.cost_sampler.record(global_step, sample, self.lagrange.value)
        logs["lambda_next"] = self.lagrange.value
        logs["padding"] = self.padding

    def warn_if_inert(self, spread: float) -> None:
        """Before λ's first step, whether λ_lr lets λ act at all on this cost model's scale. The step (on log λ,
        λ_lr·(Ĵ_C − d)·λ; on λ, λ_lr·(Ĵ_C − d)) is in cost-model units, so one λ_lr is brisk on one cost model
        and inert on another (the seed's 0.01 moves λ by about 1 % per update at a violation of 1; the pooled cost model spreads
        answers' costs by σ ≈ 1 on the evidence data and ≈ 3 on the quickstart's). The scale is `spread`, the standard deviation of the pool's answer costs: a
        violation that large — far more than training moves the mean — held for every update of the run must
        move λ by a quarter, or λ is a constant in all but name. Said once, with the λ_lr that would double λ
        per update at such a violation."""
        lagrange = self.lagrange
        updates = self.num_update_steps_per_epoch * self.epochs // lagrange.update_every
        factor = lagrange.reach(spread, updates)
        if lagrange.lr == 0 or spread == 0 or factor >= INERT_REACH or not self.strategy.is_rank_0():
            return
        log.warning(
            "align: λ barely moves at align.lambda_lr %g: a violation of one standard deviation of the pool's "
            "answer costs (%.3g), held for all %d updates, moves λ by ×%.3g; align.lambda_lr ≈ %.2g would double "
            'λ at every update at that violation (docs/algorithm.md, "Sizing λ_lr")',
            lagrange.lr, spread, updates, factor, lagrange.doubling_lr(spread),
        )  # fmt: skip

    def client_state(self) -> dict:
        return {"lagrange": self.lagrange.state_dict()}
