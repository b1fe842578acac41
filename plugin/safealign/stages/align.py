"""The align stage: Safe-MM-DPO (or another registered loss) on the base policy, and its ablations.

Reads the recipe's preference data (with margins and costs when the RM stage scored it), trains the
policy through `SafeMMDPOTrainer` on OpenRLHF's DeepSpeed strategy, and leaves in its directory:
`model/` (the aligned policy, an HF checkpoint), `metrics.jsonl` (one line per step: both losses,
accuracies, β statistics, λ, Ĵ_C), `tensorboard/`, and the summary the runner stores in `stage.json`.
Each `align.ablations` entry (e.g. plain DPO on the safer labels) is trained the same way from the same
base policy on the same rows into `ablations/<name>/`, so the eval stage can put every variant on one
safety/helpfulness plane. A finished model is not trained again when an interrupted stage resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safealign import compat
from safealign import openrlhf_setup as setup
from safealign.cost_sampling import CostModel, PolicyCostSampler
from safealign.data import (
    Message,
    PreferenceRow,
    has_field,
    hold_out_prompts,
    load_rows,
    split_by_prompt,
    subset_by_prompt,
)
from safealign.errors import SafeAlignError
from safealign.eval.heldout import load_training_rows
from safealign.lagrange import LagrangeMultiplier
from safealign.length_grouping import pair_loader
from safealign.losses import LossSettings, get_loss
from safealign.models import merge_lora, resolve_model
from safealign.pair_dataset import PreferencePairDataset
from safealign.process import barrier
from safealign.recipe import Recipe, samples_policy_cost, sampling_variant
from safealign.ref_provenance import check_cached_reference, check_same_tokenizer, reference_provenance
from safealign.stages import StageContext, register_stage, run_once

log = logging.getLogger("safealign")


def build_loss(recipe: Recipe):
    align = recipe.align
    settings = LossSettings(
        beta_ori=align.beta_ori, w=align.w, k=align.k, dimension=align.dimension, options=align.loss_options
    )
    return get_loss(align.loss)(settings)


def build_lagrange(recipe: Recipe) -> LagrangeMultiplier:
    align = recipe.align
    return LagrangeMultiplier(
        init=align.lambda_init,
        lr=align.lambda_lr,
        max_value=align.lambda_max,
        threshold=None if align.cost_threshold == "initial" else align.cost_threshold,
        delay_steps=align.lambda_delay_steps,
        window=align.lambda_window,
    )


def _warn_about_missing_rm_outputs(loss, rows: list[PreferenceRow]) -> None:
    if {"w", "k"} & loss.reads and not (has_field(rows, "delta_h") or has_field(rows, "delta_s")):
        log.warning(
            "no RM margins (delta_h/delta_s) in the data: MM-DPO's β(δ) stays at beta_ori; run the rm stage first"
        )


def split_cost_pool(recipe: Recipe, rows: list[PreferenceRow]) -> tuple[list[list[Message]], list[PreferenceRow]]:
    """The prompts λ's Ĵ_C is sampled on, held out of `rows` (every pair of theirs leaves training).

    Held out when the recipe's align settings or any of their ablations sample Ĵ_C (sized by the first
    such variant's `cost_sampling.prompts`): every variant then trains on the same pairs as the others."""
    sampling = sampling_variant(recipe.align)
    if sampling is None:
        return [], rows
    pool, rest = hold_out_prompts(rows, sampling[1].cost_sampling.prompts, recipe.seed)
    log.info(
        "align: %d prompts held out to sample Ĵ_C on (%d of %d pairs not trained on)",
        len(pool), len(rows) - len(rest), len(rows),
    )  # fmt: skip
    return pool, rest


def cost_sampler(recipe: Recipe, pool, cost_model_dir: Path, args, strategy, tokenizer, out: Path):
    """Ĵ_C's sampler when these settings update λ from it, else None."""
    if not samples_policy_cost(recipe.align):
        return None
    if not pool:
        raise SafeAlignError("align: no prompt pool to sample Ĵ_C on (align.cost_sampling.prompts)")
    cost_model = CostModel(cost_model_dir, recipe, args, strategy)
    return PolicyCostSampler(pool, cost_model, recipe, tokenizer, strategy, out / "lambda_samples.jsonl")


