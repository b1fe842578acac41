"""Forward-only work on trained models: a value model's scores of response pairs, a policy's
response log-probs. Each loads the model on OpenRLHF's strategy, scores through `pair_forward` (the
trainers' own code) and `scoring.score_pairs` (sharded over ranks), and returns values by row index."""

from __future__ import annotations

from pathlib import Path

import torch

from safealign.core.errors import SafeAlignError
from safealign.core.process import gpu_available
from safealign.domain.data import PreferenceRow
from safealign.models.pooled_value import TORCH_DTYPES, PooledValueModel, is_pooled, read_spec
from safealign.models.provenance import check_same_tokenizer, reference_provenance
from safealign.models.resolve import policy_and_reference
from safealign.openrlhf import engine
from safealign.openrlhf.pair_dataset import PreferencePairDataset
from safealign.openrlhf.pair_forward import PairLogProbs, PairValues
from safealign.openrlhf.scoring import score_pairs
from safealign.openrlhf.settings import Settings, build_settings
from safealign.recipe import Recipe

#: Scoring generated answers (eval, distill's best-of-n): room for long prompts whatever data.max_len is.
ANSWER_MAX_LEN = 2048


def scoring_settings(recipe: Recipe, kind: str, model_dir: Path, out: Path, tokenizer_dir: Path | None = None) -> Settings:
    """Settings to score with: a forward reads no optimizer field, so the kind's training section
    (`align` for a policy, `rm.helpful` for a value model) fills them."""
    section = recipe.align if kind == "dpo" else recipe.rm.helpful
    return build_settings(recipe, section, out, kind, model_dir=model_dir, tokenizer_dir=tokenizer_dir)


def _by_row(dataset: PreferencePairDataset, scores) -> dict[int, tuple[float, ...]]:
    """Scores keyed by the row they belong to (a dataset drops rows whose prompt fills max_len)."""
    return {extra["row_index"]: tuple(scores[i].tolist()) for i, extra in enumerate(dataset.extras)}


def score_with_value_model(
    recipe: Recipe, model_dir: Path, rows: list[PreferenceRow], out: Path, max_len: int | None = None
) -> dict[int, tuple[float, float]]:
    """Both responses' values under a trained reward/cost model, by row index (`max_len`: data.max_len;
    a pooled model scores at the length it was fitted at). `out`: scratch for the settings' paths
    (nothing is written there)."""
    args = scoring_settings(recipe, "rm", model_dir, out)
    strategy = engine.make_strategy(args)
    if is_pooled(model_dir):
        return _score_with_pooled_model(recipe, model_dir, rows, strategy)
    model = engine.load_value_model(model_dir, args, strategy, trainable=False)
    tokenizer = engine.load_tokenizer(model_dir, model, strategy, padding_side="left")
    dataset = PreferencePairDataset(
        rows, tokenizer, max_len or recipe.data.max_len, strategy, recipe.data.input_template, for_reward_model=True
    )
    with engine.prepared_for_inference(strategy, model) as model:
        values = PairValues(tokenizer, strategy, next(model.parameters()).device)
        scores = score_pairs(
            dataset,
            lambda batch: values(model, batch),
            strategy,
            recipe.rm.score_batch_size,
            f"scoring with {model_dir.parent.name}",
        )
    return _by_row(dataset, scores)


def _score_with_pooled_model(recipe: Recipe, model_dir: Path, rows: list[PreferenceRow], strategy) -> dict[int, tuple[float, float]]:
    spec = read_spec(model_dir)
    model = PooledValueModel.load(model_dir, TORCH_DTYPES[spec["dtype"]])
    if gpu_available():
        model.to(torch.device("cuda", torch.cuda.current_device()))
    tokenizer = engine.load_tokenizer(model_dir, model.backbone, strategy, padding_side="left")
    dataset = PreferencePairDataset(
        rows, tokenizer, spec["max_len"], strategy, recipe.data.input_template, for_reward_model=True
    )
    scores = score_pairs(dataset, model.pair, strategy, recipe.rm.score_batch_size, f"scoring with {model_dir.parent.name}")
    return _by_row(dataset, scores)


def score_generated(recipe: Recipe, model_dir: Path, rows: list[PreferenceRow], out: Path) -> list[tuple[float, float]]:
    """Both responses' values for every row, in row order. A row too long to score is an error: a
    missing value would otherwise read as a verdict (or a best-of-n choice)."""
    scores = score_with_value_model(recipe, model_dir, rows, out, max_len=ANSWER_MAX_LEN)
    if len(scores) != len(rows):
        limit = read_spec(model_dir)["max_len"] if is_pooled(model_dir) else ANSWER_MAX_LEN
        raise SafeAlignError(
            f"{len(rows) - len(scores)} prompts are longer than {limit} tokens and cannot be "
            f"scored by {model_dir}; use shorter prompts"
        )
    return [scores[i] for i in range(len(rows))]


def response_logps(
    recipe: Recipe, model_dir: Path, rows: list[PreferenceRow], out: Path, tokenizer_dir: Path | None = None,
    description: str = "log-probs",
) -> tuple[dict[int, tuple[float, float, float, float]], object]:
    """A policy's log-probs of both responses by row index — (sum_0, sum_1, mean_0, mean_1) — with the
    align trainer's own code (`PairLogProbs`) on the tokenization of `tokenizer_dir` (default: the
    model's own), and the tokenizer. Rows whose prompt fills data.max_len are absent, as in training."""
    args = scoring_settings(recipe, "dpo", model_dir, out, tokenizer_dir)
    strategy = engine.make_strategy(args)
    actor = engine.load_actor(model_dir, args, strategy, trainable=False)
    tokenizer = engine.load_tokenizer(tokenizer_dir or model_dir, actor, strategy)
    if tokenizer_dir is not None and tokenizer_dir != model_dir:
        check_same_tokenizer(tokenizer, model_dir, recipe.model.trust_remote_code)
    dataset = PreferencePairDataset(rows, tokenizer, recipe.data.max_len, strategy, recipe.data.input_template)
    with engine.prepared_for_inference(strategy, actor) as actor:
        logps = PairLogProbs(tokenizer, strategy, next(actor.parameters()).device)
        scores = score_pairs(dataset, lambda batch: logps(actor, batch), strategy, recipe.rm.score_batch_size, description)
    return _by_row(dataset, scores), tokenizer


def reference_logps(recipe: Recipe, rows: list[PreferenceRow], out: Path) -> tuple[dict[int, tuple[float, float]], dict]:
    """The reference policy's summed response log-probs by row index (on the policy's tokenization, as
    align will see the rows), and their provenance."""
    policy_dir, reference_dir = policy_and_reference(recipe.model)
    logps, tokenizer = response_logps(recipe, reference_dir, rows, out, policy_dir, "reference log-probs")
    provenance = reference_provenance(reference_dir, tokenizer, recipe.data.max_len, recipe.data.input_template)
    return {i: values[:2] for i, values in logps.items()}, provenance
