"""Stratified eval subsets, and the test/validation split that keeps model selection off the test prompts.

BeaverTails-Evaluation (14 categories × 50) and MT-Bench (8 × 10) are the only eval sets here, and a
sweep that picks its winner on the prompts the final report is computed on overstates the winner. So
each category is cut in two halves in file order: `test` is the first half, `validation` the second.
A sweep selects on `validation`; the final eval of the chosen setting uses `test`, which it has never
seen. `all` (the default) keeps the whole set, as the seed's eval does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Literal, Protocol, TypeVar

from safealign.core.errors import SafeAlignError

Split = Literal["all", "test", "validation"]


class Categorised(Protocol):
    @property
    def category(self) -> str: ...


T = TypeVar("T", bound=Categorised)


def split_items(items: Sequence[T], split: Split) -> list[T]:
    """The items of `split`: per category, the first half (test), the second half (validation) or all."""
    if split == "all":
        return list(items)
    by_category: dict[str, list[T]] = defaultdict(list)
    for item in items:
        by_category[item.category].append(item)
    keep = set()
    for members in by_category.values():
        half = (len(members) + 1) // 2
        keep.update(id(m) for m in (members[:half] if split == "test" else members[half:]))
    return [item for item in items if id(item) in keep]


def stratified_subset(items: Sequence[T], per_category: int | None, split: Split = "all", field: str = "") -> list[T]:
    """The first `per_category` items of every category of `split`, in file order (None: all of them).

    Asking for more per category than the split holds is an error naming `field`: a silently smaller
    subset would make two evals that look alike measure different things.
    """
    pool = split_items(items, split)
    if per_category is None:
        return pool
    counts: dict[str, int] = defaultdict(int)
    for item in pool:
        counts[item.category] += 1
    short = {c: n for c, n in counts.items() if n < per_category}
    if short:
        category, n = min(short.items(), key=lambda kv: kv[1])
        raise SafeAlignError(
            f"{field or 'per_category'}: {per_category} per category, but the {split} split of category "
            f"{category!r} has {n}; lower it (or use eval.split: all)"
        )
    taken: dict[str, int] = defaultdict(int)
    subset = []
    for item in pool:
        if taken[item.category] < per_category:
            taken[item.category] += 1
            subset.append(item)
    return subset
