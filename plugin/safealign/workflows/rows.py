"""Which rows a run trains on, and the prompts held out of them to sample Ĵ_C on."""

from __future__ import annotations

import logging
from pathlib import Path

from safealign.core.errors import SafeAlignError
from safealign.domain.data import Message, PreferenceRow, hold_out_prompts, load_rows, load_sources, pair_identity
from safealign.recipe import Recipe, sampling_variant
from safealign.workflows.heldout import load_training_rows

log = logging.getLogger("safealign")


def training_rows(recipe: Recipe, scored: Path | None) -> list[PreferenceRow]:
    """The rm stage's scored rows (`scored`: its `scored` output) when the run has them, else the
    recipe's data as given (loaded and checked against the eval sets)."""
    if scored is not None:
        return load_rows(scored, "pku_saferlhf")  # the rm stage checked its prompts
    return load_training_rows(recipe)


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


def from_sources(recipe: Recipe, rows: list[PreferenceRow]) -> list[PreferenceRow]:
    """The rows that are pairs of the `data.train` files `recipe.align.sources` names (all rows when it
    names none). Matched by content, prompt and both responses, because the rm stage's scored rows do not
    say which file they came from."""
    names = recipe.align.sources
    if not names:
        return rows
    wanted = {pair_identity(row) for row in load_sources(s for s in recipe.data.train if s.path.name in names)}
    kept = [row for row in rows if pair_identity(row) in wanted]
    if not kept:
        raise SafeAlignError(f"align.sources: none of the {len(rows)} training pairs comes from {', '.join(names)}")
    log.info("align: training on the %d of %d pairs from %s (align.sources)", len(kept), len(rows), ", ".join(names))
    return kept
