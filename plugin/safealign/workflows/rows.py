"""Which rows a run trains on, and the prompts held out of them to sample Ĵ_C on."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from safealign.core.errors import SafeAlignError
from safealign.domain.data import (
    LABEL_FIELDS,
    Message,
    PreferenceRow,
    hold_out_prompts,
    load_rows,
    load_sources,
    pair_identity,
    prompt_identity,
)
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
    key, variant = sampling
    per_file = variant.cost_sampling.sources
    if per_file is None:
        pool, rest = hold_out_prompts(rows, variant.cost_sampling.prompts, recipe.seed)
    else:
        pool, rest = hold_out_prompts_per_file(recipe, rows, per_file, f"{key}.cost_sampling.sources")
    log.info(
        "align: %d prompts held out to sample Ĵ_C on (%d of %d pairs not trained on)%s",
        len(pool), len(rows) - len(rest), len(rows),
        "" if per_file is None else ": " + ", ".join(f"{n} from {name}" for name, n in per_file.items()),
    )  # fmt: skip
    return pool, rest


def pairs_by_file(recipe: Recipe, names: set[str]) -> dict[str, frozenset[str]]:
    """The pair identities of each `data.train` file in `names`, in data.train's order: the rm stage's
    scored rows do not say which file they came from, so they are matched to files by content."""
    return {
        s.path.name: frozenset(pair_identity(row) for row in load_sources([s]))
        for s in recipe.data.train
        if s.path.name in names
    }


def hold_out_prompts_per_file(
    recipe: Recipe, rows: list[PreferenceRow], counts: dict[str, int], field: str
) -> tuple[list[list[Message]], list[PreferenceRow]]:
    """`align.cost_sampling.sources`: each named file's count of its distinct prompts, chosen by the
    recipe's seed as the unsplit pool is, and the rows that use none of them (a prompt two files share
    leaves both); rows are matched to files by content (`pairs_by_file`)."""
    chosen: dict[str, list[Message]] = {}
    for name, held in pairs_by_file(recipe, set(counts)).items():
        mine = [row for row in rows if pair_identity(row) in held]
        available = len({prompt_identity(row.prompt) for row in mine})
        if available <= counts[name]:
            raise SafeAlignError(
                f"{field}.{name}: {counts[name]} prompts would leave none of the file's to train on: its training "
                f"pairs have {available} distinct prompts; ask for fewer"
            )
        pool, _ = hold_out_prompts(mine, counts[name], recipe.seed)
        chosen.update((prompt_identity(prompt), prompt) for prompt in pool)
    rest = [row for row in rows if prompt_identity(row.prompt) not in chosen]
    return list(chosen.values()), rest


@dataclass(frozen=True)
class LabelSources:
    """`align.sources`: which `data.train` files the policy takes each dimension's labels from.

    The rm stage's scored rows do not say which file they came from, so pairs are matched by content
    (prompt and both responses) against the files as loaded — once, for both uses below."""

    by_dimension: dict[str, frozenset[str]]  # dimension -> identities of the pairs its files hold
    names: dict[str, list[str]]

    @classmethod
    def of(cls, recipe: Recipe) -> LabelSources | None:
        """None when the recipe trains on every file's every label (`align.sources` null)."""
        names = recipe.align.label_sources()
        if names is None:
            return None
        per_file = pairs_by_file(recipe, {name for files in names.values() for name in files})
        by_dimension = {dimension: frozenset().union(*(per_file[n] for n in listed)) for dimension, listed in names.items()}
        return cls(by_dimension, names)

    def pairs(self, rows: list[PreferenceRow]) -> list[PreferenceRow]:
        """The rows that are pairs of any file the recipe names, in order."""
        every = frozenset().union(*self.by_dimension.values())
        kept = [row for row in rows if pair_identity(row) in every]
        named = sorted({name for files in self.names.values() for name in files})
        if not kept:
            raise SafeAlignError(f"align.sources: none of the {len(rows)} training pairs comes from {', '.join(named)}")
        log.info("align: training on the %d of %d pairs from %s (align.sources)", len(kept), len(rows), ", ".join(named))
        return kept

    def labels(self, rows: list[PreferenceRow]) -> list[PreferenceRow]:
        """Each row with only the labels its file is listed for (a dimension not listed keeps none); rows
        left with no label are not trained on. The list form lists every dimension: rows stay as they are."""
        kept = []
        for row in rows:
            key = pair_identity(row)
            row = replace(row, **{f: -1 for d, f in LABEL_FIELDS.items() if key not in self.by_dimension.get(d, ())})
            if any(getattr(row, f) >= 0 for f in LABEL_FIELDS.values()):
                kept.append(row)
        if not kept:
            raise SafeAlignError(f"align.sources: no training pair has a label of the dimension its file is listed for ({self.names})")
        counts = ", ".join(f"{sum(getattr(r, f) >= 0 for r in kept)} {d}" for d, f in LABEL_FIELDS.items())
        log.info("align: %d training pairs keep the labels their files are listed for: %s (align.sources)", len(kept), counts)
        return kept
