"""PairStepSampler: OpenRLHF's sampler order, its steps spread by label pattern and sorted by length inside."""

from __future__ import annotations

import random

import pytest
from test_scoring import LengthsDataset

from safealign.openrlhf import DistributedSampler
from safealign.openrlhf.pair_sampler import PairStepSampler, spread_strata

LENGTHS = [(random.Random(i).randint(3, 60), random.Random(-i).randint(3, 60)) for i in range(40)]
KWARGS = {"shuffle": True, "seed": 7, "drop_last": True}


def sampler(per_step: int, replicas: int = 1, rank: int = 0, **options) -> PairStepSampler:
    return PairStepSampler(LengthsDataset(LENGTHS), batch_size=per_step * replicas, per_step=per_step,
                           num_replicas=replicas, rank=rank, **KWARGS, **options)  # fmt: skip


def plain(replicas: int = 1, rank: int = 0, dataset=None) -> DistributedSampler:
    return DistributedSampler(dataset or LengthsDataset(LENGTHS), num_replicas=replicas, rank=rank, **KWARGS)


@pytest.mark.parametrize("replicas", [1, 2])
def test_with_nothing_to_group_it_is_openrlhfs_order(replicas):
    for rank in range(replicas):
        ours, theirs = sampler(8, replicas, rank, group_by_length=False), plain(replicas, rank)
        for epoch in (0, 1):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)


@pytest.mark.parametrize("replicas", [1, 2])
def test_each_step_keeps_its_pairs_and_sorts_them_longest_first(replicas):
    per_step = 8  # e.g. micro-batch 2 × 4 accumulation steps on each rank
    for rank in range(replicas):
        unsorted, grouped = plain(replicas, rank), sampler(per_step, replicas, rank)
        for epoch in (0, 1):
            unsorted.set_epoch(epoch)
            grouped.set_epoch(epoch)
            a, b = list(unsorted), list(grouped)
            assert len(a) == len(b) == len(LENGTHS) // replicas
            assert a != b  # something was reordered (else this test could not fail)
            for start in range(0, len(a), per_step):
                step_a, step_b = a[start : start + per_step], b[start : start + per_step]
                assert sorted(step_a) == sorted(step_b)
                lengths = [max(LENGTHS[i]) for i in step_b]
                assert lengths == sorted(lengths, reverse=True)


def test_resume_at_a_step_boundary_continues_the_uninterrupted_order():
    grouped = sampler(per_step=4, replicas=2, rank=1, strata=[i % 5 == 0 for i in range(len(LENGTHS))])
    grouped.set_epoch(1)
    whole = list(grouped)
    # consumed_samples counts all ranks: 3 optimizer steps of 2 ranks × 4 pairs
    grouped.set_epoch(1, consumed_samples=3 * 2 * 4)
    assert list(grouped) == whole[3 * 4 :]


def test_sorting_inside_steps_removes_padding():
    """Padded tokens of micro-batches of 2: each costs 2 × its longer pair's length."""
    unsorted, grouped = plain(), sampler(per_step=8)

    def computed(order: list[int]) -> int:
        return sum(2 * max(max(LENGTHS[i]) for i in order[j : j + 2]) for j in range(0, len(order), 2))

    assert computed(list(grouped)) < 0.9 * computed(list(unsorted))


def test_spread_strata_by_hand():
    """A's 4 rows at (r + ½)/4 · 6 = 0.75, 2.25, 3.75, 5.25; B's 2 (the rarer) at (r + ½)/2 · 4 = 1, 3 of
    the 4 kept positions: 0 4 1 5 2 3 (a tie keeps the given order)."""
    assert spread_strata([0, 1, 2, 3, 4, 5], ["A", "A", "A", "A", "B", "B"], kept=4) == [0, 4, 1, 5, 2, 3]


@pytest.mark.parametrize("replicas", [1, 2])
def test_every_step_holds_each_label_pattern_in_proportion_and_the_dropped_tail_only_the_commonest(replicas):
    """45 pairs, 7 labelled on both dimensions, steps of 8 (5 whole steps, 5 pairs dropped): every step
    holds 1 or 2 of the 7 and all 7 are trained on; OpenRLHF's order, same seed, has a step with none."""
    lengths = LENGTHS + LENGTHS[:5]
    dual = [i in {1, 7, 13, 19, 25, 31, 37} for i in range(45)]
    batch, per_step = 8, 8 // replicas
    for epoch in range(4):
        steps: list[list[int]] = [[] for _ in range(45 // batch)]
        plain_steps: list[list[int]] = [[] for _ in range(45 // batch)]
        for rank in range(replicas):
            ours = PairStepSampler(LengthsDataset(lengths), batch_size=batch, per_step=per_step, strata=dual,
                                   num_replicas=replicas, rank=rank, **KWARGS)  # fmt: skip
            theirs = plain(replicas, rank, LengthsDataset(lengths))
            for s in (ours, theirs):
                s.set_epoch(epoch)
            for target, order in ((steps, list(ours)), (plain_steps, list(theirs))):
                for step in range(len(target)):
                    target[step] += order[step * per_step : (step + 1) * per_step]
        counts = [sum(dual[i] for i in step) for step in steps]
        assert set(counts) == {1, 2} and sum(counts) == 7
        assert sorted(i for step in steps for i in step) != list(range(45))  # 5 dropped ...
        assert all(not dual[i] for i in set(range(45)) - {i for step in steps for i in step})  # ... none dual
        if epoch == 0:
            assert 0 in [sum(dual[i] for i in step) for step in plain_steps]
