"""Evaluation prompts never reach training.

A model trained (or distilled) on BeaverTails-Evaluation or MT-Bench prompts would be graded on its
homework. Every stage that trains checks its prompts against the eval sets the recipe names (the
BeaverTails file, default or `eval.beavertails`, and MT-Bench's first turns) — by conversation: a
training prompt whose first user turn is an eval prompt up to case, punctuation and spacing, alone or
opening a longer conversation, matches — and stops with a clear error on any match: silently dropping
them would hide a data problem the user should fix at the source.

Held-out preference pairs (`eval.heldout_pairs`) are defined the other way round: the pairs given,
minus every pair of a conversation `data.train` has a pair of — the same first user turn, ignoring case,
punctuation and spacing (`data.conversation_identity`). Public preference files repeat prompts and hold
several pairs per conversation (an HH-RLHF prompt may extend another, whose rejected answer then sits
verbatim inside it), so a split by row range leaves some on both sides. Everything that trains — the reward models, the policy,
its Ĵ_C prompt pool, the distilled student's prompts by default — draws on `data.train`, so no held-out
pair's prompt reaches a training stage; the ones left out are counted in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from safealign.core.errors import SafeAlignError
from safealign.domain.data import Message, PreferenceRow, conversation_identity, load_sources, prompt_identity
from safealign.eval.mtbench import load_questions
from safealign.eval.safety import DEFAULT_PATH, load_prompts
from safealign.recipe import Recipe

log = logging.getLogger("safealign")


def eval_prompt_identities(recipe: Recipe) -> dict[str, str]:
    """`conversation_identity` of every evaluation prompt -> the eval set it belongs to."""
    single = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    known = {conversation_identity(single(q.turns[0])): "MT-Bench" for q in load_questions()}
    for p in load_prompts(recipe.eval.beavertails or DEFAULT_PATH):
        known[conversation_identity(single(p.prompt))] = "BeaverTails-Evaluation"
    return known


def check_not_eval_prompts(
    recipe: Recipe, prompts: Sequence[list[Message]], what: str, sources: Sequence[str] | None = None
) -> None:
    """Stop if any of `prompts` (from `what`, e.g. `data.train`; `sources` name each, e.g. file:line) opens
    the conversation of an eval prompt: the same first user turn, ignoring case, punctuation and spacing
    (`data.conversation_identity`), so a multi-turn prompt that starts with one counts too."""
    known = eval_prompt_identities(recipe)
    identities = [conversation_identity(prompt) for prompt in prompts]
    hits = [i for i, identity in enumerate(identities) if identity in known]
    if hits:
        first = hits[0]
        where = sources[first] if sources and sources[first] else f"prompt {first + 1}"
        raise SafeAlignError(
            f"{what}: {len(hits)} prompt(s) are {known[identities[first]]} evaluation prompts "
            f"(first: {where}: {prompts[first][-1]['content'][:60]!r}); remove them from the training data, "
            "or the eval would grade answers to prompts the model was trained on"
        )


def load_training_rows(recipe: Recipe) -> list[PreferenceRow]:
    """`data.train`, loaded and checked against the eval sets: what every stage that trains on it reads."""
    rows = load_sources(recipe.data.train)
    check_not_eval_prompts(recipe, [r.prompt for r in rows], "data.train", [r.source for r in rows])
    return rows


def heldout_rows(recipe: Recipe, training: list[PreferenceRow]) -> list[PreferenceRow]:
    """`eval.heldout_pairs` without the pairs whose conversation is a training pair's (see the module docs)."""
    trained = {conversation_identity(row.prompt) for row in training}
    rows = load_sources(recipe.eval.heldout_pairs)
    shared = [conversation_identity(row.prompt) in trained for row in rows]
    kept = [row for row, out in zip(rows, shared) if not out]
    if len(kept) < len(rows):
        left_out = [row for row, out in zip(rows, shared) if out]
        trained_prompts = {prompt_identity(row.prompt) for row in training}
        same_prompt = sum(prompt_identity(row.prompt) in trained_prompts for row in left_out)
        log.warning("eval.heldout_pairs: %d of %d pairs belong to a conversation data.train trains on (%d the same "
                    "prompt, %d the same opening turn) and are left out of the held-out measure (first: %s)",
                    len(left_out), len(rows), same_prompt, len(left_out) - same_prompt, left_out[0].source)  # fmt: skip
    if not kept:
        raise SafeAlignError("eval.heldout_pairs: every pair's conversation is a training one; nothing is held out")
    return kept
