"""Score every pair of a dataset once: length-sorted batches, sharded over ranks, merged on all.

Sorting by length makes each batch's padding small (the forward cost is the longest row times the
batch). Batches are dealt round-robin to ranks; every rank runs the same number of forwards (a rank
with no batch left repeats one and discards it), which ZeRO-3's parameter gathering requires; the
results are merged with one all-reduce. The order is a pure function of the data, so scoring the same
rows twice gives identical numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm import tqdm

from safealign.openrlhf.pair_sampler import pair_length


def length_order(items: list[tuple]) -> list[int]:
    """Item indices by the longer response's token count, ties by index: batches of similar length.
    (benchmarks/throughput.py swaps this for file order to measure what sorting buys.)"""
    return sorted(range(len(items)), key=lambda i: (pair_length(items[i]), i))


def score_pairs(
    dataset,
    forward: Callable[[tuple], tuple[torch.Tensor, ...]],
    strategy,
    batch_size: int,
    description: str = "scoring",
    progress: bool = True,
) -> torch.Tensor:
    """`forward(batch)`'s per-row outputs for every item of `dataset`: shape `[len(dataset), k, ...]`,
    float64 (`forward` returns k tensors of shape `[B, ...]`: a value per row, or a feature vector)."""
    items = [dataset[i] for i in range(len(dataset))]
    order = length_order(items)
    batches = [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
    world, rank = getattr(strategy, "world_size", 1), strategy.get_rank()
    mine = batches[rank::world]
    rounds = math.ceil(len(batches) / world)
    out: torch.Tensor | None = None
    with torch.no_grad():
        for r in tqdm(range(rounds), desc=description, disable=not (progress and strategy.is_rank_0())):
            chunk = mine[r] if r < len(mine) else batches[0]
            values = torch.stack(
                [v.detach().double().cpu() for v in forward(dataset.collate_fn([items[i] for i in chunk]))], 1
            )
            if out is None:
                out = torch.zeros(len(items), *values.shape[1:], dtype=torch.float64)
            if r < len(mine):
                out[chunk] = values
    if world > 1:
        out = strategy.all_reduce(out, op="sum")  # each row was computed by exactly one rank
    return out
