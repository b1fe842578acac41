"""Which rows a policy trains on (safealign.workflows.rows)."""

from __future__ import annotations

import dataclasses

import pytest
from support import HH, PKU

from safealign.core.errors import SafeAlignError
from safealign.domain.data import from_pku_saferlhf, load_sources, pair_identity, prompt_identity
from safealign.recipe import validate_recipe
from safealign.workflows.policy import split_policy_rows
from safealign.workflows.rows import LabelSources


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
    sources = LabelSources.of(r)
    kept = sources.pairs(rows)
    assert kept == rows[20:]  # the HH file's 30 pairs, in order, with the rm stage's numbers kept
    assert all(row.better_response_id == -1 and row.delta_s == -0.25 for row in kept)
    assert sources.labels(kept) == kept  # the list form takes every label its files have
    assert LabelSources.of(recipe()) is None  # null: every file, every label


def test_align_sources_per_dimension_keeps_each_label_from_its_own_files():
    r = recipe(sources={"helpful": [PKU.name], "safe": [HH.name]})
    rows = scored(load_sources(r.data.train))
    assert all(row.safer_response_id >= 0 for row in rows[:20])  # PKU's pairs come with both labels
    sources = LabelSources.of(r)
    assert sources.pairs(rows) == rows  # both files are named
    relabelled = sources.labels(rows)
    assert [(row.better_response_id, row.safer_response_id) for row in relabelled[:20]] == [
        (row.better_response_id, -1) for row in rows[:20]
    ]  # PKU: its helpfulness labels only
    assert relabelled[20:] == rows[20:]  # HH: its harmlessness labels, as they were
    assert relabelled[0].delta_h == 0.5 and relabelled[0].response_0 == rows[0].response_0


def test_a_file_listed_only_for_a_dimension_it_has_no_labels_of_trains_on_nothing():
    r = recipe(sources={"helpful": [PKU.name, HH.name]})
    rows = scored(load_sources(r.data.train))
    sources = LabelSources.of(r)
    relabelled = sources.labels(sources.pairs(rows))
    assert len(relabelled) == 20 and all(row.safer_response_id == -1 for row in relabelled)  # HH has no helpful label
    only_hh = LabelSources.of(recipe(sources={"helpful": [HH.name]}))
    with pytest.raises(SafeAlignError, match=r"align.sources: no training pair has a label of the dimension its file"):
        only_hh.labels(only_hh.pairs(rows))


def test_align_sources_that_match_no_training_pair_is_an_error():
    r = recipe(sources=[PKU.name])
    with pytest.raises(SafeAlignError, match=r"align.sources: none of the 30 training pairs comes from pku_"):
        LabelSources.of(r).pairs(scored(load_sources(r.data.train))[20:])


def test_the_per_dimension_form_trains_on_the_list_forms_pairs_with_fewer_labels():
    """max_pairs ranks pairs with both labels first; dropping labels before it would swap PKU's pairs for
    HH's, so the mapping form drops them after: the same pairs, each loss fed only by its own files."""
    both = recipe(max_pairs=24, lambda_update="fixed", sources=[PKU.name, HH.name])
    split = recipe(max_pairs=24, lambda_update="fixed", sources={"helpful": [PKU.name], "safe": [HH.name]})
    rows = scored(load_sources(both.data.train))
    as_list = split_policy_rows(both, rows, both).train
    as_map = split_policy_rows(split, rows, split).train
    assert [pair_identity(r) for r in as_map] == [pair_identity(r) for r in as_list]
    pku = {pair_identity(r) for r in rows[:20]}
    assert sum(pair_identity(r) in pku for r in as_list) >= 15  # the dual-labelled pairs came first
    for listed, mapped in zip(as_list, as_map):
        from_pku = pair_identity(listed) in pku
        assert mapped.better_response_id == listed.better_response_id
        assert mapped.safer_response_id == (-1 if from_pku else listed.safer_response_id)


def test_the_cost_pool_can_be_drawn_per_file_in_the_mix_the_constraint_is_judged_on():
    """align.cost_sampling.sources: 4 PKU prompts and 6 HH prompts (a prompt-mean pool drawn from all
    files alike takes them in the data's proportions); every pair of a pool prompt leaves training, the
    pool is the same on every call (chosen by the recipe's seed), and `prompts` is the sum."""
    r = recipe(cost_sampling={"sources": {PKU.name: 4, HH.name: 6}})
    assert r.align.cost_sampling.prompts == 10
    rows = scored(load_sources(r.data.train))
    pku_prompts = {prompt_identity(row.prompt) for row in rows[:20]}
    split = split_policy_rows(r, rows, r)
    pool = [prompt_identity(p) for p in split.cost_pool]
    assert len(pool) == len(set(pool)) == 10 and sum(p in pku_prompts for p in pool) == 4
    assert not {prompt_identity(row.prompt) for row in split.train + split.eval} & set(pool)
    assert [prompt_identity(p) for p in split_policy_rows(r, rows, r).cost_pool] == pool
    too_many = recipe(cost_sampling={"sources": {PKU.name: 20}})
    with pytest.raises(SafeAlignError, match=r"align.cost_sampling.sources.pku_saferlhf\S*: 20 prompts would leave none"):
        split_policy_rows(too_many, rows, too_many)
