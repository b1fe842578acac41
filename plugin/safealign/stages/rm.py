"""The RM stage: train the Helpful-RM and the cost model, then score every training pair once.

The align stage never runs a reward model: it reads what this stage writes to `rm/scored.jsonl`,
one line per usable training row with
- `delta_h = r(better) − r(other)` and `delta_s = c(unsafer) − c(safer)`: margins in each label's
  direction, so a positive margin means the model agrees with the human label (0 where the row has no
  label for that dimension: the loss never reads it);
- `cost_0`, `cost_1`: the cost model's verdict per response (> 0 means unsafe), for Ĵ_C;
- optionally `ref_logps_0`, `ref_logps_1`: the reference policy's summed response log-probs, computed by
  the align trainer's own code on the policy's tokenization, so align can skip the reference model
  entirely; `ref_logps_provenance` says what produced them (align refuses numbers it would not compute).
Held-out accuracy of both models (prompts neither trained on) goes to `rm/metrics.json`.

Rows whose safer response is labelled unsafe while the other is labelled safe contradict themselves
(the pairwise and sign terms would pull against each other): they are left out of cost-model training,
counted and reported, as Safe RLHF's data pipeline also refuses them. They are still scored.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from safealign.core.errors import SafeAlignError
from safealign.core.files import write_text_atomically
from safealign.core.process import is_rank_0
from safealign.domain.data import PreferenceRow, held_out_indices
from safealign.eval.statistics import wilson_interval
from safealign.models.resolve import resolve_model
from safealign.recipe import RewardModelSection
from safealign.stages import StageContext, register_stage
from safealign.trainers.reward import CostModelTrainer, HelpfulRMTrainer
from safealign.workflows.heldout import heldout_rows, load_training_rows
from safealign.workflows.inference import reference_logps, score_with_value_model
from safealign.workflows.pooled_cost import fit_pooled_cost_model
from safealign.workflows.value_model import train_value_model

log = logging.getLogger("safealign")


def is_contradictory(row: PreferenceRow) -> bool:
    """The safer response is labelled unsafe while the other one is labelled safe."""
    if row.safer_response_id < 0 or row.is_response_0_safe is None or row.is_response_1_safe is None:
        return False
    safer_safe = row.is_response_0_safe if row.safer_response_id == 0 else row.is_response_1_safe
    other_safe = row.is_response_1_safe if row.safer_response_id == 0 else row.is_response_0_safe
    return not safer_safe and other_safe


def oriented_margin(values: tuple[float, float], preferred_id: int, higher_is_better: bool = True) -> float:
    """The model's margin in the label's direction (positive: it agrees with the label); 0 without a label."""
    if preferred_id < 0:
        return 0.0
    preferred, other = values[preferred_id], values[1 - preferred_id]
    return preferred - other if higher_is_better else other - preferred


def margins(row: PreferenceRow, rewards: tuple[float, float], costs: tuple[float, float]) -> dict[str, float]:
    """A row's margins in each label's direction and its two costs, as `scored.jsonl` stores them."""
    return {
        "delta_h": oriented_margin(rewards, row.better_response_id),
        "delta_s": oriented_margin(costs, row.safer_response_id, higher_is_better=False),
        "cost_0": costs[0],
        "cost_1": costs[1],
    }


def held_out_metrics(rows: list[PreferenceRow], indices: list[int], scored: dict[int, dict]) -> dict:
    """Pairwise accuracy of both models and the cost model's sign accuracy on rows they did not train on."""
    helpful = [scored[i]["delta_h"] > 0 for i in indices if i in scored and rows[i].better_response_id >= 0]
    cost = [scored[i]["delta_s"] > 0 for i in indices if i in scored and rows[i].safer_response_id >= 0]
    signs = [
        (scored[i][f"cost_{j}"] > 0) == (not getattr(rows[i], f"is_response_{j}_safe"))
        for i in indices
        if i in scored
        for j in (0, 1)
        if getattr(rows[i], f"is_response_{j}_safe") is not None
    ]

    def share(flags: list[bool]) -> float | None:
        return round(sum(flags) / len(flags), 4) if flags else None

    def interval(flags: list[bool]) -> list[float] | None:
        return [round(x, 4) for x in wilson_interval(sum(flags), len(flags))] if flags else None

    return {
        "held_out_rows": len(indices),
        "helpful": {"pair_accuracy": share(helpful), "pair_interval": interval(helpful), "pairs": len(helpful)},
        "cost": {
            "pair_accuracy": share(cost),
            "pair_interval": interval(cost),
            "pairs": len(cost),
            "sign_accuracy": share(signs),
            "sign_interval": interval(signs),
            "responses": len(signs),
        },
    }


