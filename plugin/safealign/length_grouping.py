"""Micro-batches of similar length inside each optimizer step: fewer padded tokens, the same gradient.

A micro-batch is padded to its longest sequence, so four pairs drawn at random from a spread of lengths
compute many padding tokens (on the evidence recipe's rows at 192 tokens, 27 % of the tokens of
data-order micro-batches of 4 pairs are padding; sorting inside each optimizer step's 16 pairs leaves 15 %,
and the step runs 1.13× faster: benchmarks/step_floor.py). Sorting *inside*
an optimizer step changes which pairs share a micro-batch, never which pairs share a step, so it changes
the gradient only where a loss is normalised per micro-batch over unequal counts: the pair trainers'
losses are not (Safe-MM-DPO and DPO normalise over the global batch, `StepLoop.begin_global_batch`; the
reward models average over micro-batches of equal size). Unlike HF's `group_by_length`, which sorts
across steps, the data order between steps is untouched, so a run's steps see the same pairs with it on
or off. SFT is left alone: its token-mean loss per micro-batch would weigh tokens differently.
"""

from __future__ import annotations

import torch.distributed as dist

from safealign.openrlhf import DistributedSampler


def pair_length(item: tuple) -> int:
    """Tokens of the longer response of a tokenised pair `(ids_0, mask_0, ids_1, mask_1, extra)`: what
    the pair costs a micro-batch once both responses are padded to one length."""
    return max(item[0].shape[-1], item[2].shape[-1])


class LengthGroupedSampler(DistributedSampler):
    """OpenRLHF's `DistributedSampler` (same shuffle, shard and resume skip) whose indices come longest
    first inside each run of `per_step` (one optimizer step's pairs on this rank), so the DataLoader's
    consecutive micro-batches are cut from pairs of similar length.

    Resume stays exact: checkpoints fall on optimizer-step boundaries, so the skipped prefix is a whole
    number of runs and the runs left are the ones an uninterrupted epoch would sort.
    """

    def __init__(self, dataset, per_step: int, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.per_step = per_step
        self.lengths = [pair_length(dataset[i]) for i in range(len(dataset))]

    def __iter__(self):
        indices = list(super().__iter__())
        grouped: list[int] = []
        for start in range(0, len(indices), self.per_step):
            grouped += sorted(indices[start : start + self.per_step], key=lambda i: -self.lengths[i])
        return iter(grouped)


def pair_loader(strategy, dataset, section, pin_memory: bool = False):
    """The training DataLoader of a pair trainer: OpenRLHF's, with `LengthGroupedSampler` when the
    section's `group_by_length` is on (the default)."""
    sampler = None
    if section.group_by_length:
        dp_group = strategy.ds_device_mesh["dp"].get_group()
        sampler = LengthGroupedSampler(
            dataset,
            per_step=strategy.accumulated_gradient * section.micro_batch_size,
            num_replicas=dist.get_world_size(group=dp_group),
            rank=dist.get_rank(group=dp_group),
            shuffle=True,
            seed=strategy.seed,
            drop_last=True,
        )
    return strategy.setup_dataloader(
        dataset, section.micro_batch_size, pin_memory, True, dataset.collate_fn, sampler=sampler
    )
