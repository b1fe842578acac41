"""What each optimizer step of a pair trainer holds: every label pattern in proportion, pairs of
similar length in each micro-batch.

**Label strata** (`group_by_labels`). The evidence data mixes pairs labelled on both dimensions
(PKU-SafeRLHF) with pairs labelled for harmlessness only (HH-RLHF), about 1 in 8. Drawn at random,
16-pair steps hold 0-5 helpfulness labels: one step in eight has none, so L_H is absent from it and the
helpfulness term's weight jumps from step to step. Spread evenly instead, every step holds the same
count of each label pattern to within one (⌊n_j·B/N⌋ or ⌈n_j·B/N⌉ rows of pattern j, B pairs a step,
N in all). The seed's formula is kept: each loss is the mean over its labelled rows of the *global*
batch; what changes is only that this mean is never over zero rows, and its count barely varies. The
pairs an epoch drops to whole steps (fewer than B) come from the most common pattern, so no rarer label
is lost.

**Length grouping** (`group_by_length`). A micro-batch is padded to its longest sequence, so four pairs
drawn at random from a spread of lengths compute many padding tokens (on the evidence recipe's rows at
192 tokens, 27 % of the tokens of data-order micro-batches of 4 pairs are padding; sorting inside each
optimizer step's 16 pairs leaves 15 %, and the step runs 1.13× faster: benchmarks/step_floor.py).
Sorting *inside* an optimizer step changes which pairs share a micro-batch, never which pairs share a
step, so it changes the gradient only where a loss is normalised per micro-batch over unequal counts:
the pair trainers' losses are not (Safe-MM-DPO and DPO normalise over the global batch,
`StepLoop.begin_global_batch`; the reward models average over micro-batches of equal size). Unlike HF's
`group_by_length`, which sorts across steps, the steps' contents are untouched.

Both are orders of one seeded permutation per epoch, cut like OpenRLHF's `DistributedSampler` (rank r
takes every R-th index, a resumed epoch skips what it consumed), so a resumed run sees the order an
uninterrupted one would: checkpoints fall on step boundaries.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import torch
import torch.distributed as dist

from safealign.openrlhf import DistributedSampler


def pair_length(item: tuple) -> int:
    """Tokens of the longer response of a tokenised pair `(ids_0, mask_0, ids_1, mask_1, extra)`: what
    the pair costs a micro-batch once both responses are padded to one length."""
    return max(item[0].shape[-1], item[2].shape[-1])


def label_pattern(item: tuple) -> tuple[bool, bool]:
    """Which dimensions a tokenised pair is labelled for: (helpfulness, harmlessness)."""
    extra = item[4]
    return extra["better_id"] >= 0, extra["safer_id"] >= 0


def spread_strata(order: Sequence[int], strata: Sequence[Hashable], kept: int) -> list[int]:
    """`order` rearranged so that every stratum's rows are evenly spaced: row r of stratum j (in `order`'s
    order) goes to position ≈ (r + ½)/n_j of the way along. The most common stratum spans the whole
    order, the others only the first `kept` positions, so the tail a trainer drops (positions ≥ `kept`)
    holds only the most common stratum's rows. Ties keep `order`'s order."""
    counts = Counter(strata[i] for i in order)
    largest = max(counts, key=lambda s: (counts[s], str(s)))
    seen: Counter = Counter()
    keys = {}
    for i in order:
        stratum = strata[i]
        span = len(order) if stratum == largest else kept
        keys[i] = (seen[stratum] + 0.5) / counts[stratum] * span
        seen[stratum] += 1
    return sorted(order, key=keys.__getitem__)


class PairStepSampler(DistributedSampler):
    """OpenRLHF's `DistributedSampler` (same shuffle, shard and resume skip) whose permutation is spread
    by label strata (`strata`, one hashable per item; None: off) over steps of `batch_size` pairs, and
    whose indices come longest first inside each run of `per_step` (one optimizer step's pairs on this
    rank) when `group_by_length`."""

    def __init__(
        self, dataset, batch_size: int, per_step: int, strata: Sequence[Hashable] | None = None,
        group_by_length: bool = True, **kwargs,
    ) -> None:  # fmt: skip
        super().__init__(dataset, **kwargs)
        self.batch_size = batch_size
        self.per_step = per_step
        self.strata = strata if strata is not None and len(set(strata)) > 1 else None
        self.lengths = [pair_length(dataset[i]) for i in range(len(dataset))] if group_by_length else None

    def global_order(self) -> list[int]:
        """This epoch's order of all items, before it is cut into ranks."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = (
            torch.randperm(len(self.dataset), generator=generator).tolist()
            if self.shuffle
            else list(range(len(self.dataset)))
        )
        if self.strata is not None:
            order = spread_strata(order, self.strata, len(order) // self.batch_size * self.batch_size)
        return order

    def __iter__(self):
        if not self.drop_last:
            raise ValueError("PairStepSampler keeps whole steps only (drop_last=True)")
        mine = self.global_order()[self.rank : self.total_size : self.num_replicas]
        if self.lengths is not None:
            runs = [mine[start : start + self.per_step] for start in range(0, len(mine), self.per_step)]
            mine = [i for run in runs for i in sorted(run, key=lambda i: -self.lengths[i])]
        return iter(mine[self.consumed_indicies :])


def pair_loader(strategy, dataset, section, pin_memory: bool = False):
    """The training DataLoader of a pair trainer: OpenRLHF's, its sampler a `PairStepSampler` as the
    section's `group_by_labels` and `group_by_length` say."""
    dp_group = strategy.ds_device_mesh["dp"].get_group()
    sampler = PairStepSampler(
        dataset,
        batch_size=section.batch_size,
        per_step=strategy.accumulated_gradient * section.micro_batch_size,
        strata=[label_pattern(dataset[i]) for i in range(len(dataset))] if section.group_by_labels else None,
        group_by_length=section.group_by_length,
        num_replicas=dist.get_world_size(group=dp_group),
        rank=dist.get_rank(group=dp_group),
        shuffle=True,
        seed=strategy.seed,
        drop_last=True,
    )
    return strategy.setup_dataloader(
        dataset, section.micro_batch_size, pin_memory, True, dataset.collate_fn, sampler=sampler
    )