@register_stage("rm")
def run_rm(ctx: StageContext) -> dict:
    """Helpful-RM (fine-tuned) and cost model (pooled head solved, or fine-tuned); every pair scored once."""
    recipe, out, rm = ctx.recipe, ctx.work_dir, ctx.recipe.rm
    # What it needs
    rows = load_training_rows(recipe)
    held_out = held_out_indices(rows, rm.eval_fraction, recipe.seed)
    train_rows = [row for i, row in enumerate(rows) if i not in held_out]
    contradictory = [row for row in rows if is_contradictory(row)]
    if contradictory:
        log.warning("rm: %d rows label the safer response unsafe and the other safe (e.g. %s): "
                    "left out of cost-model training, still scored", len(contradictory), contradictory[0].source)  # fmt: skip
    helpful_rows = [row for row in train_rows if row.better_response_id >= 0]
    cost_rows = [row for row in train_rows if row.safer_response_id >= 0 and not is_contradictory(row)]
    if not helpful_rows or not cost_rows:
        raise SafeAlignError("rm: the data needs rows with better_response_id and rows with safer_response_id")

    def base(section: RewardModelSection) -> Path:
        """`rm.<name>.base`, else the policy: the model a value head is trained on."""
        return resolve_model(section.base if section.base is not None else recipe.model.policy, recipe.model.trust_remote_code)

    # What it runs: both models trained, then every row scored once
    helpful_dir = train_value_model(
        recipe, "rm.helpful", rm.helpful, base(rm.helpful), HelpfulRMTrainer, helpful_rows, out / "helpful"
    )
    cost_fit = None
    if rm.cost.head == "pooled":
        cost_dir, cost_fit = fit_pooled_cost_model(recipe, rm.cost, base(rm.cost), cost_rows, out / "cost")
    else:
        cost_dir = train_value_model(
            recipe, "rm.cost", rm.cost, base(rm.cost), CostModelTrainer, cost_rows, out / "cost",
            regularization=rm.cost.regularization,
        )  # fmt: skip
    rewards = score_with_value_model(recipe, helpful_dir, rows, out / "helpful")
    costs = score_with_value_model(recipe, cost_dir, rows, out / "cost")
    usable = set(rewards) & set(costs)
    refs, provenance = {}, None
    if rm.reference_logps:
        refs, provenance = reference_logps(recipe, rows, out / "reference")
        usable &= set(refs)

    scored: dict[int, dict] = {}
    for i in sorted(usable):
        row = rows[i]
        record = margins(row, rewards[i], costs[i])
        if refs:
            record["ref_logps_0"], record["ref_logps_1"] = refs[i]
        if not all(math.isfinite(v) for v in record.values()):
            raise SafeAlignError(f"{row.source}: scoring produced a non-finite value {record}; check the model's dtype")
        scored[i] = record if provenance is None else {**record, "ref_logps_provenance": provenance}

    metrics = held_out_metrics(rows, sorted(held_out), scored)
    if recipe.eval.heldout_pairs:  # data no stage trains on: the models' accuracy where it counts
        pairs = heldout_rows(recipe, rows)
        pair_rewards = score_with_value_model(recipe, helpful_dir, pairs, out / "helpful")
        pair_costs = score_with_value_model(recipe, cost_dir, pairs, out / "cost")
        pair_scored = {i: margins(pairs[i], pair_rewards[i], pair_costs[i]) for i in set(pair_rewards) & set(pair_costs)}
        metrics["heldout_pairs"] = held_out_metrics(pairs, list(range(len(pairs))), pair_scored)
    if cost_fit is not None:
        metrics["cost_fit"] = cost_fit
    negative = {
        "delta_h": sum(1 for i, r in scored.items() if rows[i].better_response_id >= 0 and r["delta_h"] < 0),
        "delta_s": sum(1 for i, r in scored.items() if rows[i].safer_response_id >= 0 and r["delta_s"] < 0),
    }
    # What it publishes
    if is_rank_0():
        records = [{**rows[i].to_json(), **scored[i]} for i in sorted(scored)]
        write_text_atomically(out / "scored.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info(
        "rm: scored %d of %d rows; held-out pairwise accuracy helpful %s, cost %s; cost sign accuracy %s; "
        "negative margins (RM disagrees with the label): helpful %d, harmless %d",
        len(scored), len(rows), metrics["helpful"]["pair_accuracy"], metrics["cost"]["pair_accuracy"],
        metrics["cost"]["sign_accuracy"], negative["delta_h"], negative["delta_s"],
    )  # fmt: skip
    if "heldout_pairs" in metrics:
        h = metrics["heldout_pairs"]
        log.info("rm: on eval.heldout_pairs (%d pairs): helpful pair accuracy %s %s; cost pair accuracy %s %s, "
                 "sign accuracy %s %s on %d labelled responses", h["held_out_rows"],
                 h["helpful"]["pair_accuracy"], h["helpful"]["pair_interval"], h["cost"]["pair_accuracy"],
                 h["cost"]["pair_interval"], h["cost"]["sign_accuracy"], h["cost"]["sign_interval"],
                 h["cost"]["responses"])  # fmt: skip
    return {
        "outputs": {
            "scored": "scored.jsonl",
            "metrics": "metrics.json",
            "helpful_rm": "helpful/model",
            "cost_model": "cost/model",
        },
        "rows": len(rows),
        "scored_rows": len(scored),
        "dropped_rows": len(rows) - len(scored),
        "contradictory_safety_rows": len(contradictory),
        "negative_margins": negative,
        "reference_logps": bool(refs),
        **{f"held_out_{k}": v for k, v in metrics.items()},
    }
