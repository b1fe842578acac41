"""Train a policy on preference pairs with the recipe's `align` settings: Safe-MM-DPO or any
registered loss, λ's dual update from the policy's sampled cost, OpenRLHF's DPO machinery.

The align stage runs it on the base policy (and each ablation); the distill stage's dDPO on the dSFT
student, which is its own reference. Three steps, as OpenRLHF's `cli/train_dpo.py` has them:
`build_policy_training` (settings, strategy, models, data, loss, λ), `fit`, `publish_policy`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from safealign.core.errors import SafeAlignError
from safealign.core.process import barrier, gpu_available
from safealign.domain.data import Message, PreferenceRow, has_field, relabel, split_by_prompt, subset_by_prompt
from safealign.domain.lagrange import LagrangeMultiplier
from safealign.losses import LossSettings, PreferenceLoss, get_loss
from safealign.models.provenance import check_cached_reference, check_same_tokenizer, reference_provenance
from safealign.models.resolve import merge_lora
from safealign.openrlhf import engine
from safealign.openrlhf.pair_dataset import PreferencePairDataset
from safealign.openrlhf.pair_sampler import pair_loader
from safealign.openrlhf.settings import Settings, build_settings
from safealign.recipe import AlignSection, Recipe, samples_policy_cost
from safealign.trainers.cost_sampling import CostModel, PolicyCostSampler
from safealign.trainers.safe_mm_dpo import SafeMMDPOTrainer
from safealign.workflows.rows import LabelSources, split_cost_pool

log = logging.getLogger("safealign")


def build_loss(align: AlignSection) -> PreferenceLoss:
    """The registered loss `align.loss` with its hyper-parameters."""
    settings = LossSettings(
        beta_ori=align.beta_ori, w=align.w, k=align.k, dimension=align.dimension, options=align.loss_options
    )
    return get_loss(align.loss)(settings)


def build_lagrange(align: AlignSection) -> LagrangeMultiplier:
    """λ with its schedule (`align.lambda_*`); an `initial` threshold (less its margin) is calibrated before step 1.
    A fixed λ is a dual step of size 0: sampled (`cost_sampling.in_fixed_runs`), it logs Ĵ_C against d and stays put."""
    return LagrangeMultiplier(
        init=align.lambda_init,
        lr=align.lambda_lr if align.lambda_update == "dual" else 0.0,
        max_value=align.lambda_max,
        threshold=None if align.cost_threshold == "initial" else align.cost_threshold,
        threshold_margin=align.cost_threshold_margin,
        delay_steps=align.lambda_delay_steps,
        window=align.lambda_window,
        update_every=align.lambda_update_every,
        step=align.lambda_step,
    )


@dataclass(frozen=True)
class PolicyRows:
    """The rows one policy training reads, split: train, eval, and the Ĵ_C prompt pool."""

    train: list[PreferenceRow]
    eval: list[PreferenceRow]
    cost_pool: list[list[Message]]

    @property
    def cached_reference(self) -> bool:
        """Every row carries the reference's log-probs: no reference model is loaded."""
        return has_field(self.train, "ref_logps_0") and (not self.eval or has_field(self.eval, "ref_logps_0"))


def policy_recipe(recipe: Recipe, align: AlignSection) -> Recipe:
    """The recipe one policy trains under: `align` (the recipe's own or an ablation's) in place, and its
    `align.seed`, when set, as the recipe's seed."""
    return recipe.model_copy(update={"align": align, "seed": recipe.seed if align.seed is None else align.seed})


