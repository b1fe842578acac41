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
from safealign.data import PreferenceRow, has_field, load_rows, split_by_prompt
from safealign.errors import SafeAlignError
from safealign.eval.heldout import load_training_rows
from safealign.lagrange import LagrangeMultiplier
from safealign.losses import LossSettings, get_loss
from safealign.models import merge_lora, resolve_model
from safealign.pair_dataset import PreferencePairDataset
from safealign.process import barrier
from safealign.recipe import Recipe
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
        threshold=align.cost_threshold,
        delay_steps=align.lambda_delay_steps,
        window=align.lambda_window,
    )


def _warn_about_missing_rm_outputs(recipe: Recipe, loss, rows: list[PreferenceRow]) -> None:
    if {"w", "k"} & loss.reads and not (has_field(rows, "delta_h") or has_field(rows, "delta_s")):
        log.warning(
            "no RM margins (delta_h/delta_s) in the data: MM-DPO's β(δ) stays at beta_ori; run the rm stage first"
        )
    if loss.uses_lambda and recipe.align.lambda_update == "dual" and not has_field(rows, "cost_0"):
        log.warning("no per-response costs (cost_0/cost_1) in the data: λ cannot be updated and stays at lambda_init")


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
    summary = run_once(out, lambda: train_policy(recipe, rows, policy_dir, reference_dir, out))
    ablations = {}
    for name in recipe.align.ablations:
        variant = recipe.model_copy(update={"align": recipe.align.ablation(name)})
        work = out / "ablations" / name
        log.info("align: ablation %s (loss %s, λ %s)", name, variant.align.loss, variant.align.lambda_update)
        train = lambda variant=variant, work=work: train_policy(variant, rows, policy_dir, reference_dir, work)  # noqa: E731
        ablations[name] = run_once(work, train)
    if ablations:
        summary["ablations"] = {
            name: {"model": f"ablations/{name}/model", **{k: s[k] for k in ("loss", "steps", "final_lambda")}}
            for name, s in ablations.items()
        }
    return summary


def train_policy(recipe: Recipe, rows: list[PreferenceRow], policy_dir: Path, reference_dir: Path, out: Path) -> dict:
    """Train `policy_dir` on `rows` with the recipe's `align` settings; the model lands in `out/model`.

    The align stage runs it on the base policy; the distill stage's dDPO on the dSFT student (with
    that student as its own reference). Reference log-probs stored in the rows are used when every row
    has them, so they must belong to `reference_dir`.
    """
    from safealign.trainers.safe_mm_dpo import SafeMMDPOTrainer

    loss = build_loss(recipe)
    train_rows, eval_rows = split_by_prompt(rows, recipe.data.eval_fraction, recipe.seed)
    _warn_about_missing_rm_outputs(recipe, loss, train_rows)
    cached_ref = has_field(train_rows, "ref_logps_0") and (not eval_rows or has_field(eval_rows, "ref_logps_0"))

    args = setup.openrlhf_args(recipe, recipe.align, out)
    strategy = setup.make_strategy(args)
    model = setup.load_actor(policy_dir, args, strategy, trainable=True)
    tokenizer = setup.load_tokenizer(policy_dir, model, strategy)
    setup.configure_prompt_format(args, tokenizer, recipe)
    ref_model = None if cached_ref else setup.load_actor(reference_dir, args, strategy, trainable=False)

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
    train_loader = strategy.setup_dataloader(train_set, recipe.align.micro_batch_size, pin, True, train_set.collate_fn)
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
        update_lambda=recipe.align.lambda_update == "dual",
        metrics_path=out / "metrics.jsonl",
        max_norm=recipe.align.max_norm,
        max_epochs=recipe.align.epochs,
    )
    trainer.fit(args, consumed, steps_per_epoch)
    lora = recipe.model.lora.rank > 0
    # OpenRLHF saves only the adapter of a PEFT model: keep it, and merge a full checkpoint beside it.
    setup.publish_model(strategy, model, tokenizer, args, out / ("adapter" if lora else "model"))
    if lora and strategy.is_rank_0():
        merge_lora(policy_dir, out / "adapter", out / "model")
    barrier()
    return {
        "outputs": {"model": "model", "metrics": "metrics.jsonl", **({"adapter": "adapter"} if lora else {})},
        "loss": loss.name,
        "train_pairs": len(train_set),
        "eval_pairs": len(eval_rows),
        "dropped_pairs": train_set.dropped,
        "steps": total_steps,
        "final_lambda": lagrange.value,
        "reference_logps": "cached" if cached_ref else "model",
        "processes": strategy.world_size,
        "dtype": args.ds.param_dtype,
        "policy_dir": str(policy_dir),
        "reference_dir": None if cached_ref else str(reference_dir),
    }
