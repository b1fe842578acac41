"""Training statistics: reduce per-micro-batch stats to one line per optimizer step, and log it.

A step's statistics are means over its micro-batches and over all ranks. A per-dimension statistic
(`loss_h`, `acc_s`, ...) is weighted by how many rows carried that dimension (`n_h`, `n_s`), so a
micro-batch with no harmless labels neither drags `loss_s` to zero nor turns it into NaN.
`MetricsLog` appends those lines to `metrics.jsonl` (rank 0 only), the file plots and reports read.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch

from safealign.core.files import read_appended_jsonl, write_text_atomically

#: Statistic -> the count that weights it; statistics not listed are plain means.
WEIGHTED_BY = {
    f"{stat}_{dim}{suffix}": f"n_{dim}"
    for dim in ("h", "s")
    for stat, suffix in (("loss", ""), ("acc", ""), ("beta", "_mean"))
}


class StatsAccumulator:
    """Weighted sums of statistics over the micro-batches of one step (or one evaluation pass).

    `summed` names statistics that are a micro-batch's share of a global quantity (the align loss:
    each micro-batch's share of the global-batch objective): they are added up, not averaged. Counts
    (`n_*`) are always added up.
    """

    def __init__(self, summed: frozenset[str] = frozenset()) -> None:
        self.summed = summed
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def _is_summed(self, key: str) -> bool:
        return key.startswith("n_") or key in self.summed

    def add(self, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            if self._is_summed(key):
                self.sums[key] += value
                self.weights[key] += 1.0
                continue
            weight = stats.get(WEIGHTED_BY.get(key, ""), 1.0)
            counted = weight > 0 and math.isfinite(value)  # the key is still created: ranks must agree on keys
            self.sums[key] += weight * value if counted else 0.0
            self.weights[key] += weight if counted else 0.0

    def reduce(self, strategy=None) -> dict[str, float]:
        """Means over everything added here, summed across ranks first when `strategy` is given."""
        keys = sorted(self.sums)
        sums = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64)
        weights = torch.tensor([self.weights[k] for k in keys], dtype=torch.float64)
        if strategy is not None and getattr(strategy, "world_size", 1) > 1:
            packed = strategy.all_reduce(torch.cat([sums, weights]), op="sum")
            sums, weights = packed[: len(keys)], packed[len(keys) :]
        self.sums.clear()
        self.weights.clear()
        return {
            key: float(s) if self._is_summed(key) else (float(s / w) if w > 0 else math.nan)
            for key, s, w in zip(keys, sums.tolist(), weights.tolist())
        }


class MetricsLog:
    """Append-only `metrics.jsonl`: one JSON object per logged step, flushed as it is written."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume from a checkpoint at `step`, drop lines the crashed run logged past it (and a line
        it tore: a kill or a full disk mid-append)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_appended_jsonl(self.path) if r.get("step", 0) <= step]
        write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """All records of a `metrics.jsonl` (missing file: none; a torn last line: dropped, file untouched)."""
    return read_appended_jsonl(Path(path), repair=False)
