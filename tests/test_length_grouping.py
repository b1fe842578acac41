"""LengthGroupedSampler: the same pairs in every optimizer step as OpenRLHF's sampler, sorted inside it."""

from __future__ import annotations

import random

import pytest
from test_scoring import LengthsDataset

from safealign.length_grouping import LengthGroupedSampler
from safealign.openrlhf import DistributedSampler

LENGTHS = [(random.Random(i).randint(3, 60), random.Random(-i).randint(3, 60)) for i in range(40)]


def samplers(per_step: int, replicas: int, rank: int) -> tuple[DistributedSampler, LengthGroupedSampler]:
    kwargs = {"num_replicas": replicas, "rank": rank, "shuffle": True, "seed": 7, "drop_last": True}
    dataset = LengthsDataset(LENGTHS)
    return DistributedSampler(dataset, **kwargs), LengthGroupedSampler(dataset, per_step=per_step, **kwargs)


@pytest.mark.parametrize("replicas", [1, 2])
def test_each_step_keeps_its_pairs_and_sorts_them_longest_first(replicas):
    per_step = 8  # e.g. micro-batch 2 × 4 accumulation steps on each rank
    for rank in range(replicas):
        plain, grouped = samplers(per_step, replicas, rank)
        for epoch in (0, 1):
            plain.set_epoch(epoch)
            grouped.set_epoch(epoch)
            a, b = list(plain), list(grouped)
            assert len(a) == len(b) == len(LENGTHS) // replicas
            assert a != b  # something was reordered (else this test could not fail)
            for start in range(0, len(a), per_step):
                step_a, step_b = a[start : start + per_step], b[start : start + per_step]
                assert sorted(step_a) == sorted(step_b)
                lengths = [max(LENGTHS[i]) for i in step_b]
                assert lengths == sorted(lengths, reverse=True)


def test_resume_at_a_step_boundary_continues_the_uninterrupted_order():
    _, grouped = samplers(per_step=4, replicas=2, rank=1)
    grouped.set_epoch(1)
    whole = list(grouped)
    # consumed_samples counts all ranks: 3 optimizer steps of 2 ranks × 4 pairs
    grouped.set_epoch(1, consumed_samples=3 * 2 * 4)
    assert list(grouped) == whole[3 * 4 :]


def test_sorting_inside_steps_removes_padding():
    """Padded tokens of micro-batches of 2: each costs 2 × its longer pair's length."""
    plain, grouped = samplers(per_step=8, replicas=1, rank=0)

    def computed(order: list[int]) -> int:
        return sum(2 * max(max(LENGTHS[i]) for i in order[j : j + 2]) for j in range(0, len(order), 2))

    assert computed(list(grouped)) < 0.9 * computed(list(plain))
