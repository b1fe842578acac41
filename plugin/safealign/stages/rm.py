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

import gc
import json
import logging
import math
from pathlib import Path

from safealign import openrlhf_setup as setup
from safealign.data import PreferenceRow, held_out_indices
from safealign.errors import SafeAlignError
from safealign.eval.heldout import load_training_rows
from safealign.files import write_text_atomically
from safealign.length_grouping import pair_loader
from safealign.models import resolve_model
from safealign.pair_dataset import PreferencePairDataset
from safealign.process import agree, is_rank_0
from safealign.recipe import Recipe, RewardModelSection
from safealign.ref_provenance import check_same_tokenizer, reference_provenance
from safealign.scoring import score_pairs
from safealign.stages import StageContext, register_stage

log = logging.getLogger("safealign")


def is_contradictory(row: PreferenceRow) -> bool:
    """The safer response is labelled unsafe while the other one is labelled safe."""
    if row.safer_response_id < 0 or row.is_response_0_safe is None or row.is_response_1_safe is None:
        return False
    safer_safe = row.is_response_0_safe if row.safer_response_id == 0 else row.is_response_1_safe
    other_safe = row.is_response_1_safe if row.safer_response_id == 0 else row.is_response_0_safe
    return not safer_safe and other_safe


def train_value_model(
    ctx: StageContext, name: str, section: RewardModelSection, trainer_cls, rows, **trainer_kwargs
) -> Path:
    """Train one value-head model on `rows` (resumable); returns its checkpoint directory."""
    recipe, out = ctx.recipe, ctx.work_dir / name
    target = out / "model"
    if agree((target / "config.json").is_file()):
        log.info("rm: %s model already trained in %s", name, target)
        return target
    base_dir = resolve_model(section.base if section.base is not None else recipe.model.policy)
    args = setup.openrlhf_args(recipe, section, out)
    strategy = setup.make_strategy(args)
    model = setup.load_value_model(base_dir, args, strategy, trainable=True)
    setup.freeze_below(model, section.trainable_layers, f"rm.{name}.trainable_layers")
    tokenizer = setup.load_tokenizer(base_dir, model, strategy, padding_side="left")
    setup.configure_prompt_format(args, tokenizer, recipe)
    dataset = PreferencePairDataset(
        rows, tokenizer, recipe.data.max_len, strategy, recipe.data.input_template, for_reward_model=True
    )
    steps_per_epoch = len(dataset) // section.batch_size
    if steps_per_epoch == 0:
        raise SafeAlignError(
            f"rm.{name}.batch_size={section.batch_size} exceeds the {len(dataset)} usable training pairs"
        )
    loader = pair_loader(strategy, dataset, section)
    model, optimizer, scheduler = strategy.prepare(
        (model, setup.optimizer_config(args, steps_per_epoch * section.epochs))
    )
    consumed = setup.resume_state(strategy, model, args).get("consumed_samples", 0)
    log.info("rm: training the %s model on %d pairs, %d steps", name, len(dataset), steps_per_epoch * section.epochs)
    trainer = trainer_cls(
        model, strategy, optimizer, loader, None, scheduler, tokenizer,
        metrics_path=out / "metrics.jsonl", max_norm=section.max_norm, max_epochs=section.epochs, **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(args, consumed, steps_per_epoch)
    setup.publish_model(strategy, model, tokenizer, args, target)
    del trainer, model, optimizer, scheduler
    gc.collect()
    return target


def score_with_value_model(
    recipe: Recipe, model_dir: Path, rows: list[PreferenceRow], args, max_len: int | None = None
) -> dict[int, tuple[float, float]]:
    """Both responses' values under a trained reward/cost model, by row index (`max_len`: data.max_len)."""
    from safealign.trainers.loop import PairValues

    strategy = setup.make_strategy(args)
    model = setup.load_value_model(model_dir, args, strategy, trainable=False)
    tokenizer = setup.load_tokenizer(model_dir, model, strategy, padding_side="left")
    setup.configure_prompt_format(args, tokenizer, recipe)
    dataset = PreferencePairDataset(
        rows, tokenizer, max_len or recipe.data.max_len, strategy, recipe.data.input_template, for_reward_model=True
    )
    model = strategy.prepare(model)
    model.eval()
    values = PairValues(tokenizer, strategy, next(model.parameters()).device)
    scores = score_pairs(
        dataset,
        lambda batch: values(model, batch),
        strategy,
        recipe.rm.score_batch_size,
        f"scoring with {model_dir.parent.name}",
    )
    return {extra["row_index"]: tuple(scores[i].tolist()) for i, extra in enumerate(dataset.extras)}


#: Scoring generated answers (eval, distill's best-of-n): room for long prompts whatever data.max_len is.
ANSWER_MAX_LEN = 2048


def score_generated(recipe: Recipe, model_dir: Path, rows: list[PreferenceRow], args) -> list[tuple[float, float]]:
    """Both responses' values for every row, in row order. A row too long to score is an error: a
    missing value would otherwise read as a verdict (or a best-of-n choice)."""
    scores = score_with_value_model(recipe, model_dir, rows, args, max_len=ANSWER_MAX_LEN)
    if len(scores) != len(rows):
        raise SafeAlignError(
            f"{len(rows) - len(scores)} prompts are longer than {ANSWER_MAX_LEN} tokens and cannot be "
            f"scored by {model_dir}; use shorter prompts"
        )
    return [scores[i] for i in range(len(rows))]


def response_logps(
    recipe: Recipe, model_dir: Path, rows: list[PreferenceRow], args, tokenizer_dir: Path | None = None,
    description: str = "log-probs",
) -> tuple[dict[int, tuple[float, float, float, float]], object]:
    """A policy's log-probs of both responses by row index — (sum_0, sum_1, mean_0, mean_1) — with the
    align trainer's own code (`PairLogProbs`) on the tokenization of `tokenizer_dir` (default: the
    model's own), and the tokenizer. Rows whose prompt fills data.max_len are absent, as in training."""
    from safealign.trainers.loop import PairLogProbs

    strategy = setup.make_strategy(args)
    actor = setup.load_actor(model_dir, args, strategy, trainable=False)
    tokenizer = setup.load_tokenizer(tokenizer_dir or model_dir, actor, strategy)
    if tokenizer_dir is not None and tokenizer_dir != model_dir:
        check_same_tokenizer(tokenizer, model_dir, recipe.model.trust_remote_code)
    setup.configure_prompt_format(args, tokenizer, recipe)
    dataset = PreferencePairDataset(rows, tokenizer, recipe.data.max_len, strategy, recipe.data.input_template)
    actor = strategy.prepare(actor)
    actor.eval()
    logps = PairLogProbs(tokenizer, strategy, next(actor.parameters()).device)
    scores = score_pairs(dataset, lambda batch: logps(actor, batch), strategy, recipe.rm.score_batch_size, description)
    return {extra["row_index"]: tuple(scores[i].tolist()) for i, extra in enumerate(dataset.extras)}, tokenizer


def reference_logps(
    recipe: Recipe, rows: list[PreferenceRow], args
) -> tuple[dict[int, tuple[float, float]], dict]:
    """The reference policy's summed response log-probs by row index (on the policy's tokenization, as
    align will see the rows), and their provenance."""
    policy_dir = resolve_model(recipe.model.policy)
    reference_dir = resolve_model(recipe.model.reference) if recipe.model.reference is not None else policy_dir
    logps, tokenizer = response_logps(recipe, reference_dir, rows, args, policy_dir, "reference log-probs")
    provenance = reference_provenance(reference_dir, tokenizer, recipe.data.max_len, recipe.data.input_template)
    return {i: values[:2] for i, values in logps.items()}, provenance


def oriented_margin(values: tuple[float, float], preferred_id: int, higher_is_better: bool = True) -> float:
    """The model's margin in the label's direction (positive: it agrees with the label); 0 without a label."""
    if preferred_id < 0:
        return 0.0
    preferred, other = values[preferred_id], values[1 - preferred_id]
    return preferred - other if higher_is_better else other - preferred


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

    return {
        "held_out_rows": len(indices),
        "helpful": {"pair_accuracy": share(helpful), "pairs": len(helpful)},
        "cost": {
            "pair_accuracy": share(cost),
            "pairs": len(cost),
            "sign_accuracy": share(signs),
            "responses": len(signs),
        },
    }


@register_stage("rm", sections=("seed", "model", "data", "rm", "deepspeed"))
def run_rm(ctx: StageContext) -> dict:
    """Helpful-RM + cost model (OpenRLHF RewardModelTrainer), then every pair scored once."""
    from safealign.trainers.reward import CostModelTrainer, HelpfulRMTrainer

    recipe, out, rm = ctx.recipe, ctx.work_dir, ctx.recipe.rm
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

    helpful_dir = train_value_model(ctx, "helpful", rm.helpful, HelpfulRMTrainer, helpful_rows)
    cost_dir = train_value_model(
        ctx, "cost", rm.cost, CostModelTrainer, cost_rows, regularization=rm.cost.regularization
    )

    rewards = score_with_value_model(
        recipe, helpful_dir, rows, setup.openrlhf_args(recipe, rm.helpful, out / "helpful")
    )
    costs = score_with_value_model(recipe, cost_dir, rows, setup.openrlhf_args(recipe, rm.cost, out / "cost"))
    usable = set(rewards) & set(costs)
    refs, provenance = {}, None
    if rm.reference_logps:
        refs, provenance = reference_logps(recipe, rows, setup.openrlhf_args(recipe, recipe.align, out / "reference"))
        usable &= set(refs)

    scored: dict[int, dict] = {}
    for i in sorted(usable):
        row = rows[i]
        record = {
            "delta_h": oriented_margin(rewards[i], row.better_response_id),
            "delta_s": oriented_margin(costs[i], row.safer_response_id, higher_is_better=False),
            "cost_0": costs[i][0],
            "cost_1": costs[i][1],
        }
        if refs:
            record["ref_logps_0"], record["ref_logps_1"] = refs[i]
        if not all(math.isfinite(v) for v in record.values()):
            raise SafeAlignError(f"{row.source}: scoring produced a non-finite value {record}; check the model's dtype")
        scored[i] = record if provenance is None else {**record, "ref_logps_provenance": provenance}

    metrics = held_out_metrics(rows, sorted(held_out), scored)
    negative = {
        "delta_h": sum(1 for i, r in scored.items() if rows[i].better_response_id >= 0 and r["delta_h"] < 0),
        "delta_s": sum(1 for i, r in scored.items() if rows[i].safer_response_id >= 0 and r["delta_s"] < 0),
    }
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


def cost_model_path(recipe: Recipe, run_dir: Path) -> Path:
    """The cost model that scores sampled answers and eval answers: `model.cost_model`, else this stage's."""
    return Path(recipe.model.cost_model) if recipe.model.cost_model is not None else run_dir / "rm" / "cost" / "model"


def scored_rows_path(run_dir: Path) -> Path:
    """Where the align stage reads its rows when the recipe runs the rm stage."""
    path = run_dir / "rm" / "scored.jsonl"
    if not path.is_file():
        raise SafeAlignError(f"{path} not found: run the rm stage first (`safealign run RECIPE --stage rm`)")
    return path