def split_policy_rows(recipe: Recipe, rows: list[PreferenceRow], pairs_from: Recipe) -> PolicyRows:
    """The Ĵ_C pool as `pairs_from` (the run's recipe) draws it, the pairs of `recipe`'s `align.sources`,
    then the eval split and `align.max_pairs` with `pairs_from`'s seed (every seed of a variant trains on
    the same pairs), then on the training rows the labels `align.sources` takes from each file, and
    `recipe`'s `align.labels` with `recipe`'s seed (a control's flipped or coin-flipped preferences; eval
    keeps the labels as given). Labels are dropped after the subset so that a mapping form of
    `align.sources` trains on the same pairs as its list form, only fewer of their labels."""
    pool, rows = split_cost_pool(pairs_from, rows)
    sources = LabelSources.of(recipe)
    if sources is not None:
        rows = sources.pairs(rows)
    train, held = split_by_prompt(rows, pairs_from.data.eval_fraction, pairs_from.seed)
    if recipe.align.max_pairs is not None:
        train = subset_by_prompt(train, recipe.align.max_pairs, pairs_from.seed)
    if sources is not None:
        train = sources.labels(train)
    return PolicyRows(train=relabel(train, recipe.align.labels, recipe.seed), eval=held, cost_pool=pool)


@dataclass
class PolicyTraining:
    """One policy training, built and ready to fit: the trainer holds the strategy, the prepared model,
    the tokenizer, the loss and λ; beside it, what `fit` is called with and the summary so far."""

    settings: Settings
    trainer: SafeMMDPOTrainer
    consumed: int
    steps_per_epoch: int
    summary: dict


def build_policy_training(
    recipe: Recipe, rows: PolicyRows, policy_dir: Path, reference_dir: Path, cost_model_dir: Path | None, out: Path
) -> PolicyTraining:
    """Settings, strategy, policy (and reference unless the rows cache its log-probs), data loaders,
    loss, λ (restored from the newest checkpoint) and its cost sampler, wired into the trainer."""
    align = recipe.align
    loss = build_loss(align)
    if {"w", "k"} & loss.reads and not (has_field(rows.train, "delta_h") or has_field(rows.train, "delta_s")):
        log.warning("no RM margins (delta_h/delta_s) in the data: MM-DPO's β(δ) stays at beta_ori; run the rm stage first")
    cached_ref = rows.cached_reference

    args = build_settings(recipe, align, out, "dpo", model_dir=policy_dir, reference_dir=reference_dir)
    strategy = engine.make_strategy(args)
    model = engine.load_actor(policy_dir, args, strategy, trainable=True)
    tokenizer = engine.load_tokenizer(policy_dir, model, strategy)
    if cached_ref:
        expected = reference_provenance(reference_dir, tokenizer, recipe.data.max_len, recipe.data.input_template)
        check_cached_reference(rows.train + rows.eval, expected)
        ref_model = None
    else:
        if reference_dir != policy_dir:
            check_same_tokenizer(tokenizer, reference_dir, recipe.model.trust_remote_code)
        ref_model = engine.load_actor(reference_dir, args, strategy, trainable=False)
    sampler = None
    if samples_policy_cost(align):
        if not rows.cost_pool:
            raise SafeAlignError("align: no prompt pool to sample Ĵ_C on (align.cost_sampling.prompts)")
        if cost_model_dir is None:
            raise SafeAlignError("align samples the policy's cost with a cost model: add rm to stages or set model.cost_model")
        cost_model = CostModel(cost_model_dir, recipe, args, strategy)
        sampler = PolicyCostSampler(rows.cost_pool, cost_model, recipe, tokenizer, strategy, out / "lambda_samples.jsonl")

    def dataset(of: list[PreferenceRow]) -> PreferencePairDataset:
        return PreferencePairDataset(of, tokenizer, recipe.data.max_len, strategy, recipe.data.input_template)

    train_set = dataset(rows.train)
    if train_set.dropped:
        log.warning("dropped %d of %d pairs whose prompt fills data.max_len=%d",
                    train_set.dropped, len(rows.train), recipe.data.max_len)  # fmt: skip
    steps_per_epoch = len(train_set) // align.batch_size
    if steps_per_epoch == 0:
        raise SafeAlignError(f"align.batch_size={align.batch_size} exceeds the {len(train_set)} usable training pairs")
    pin = gpu_available()
    train_loader = pair_loader(strategy, train_set, align, pin)
    eval_loader = None
    if rows.eval:
        eval_set = dataset(rows.eval)
        eval_loader = strategy.setup_dataloader(
            eval_set, align.micro_batch_size, pin, False, eval_set.collate_fn, drop_last=False
        )
    total_steps = steps_per_epoch * align.epochs
    (model, optimizer, scheduler), ref_model = strategy.prepare(
        (model, engine.optimizer_config(args, total_steps)), ref_model
    )

    lagrange = build_lagrange(align)
    states = engine.resume_state(strategy, model, args)
    if states:
        lagrange.load_state_dict(states["lagrange"])
    trainer = SafeMMDPOTrainer(
        model, ref_model, strategy, tokenizer, optimizer, train_loader, eval_loader, scheduler,
        settings=args, loss=loss, lagrange=lagrange, cost_sampler=sampler, metrics_path=out / "metrics.jsonl",
    )  # fmt: skip
    log.info("align: loss=%s (%s), %d train / %d eval pairs, %d steps × %d pairs, reference log-probs %s%s",
             loss.name, loss.summary(), len(train_set), len(rows.eval), total_steps, align.batch_size,
             "cached in the data" if cached_ref else "from the reference model",
             "" if align.labels == "given" else f", labels {align.labels} (a control)")  # fmt: skip
    summary = {
        "loss": loss.name,
        "labels": align.labels,
        "cost_estimator": "sampled" if sampler else None,
        "cost_pool_prompts": len(rows.cost_pool),
        "train_pairs": len(train_set),
        "eval_pairs": len(rows.eval),
        "dropped_pairs": train_set.dropped,
        "steps": total_steps,
        "reference_logps": "cached" if cached_ref else "model",
        "processes": strategy.world_size,
        "dtype": args.ds.param_dtype,
        "policy_dir": str(policy_dir),
        "reference_dir": None if cached_ref else str(reference_dir),
    }
    return PolicyTraining(
        settings=args, trainer=trainer, consumed=states.get("consumed_samples", 0), steps_per_epoch=steps_per_epoch,
        summary=summary,
    )


