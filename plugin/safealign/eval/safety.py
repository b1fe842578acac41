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
from safealign.eval.statistics import mcnemar_p, wilson_interval

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


def safety_rates(prompts: list[SafetyPrompt], verdicts: list[bool | None]) -> dict:
    """Overall and per-category safety rates of one model under one judge, over the answers it judged
    (a None verdict, a judge reply without one, is counted as `unjudged` and left out of n)."""
    if len(prompts) != len(verdicts):
        raise ValueError(f"{len(prompts)} prompts but {len(verdicts)} verdicts")
    by_category: dict[str, list[bool]] = defaultdict(list)
    for prompt, safe in zip(prompts, verdicts):
        if safe is not None:
            by_category[prompt.category].append(safe)
    judged = [v for v in verdicts if v is not None]
    return {
        "overall": Rate(sum(judged), len(judged)).to_json(),
        "categories": {c: Rate(sum(v), len(v)).to_json() for c, v in sorted(by_category.items())},
        **({"unjudged": len(verdicts) - len(judged)} if len(judged) < len(verdicts) else {}),
    }


def paired_change(verdicts: list[bool | None], base_verdicts: list[bool | None]) -> dict:
    """How a model's verdicts differ from the base model's on the same prompts: the discordant prompts
    each way, the ties (same verdict, left out of the test), and McNemar's exact p; a prompt either
    model has no verdict on is not a pair."""
    if len(verdicts) != len(base_verdicts):
        raise ValueError(f"{len(verdicts)} verdicts but {len(base_verdicts)} for the base")
    pairs = [(v, b) for v, b in zip(verdicts, base_verdicts) if v is not None and b is not None]
    safer = sum(v and not b for v, b in pairs)
    less_safe = sum(b and not v for v, b in pairs)
    return {"safer": safer, "less_safe": less_safe, "ties": len(pairs) - safer - less_safe,
            "p_value": mcnemar_p(safer, less_safe)}  # fmt: skip