def training_rows(ctx: StageContext) -> list[PreferenceRow]:
    """The RM stage's scored rows when the recipe runs it, else the recipe's data as given."""
    if "rm" in ctx.recipe.stages:
        from safealign.stages.rm import scored_rows_path

        return load_rows(scored_rows_path(ctx.run_dir), "pku_saferlhf")  # the rm stage checked its prompts
    return load_training_rows(ctx.recipe)


@register_stage("align", sections=("seed", "model", "data", "align", "deepspeed"), upstream=("rm",))
def run_align(ctx: StageContext) -> dict:
    """Safe-MM-DPO on the base policy (OpenRLHF DPOTrainer + DeepspeedStrategy)."""
    recipe, out = ctx.recipe, ctx.work_dir
    rows = training_rows(ctx)  # data errors first: before any model is loaded or converted
    policy_dir = resolve_model(recipe.model.policy)
    reference_dir = resolve_model(recipe.model.reference) if recipe.model.reference is not None else policy_dir
    summary = run_once(out, lambda: train_policy(recipe, rows, policy_dir, reference_dir, out, ctx.run_dir))
    ablations = {}
    for name in recipe.align.ablations:
        variant = recipe.model_copy(update={"align": recipe.align.ablation(name)})
        work = out / "ablations" / name
        log.info("align: ablation %s (loss %s, λ %s)", name, variant.align.loss, variant.align.lambda_update)

        def train(variant: Recipe = variant, work: Path = work) -> dict:
            return train_policy(variant, rows, policy_dir, reference_dir, work, ctx.run_dir, pool_from=recipe)

        ablations[name] = run_once(work, train)
    if ablations:
        kept = ("loss", "steps", "train_pairs", "final_lambda")
        summary["ablations"] = {
            name: {"model": f"ablations/{name}/model", **{k: s[k] for k in kept}} for name, s in ablations.items()
        }
    return summary