def publish_policy(run: PolicyTraining, recipe: Recipe, policy_dir: Path, out: Path) -> dict[str, str]:
    """The trained policy to `out/model` (atomically); with LoRA, OpenRLHF saves only the adapter: keep
    it in `out/adapter` and merge a full checkpoint beside it. Returns the outputs, relative to `out`."""
    lora, trainer = run.settings.ds.lora.rank > 0, run.trainer
    engine.publish_model(trainer.strategy, trainer.model, trainer.tokenizer, run.settings, out / ("adapter" if lora else "model"))
    if lora and trainer.strategy.is_rank_0():
        merge_lora(policy_dir, out / "adapter", out / "model", recipe.model.trust_remote_code)
    barrier()
    return {
        "model": "model",
        "metrics": "metrics.jsonl",
        **({"adapter": "adapter"} if lora else {}),
        **({"lambda_samples": "lambda_samples.jsonl"} if trainer.cost_sampler else {}),
    }


def train_policy(
    recipe: Recipe, rows: PolicyRows, policy_dir: Path, reference_dir: Path, cost_model_dir: Path | None, out: Path
) -> dict:
    """Train `policy_dir` on `rows` with the recipe's `align` settings; the model lands in `out/model`.
    Reference log-probs stored in the rows are used when every row has them, and only if their
    provenance says they are `reference_dir`'s on this run's tokenization. Returns the summary."""
    run = build_policy_training(recipe, rows, policy_dir, reference_dir, cost_model_dir, out)
    run.trainer.fit(run.settings, run.consumed, run.steps_per_epoch)
    outputs = publish_policy(run, recipe, policy_dir, out)
    engine.release(run.trainer.model, run.trainer.ref_model)
    return {
        "outputs": outputs,
        **run.summary,
        "final_lambda": run.trainer.lagrange.value,
        "cost_threshold": run.trainer.lagrange.threshold,
    }
