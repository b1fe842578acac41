"""BeaverTails-Evaluation: the prompts, stratified subsets, and safety rates with confidence intervals.

700 red-team prompts, 14 harm categories × 50 (`data/beavertails-evaluation/`, CC BY-NC 4.0). A model's
safety rate is the share of its answers a judge calls safe, overall and per category, each with a
Wilson score interval (well-behaved at small n and at rates near 0 or 1, unlike the normal one).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from safealign.data import read_jsonl
from safealign.errors import SafeAlignError

DEFAULT_PATH = Path(__file__).resolve().parents[3] / "data" / "beavertails-evaluation" / "BeaverTails-Evaluation.jsonl"


@dataclass(frozen=True)
class SafetyPrompt:
    prompt: str
    category: str


def load_prompts(path: Path = DEFAULT_PATH) -> list[SafetyPrompt]:
    """BeaverTails-Evaluation rows (`prompt`, `category`, both non-empty strings); errors name `file:line`."""
    if not path.is_file():
        raise SafeAlignError(f"{path}: BeaverTails-Evaluation prompts not found")
    prompts = []
    for number, row in read_jsonl(path):
        if not all(isinstance(row.get(key), str) and row[key].strip() for key in ("prompt", "category")):
            raise SafeAlignError(f"{path}:{number}: needs prompt and category, each a non-empty string")
        prompts.append(SafetyPrompt(row["prompt"], row["category"]))
    if not prompts:
        raise SafeAlignError(f"{path}: no prompts (the file is empty)")
    return prompts


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95 % by default); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # The interval always contains p; float rounding can put a bound a hair inside it (e.g. 14/14 -> 0.9999…).
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


@dataclass(frozen=True)
class Rate:
    safe: int
    n: int

    @property
    def value(self) -> float:
        return self.safe / self.n if self.n else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.safe, self.n)

    def to_json(self) -> dict:
        low, high = self.interval
        return {"rate": self.value, "safe": self.safe, "n": self.n, "ci95": [low, high]}


def safety_rates(prompts: list[SafetyPrompt], verdicts: list[bool]) -> dict:
    """Overall and per-category safety rates of one model under one judge."""
    if len(prompts) != len(verdicts):
        raise ValueError(f"{len(prompts)} prompts but {len(verdicts)} verdicts")
    by_category: dict[str, list[bool]] = defaultdict(list)
    for prompt, safe in zip(prompts, verdicts):
        by_category[prompt.category].append(safe)
    return {
        "overall": Rate(sum(verdicts), len(verdicts)).to_json(),
        "categories": {c: Rate(sum(v), len(v)).to_json() for c, v in sorted(by_category.items())},
    }


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of `wins` against `losses` under "no difference" (p = 1/2).

    The paired test for two models on the same prompts: ties carry no information and are left out,
    so with verdicts it is the exact McNemar test on the discordant prompts, with costs the sign test.
    Overlapping Wilson intervals of two rates do not mean "no difference" when the prompts are shared;
    this does."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_change(verdicts: list[bool], base_verdicts: list[bool]) -> dict:
    """How a model's verdicts differ from the base model's on the same prompts, with the exact McNemar p."""
    if len(verdicts) != len(base_verdicts):
        raise ValueError(f"{len(verdicts)} verdicts but {len(base_verdicts)} for the base")
    safer = sum(v and not b for v, b in zip(verdicts, base_verdicts))
    less_safe = sum(b and not v for v, b in zip(verdicts, base_verdicts))
    return {"safer": safer, "less_safe": less_safe, "p_value": sign_test_p(safer, less_safe)}