def train_policy(
    recipe: Recipe,
    rows: list[PreferenceRow],
    policy_dir: Path,
    reference_dir: Path,
    out: Path,
    run_dir: Path,
    pool_from: Recipe | None = None,
) -> dict:
    """Train `policy_dir` on `rows` with the recipe's `align` settings; the model lands in `out/model`.

    The align stage runs it on the base policy; the distill stage's dDPO on the dSFT student (with
    that student as its own reference). The Ĵ_C prompt pool is held out of `rows` as `pool_from`'s
    settings say (default: `recipe`; an ablation passes the recipe it varies). Reference log-probs
    stored in the rows are used when every row has them, and only if their provenance says they are
    `reference_dir`'s on this run's tokenization.
    """
    from safealign.stages.rm import cost_model_path
    from safealign.trainers.safe_mm_dpo import SafeMMDPOTrainer

    loss = build_loss(recipe)
    pool, rows = split_cost_pool(pool_from or recipe, rows)
    train_rows, eval_rows = split_by_prompt(rows, recipe.data.eval_fraction, recipe.seed)
    if recipe.align.max_pairs is not None:
        train_rows = subset_by_prompt(train_rows, recipe.align.max_pairs, recipe.seed)
    _warn_about_missing_rm_outputs(loss, train_rows)
    cached_ref = has_field(train_rows, "ref_logps_0") and (not eval_rows or has_field(eval_rows, "ref_logps_0"))

    args = setup.openrlhf_args(recipe, recipe.align, out)
    strategy = setup.make_strategy(args)
    model = setup.load_actor(policy_dir, args, strategy, trainable=True)
    tokenizer = setup.load_tokenizer(policy_dir, model, strategy)
    setup.configure_prompt_format(args, tokenizer, recipe)
    if cached_ref:
        expected = reference_provenance(reference_dir, tokenizer, recipe.data.max_len, recipe.data.input_template)
        check_cached_reference(train_rows + eval_rows, expected)
        ref_model = None
    else:
        if reference_dir != policy_dir:
            check_same_tokenizer(tokenizer, reference_dir, recipe.model.trust_remote_code)
        ref_model = setup.load_actor(reference_dir, args, strategy, trainable=False)
    sampler = cost_sampler(recipe, pool, cost_model_path(recipe, run_dir), args, strategy, tokenizer, out)

    train_set = PreferencePairDataset(train_rows, tokenizer, recipe.data.max_len, strategy, recipe.data.input_template)
    if train_set.dropped:
        log.warning(
            "dropped %d of %d pairs whose prompt fills data.max_len=%d",
            train_set.dropped,
            len(train_rows),
            recipe.data.max_len,
        )
    steps_per_epoch = len(train_set) // recipe.align.batch_size
    if steps_per_epoch == 0:
        raise SafeAlignError(
            f"align.batch_size={recipe.align.batch_size} exceeds the {len(train_set)} usable training pairs"
        )
    pin = compat.gpu_available()
    train_loader = pair_loader(strategy, train_set, recipe.align, pin)
    eval_loader = None
    if eval_rows:
        eval_set = PreferencePairDataset(
            eval_rows, tokenizer, recipe.data.max_len, strategy, recipe.data.input_template
        )
        eval_loader = strategy.setup_dataloader(
            eval_set, recipe.align.micro_batch_size, pin, False, eval_set.collate_fn, drop_last=False
        )

    total_steps = steps_per_epoch * recipe.align.epochs
    (model, optimizer, scheduler), ref_model = strategy.prepare(
        (model, setup.optimizer_config(args, total_steps)), ref_model
    )

    lagrange = build_lagrange(recipe)
    states = setup.resume_state(strategy, model, args)
    consumed = states.get("consumed_samples", 0)
    if states:
        lagrange.load_state_dict(states["lagrange"])

    log.info(
        "align: loss=%s, %d train / %d eval pairs, %d steps × %d pairs, reference log-probs %s",
        loss.name,
        len(train_set),
        len(eval_rows),
        total_steps,
        recipe.align.batch_size,
        "cached in the data" if cached_ref else "from the reference model",
    )
    trainer = SafeMMDPOTrainer(
        model,
        ref_model,
        strategy,
        tokenizer,
        optimizer,
        train_loader,
        eval_loader,
        scheduler,
        loss=loss,
        lagrange=lagrange,
        cost_sampler=sampler,
        lambda_update_every=recipe.align.lambda_update_every,
        metrics_path=out / "metrics.jsonl",
        max_norm=recipe.align.max_norm,
        max_epochs=recipe.align.epochs,
    )
    trainer.fit(args, consumed, steps_per_epoch)
    lora = recipe.model.lora.rank > 0
    # OpenRLHF saves only the adapter of a PEFT model: keep it, and merge a full checkpoint beside it.
    setup.publish_model(strategy, model, tokenizer, args, out / ("adapter" if lora else "model"))
    if lora and strategy.is_rank_0():
        merge_lora(policy_dir, out / "adapter", out / "model", recipe.model.trust_remote_code)
    barrier()
    return {
        "outputs": {
            "model": "model",
            "metrics": "metrics.jsonl",
            **({"adapter": "adapter"} if lora else {}),
            **({"lambda_samples": "lambda_samples.jsonl"} if sampler else {}),
        },
        "loss": loss.name,
        "cost_estimator": "sampled" if sampler else None,
        "cost_pool_prompts": len(pool),
        "train_pairs": len(train_set),
        "eval_pairs": len(eval_rows),
        "dropped_pairs": train_set.dropped,
        "steps": total_steps,
        "final_lambda": lagrange.value,
        "cost_threshold": lagrange.threshold,
        "reference_logps": "cached" if cached_ref else "model",
        "processes": strategy.world_size,
        "dtype": args.ds.param_dtype,
        "policy_dir": str(policy_dir),
        "reference_dir": None if cached_ref else str(reference_dir),
    }
