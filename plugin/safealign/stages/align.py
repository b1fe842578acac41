"""The align stage: Safe-MM-DPO (or another registered loss) on the base policy, and its ablations.

Reads the rm stage's scored pairs (margins, costs, cached reference log-probs) when the recipe runs
it, else the recipe's data; trains the policy through `safealign.workflows.policy` (OpenRLHF's DPO
machinery on its DeepSpeed strategy) and leaves in its directory: `model/` (the aligned policy, an HF
checkpoint), `metrics.jsonl` (one line per step: both losses, accuracies, β statistics, λ, Ĵ_C),
`tensorboard/`, and the summary the runner stores in `stage.json`. Each `align.ablations` entry (e.g.
plain DPO on the safer labels) is trained the same way from the same base policy on the same rows
into `ablations/<name>/`, so the eval stage can put every variant on one safety/helpfulness plane. A
finished model is not trained again when an interrupted stage resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safealign.losses import get_loss
from safealign.models.resolve import policy_and_reference
from safealign.recipe import Recipe
from safealign.stages import StageContext, cost_model_dir, register_stage, run_once, run_training_rows
from safealign.workflows.policy import policy_recipe, split_policy_rows, train_policy

log = logging.getLogger("safealign")


@register_stage("align")
def run_align(ctx: StageContext) -> dict:
    """align.loss (Safe-MM-DPO by default) and every ablation on the base policy, via OpenRLHF's DPOTrainer.

    The first line is what the run logs when the stage starts: it names the recipe's loss generically,
    since the trainer's own log line names the one actually trained."""
    recipe, out = ctx.recipe, ctx.work_dir
    # What it needs: data errors first, before any model is loaded or converted
    rows = run_training_rows(ctx)
    policy_dir, reference_dir = policy_and_reference(recipe.model)
    cost_model = cost_model_dir(ctx)
    # What it runs
    main = policy_recipe(recipe, recipe.align)
    split = split_policy_rows(main, rows, pairs_from=recipe)
    summary = run_once(out, lambda: train_policy(main, split, policy_dir, reference_dir, cost_model, out))
    ablations = {}
    for name in recipe.align.ablations:
        variant = policy_recipe(recipe, recipe.align.ablation(name))
        work = out / "ablations" / name
        lam = f", λ {variant.align.lambda_update}" if get_loss(variant.align.loss).uses_lambda else ""
        log.info("align: ablation %s (loss %s%s, labels %s, seed %d)", name, variant.align.loss, lam,
                 variant.align.labels, variant.seed)  # fmt: skip

        def train(variant: Recipe = variant, work: Path = work) -> dict:
            rows_of_variant = split_policy_rows(variant, rows, pairs_from=recipe)
            return train_policy(variant, rows_of_variant, policy_dir, reference_dir, cost_model, work)

        ablations[name] = run_once(work, train)
    # What it publishes (beside model/ and metrics.jsonl: the ablations' models)
    if ablations:
        kept = ("loss", "steps", "train_pairs", "final_lambda")
        summary["ablations"] = {
            name: {"model": f"ablations/{name}/model", **{k: s[k] for k in kept}} for name, s in ablations.items()
        }
    return summary
