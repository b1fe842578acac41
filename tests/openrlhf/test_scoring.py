"""score_pairs: length-sorted batches, results back in dataset order (a single rank, no model needed)."""

from __future__ import annotations

import torch

from safealign.openrlhf.scoring import length_order, score_pairs


class LengthsDataset:
    """Items shaped like PreferencePairDataset's: (response_0 ids, mask, response_1 ids, mask, extra)."""

    def __init__(self, lengths: list[tuple[int, int]]) -> None:
        self.items = [(torch.ones(1, a), torch.ones(1, a), torch.ones(1, b), torch.ones(1, b), {}) for a, b in lengths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def collate_fn(self, items):
        return items


class OneRank:
    world_size = 1

    def get_rank(self) -> int:
        return 0

    def is_rank_0(self) -> bool:
        return True


def test_length_order_sorts_by_the_longer_response_ties_by_index():
    items = LengthsDataset([(5, 9), (3, 2), (9, 1), (4, 4), (2, 3)]).items
    assert length_order(items) == [1, 4, 3, 0, 2]


def test_scores_come_back_in_dataset_order_and_batches_are_length_sorted():
    lengths = [(7, 2), (1, 1), (5, 6), (2, 3), (8, 8), (3, 1), (6, 6)]
    batches_seen = []

    def forward(batch):
        batches_seen.append([max(item[0].shape[-1], item[2].shape[-1]) for item in batch])
        return (
            torch.tensor([float(item[0].shape[-1]) for item in batch]),
            torch.tensor([float(item[2].shape[-1]) for item in batch]),
        )

    scores = score_pairs(LengthsDataset(lengths), forward, OneRank(), batch_size=3)
    assert scores.tolist() == [[float(a), float(b)] for a, b in lengths]
    assert batches_seen == [[1, 3, 3], [6, 6, 7], [8]]


def test_building_a_pair_dataset_forks_no_process(tokenizer_dir, monkeypatch):
    """datasets >= 5 forks a worker pool for any num_proc >= 1; a fork beside gloo's threads can deadlock
    a torchrun rank (it did, building Ĵ_C's scoring set), so small datasets tokenise in-process."""
    import os
    from types import SimpleNamespace

    from support import PKU
    from transformers import AutoTokenizer

    from safealign.domain.data import load_rows
    from safealign.openrlhf.pair_dataset import PreferencePairDataset

    def no_fork():
        raise AssertionError("PreferencePairDataset forked a process")

    monkeypatch.setattr(os, "fork", no_fork)
    strategy = SimpleNamespace(args=SimpleNamespace(data=SimpleNamespace(apply_chat_template=True)))
    dataset = PreferencePairDataset(load_rows(PKU, "pku_saferlhf")[:20], AutoTokenizer.from_pretrained(tokenizer_dir), 128, strategy)
    assert len(dataset) + dataset.dropped == 20
