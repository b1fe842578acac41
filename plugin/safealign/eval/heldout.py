"""Evaluation prompts never reach training.

A model trained (or distilled) on BeaverTails-Evaluation or MT-Bench prompts would be graded on its
homework. Every stage that trains checks its prompts against the eval sets the recipe names (the
BeaverTails file, default or `eval.beavertails`, and MT-Bench's first turns) and stops with a clear
error on any match: silently dropping them would hide a data problem the user should fix at the source.

Held-out preference pairs (`eval.heldout_pairs`) are defined the other way round: the pairs given,
minus every pair whose prompt is among `data.train`'s (public preference files repeat prompts, so a
split by row range leaves a few on both sides). Everything that trains — the reward models, the policy,
its Ĵ_C prompt pool, the distilled student's prompts by default — draws on `data.train`, so no held-out
pair's prompt reaches a training stage; the ones left out are counted in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from safealign.data import Message, PreferenceRow, load_sources, prompt_identity
from safealign.errors import SafeAlignError
from safealign.eval.mtbench import load_questions
from safealign.eval.safety import DEFAULT_PATH, load_prompts
from safealign.recipe import Recipe

log = logging.getLogger("safealign")


def eval_prompt_identities(recipe: Recipe) -> dict[str, str]:
    """`prompt_identity` of every evaluation prompt -> the eval set it belongs to."""
    single = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    known = {prompt_identity(single(q.turns[0])): "MT-Bench" for q in load_questions()}
    for p in load_prompts(recipe.eval.beavertails or DEFAULT_PATH):
        known[prompt_identity(single(p.prompt))] = "BeaverTails-Evaluation"
    return known


def check_not_eval_prompts(
    recipe: Recipe, prompts: Sequence[list[Message]], what: str, sources: Sequence[str] | None = None
) -> None:
    """Stop if any of `prompts` (from `what`, e.g. `data.train`; `sources` name each, e.g. file:line) is an eval prompt."""
    known = eval_prompt_identities(recipe)
    hits = [i for i, prompt in enumerate(prompts) if prompt_identity(prompt) in known]
    if hits:
        first = hits[0]
        where = sources[first] if sources and sources[first] else f"prompt {first + 1}"
        raise SafeAlignError(
            f"{what}: {len(hits)} prompt(s) are {known[prompt_identity(prompts[first])]} evaluation prompts "
            f"(first: {where}: {prompts[first][-1]['content'][:60]!r}); remove them from the training data, "
            "or the eval would grade answers to prompts the model was trained on"
        )


def load_training_rows(recipe: Recipe) -> list[PreferenceRow]:
    """`data.train`, loaded and checked against the eval sets: what every stage that trains on it reads."""
    rows = load_sources(recipe.data.train)
    check_not_eval_prompts(recipe, [r.prompt for r in rows], "data.train", [r.source for r in rows])
    return rows


def heldout_rows(recipe: Recipe, training: list[PreferenceRow]) -> list[PreferenceRow]:
    """`eval.heldout_pairs` without the pairs whose prompt is a training prompt (see the module docs)."""
    trained = {prompt_identity(row.prompt) for row in training}
    rows = load_sources(recipe.eval.heldout_pairs)
    kept = [row for row in rows if prompt_identity(row.prompt) not in trained]
    if len(kept) < len(rows):
        first = next(row for row in rows if prompt_identity(row.prompt) in trained)
        log.warning("eval.heldout_pairs: %d of %d pairs share a prompt with data.train and are left out of the "
                    "held-out measure (first: %s)", len(rows) - len(kept), len(rows), first.source)  # fmt: skip
    if not kept:
        raise SafeAlignError("eval.heldout_pairs: every pair's prompt is a training prompt; nothing is held out")
    return kept
