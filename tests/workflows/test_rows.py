"""Which rows a policy trains on (safealign.workflows.rows)."""

from __future__ import annotations

import dataclasses

import pytest
from support import HH, PKU

from safealign.core.errors import SafeAlignError
from safealign.domain.data import from_pku_saferlhf, load_sources
from safealign.recipe import validate_recipe
from safealign.workflows.rows import from_sources


def recipe(**align):
    data = {"train": [{"path": str(PKU), "max_rows": 20}, {"path": str(HH), "format": "hh_rlhf", "dimension": "safe", "max_rows": 30}]}
    model = {"policy": "some/dir", "cost_model": "some/cost-model"}
    return validate_recipe({"name": "t", "model": model, "data": data, "align": align})


def scored(rows):
    """The rows as the rm stage hands them to align: written with its margins and read back, so they no
    longer know their file."""
    return [from_pku_saferlhf(dataclasses.replace(r, delta_h=0.5, delta_s=-0.25).to_json(), f"scored.jsonl:{i + 1}")
            for i, r in enumerate(rows)]  # fmt: skip


def test_align_sources_keeps_the_pairs_of_the_named_files_only():
    r = recipe(sources=[HH.name])
    rows = scored(load_sources(r.data.train))
    assert len(rows) == 50
    kept = from_sources(r, rows)
    assert kept == rows[20:]  # the HH file's 30 pairs, in order, with the rm stage's numbers kept
    assert all(row.better_response_id == -1 and row.delta_s == -0.25 for row in kept)
    assert from_sources(recipe(), rows) == rows  # null: every file


def test_align_sources_that_match_no_training_pair_is_an_error():
    r = recipe(sources=[PKU.name])
    with pytest.raises(SafeAlignError, match=r"align.sources: none of the 30 training pairs comes from pku_"):
        from_sources(r, scored(load_sources(r.data.train))[20:])
