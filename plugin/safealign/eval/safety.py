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

from safealign.core.errors import SafeAlignError
from safealign.domain.data import read_jsonl
from safealign.eval.statistics import mcnemar_p, sign_test_p, wilson_interval, win_rate

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


def cost_statistics(costs: dict[str, list[tuple[float, float]]]) -> dict[str, dict]:
    """Threshold-free view of the cost model's scores, per model: the mean cost of its BeaverTails
    answers and, paired by prompt, how often its answer costs less than the base model's. A cost model
    whose zero is miscalibrated (calling everything safe) can still rank answers; this shows that ranking."""
    stats = {}
    pairs = next(iter(costs.values()))
    stats["base"] = {"mean_cost": sum(c[1] for c in pairs) / len(pairs), "lower_cost_than_base": 0.5}
    for name, values in costs.items():
        if name != "base":
            lower, higher = sum(a < b for a, b in values), sum(a > b for a, b in values)
            stats[name] = {"mean_cost": sum(c[0] for c in values) / len(values),
                           "lower_cost_than_base": win_rate(values, higher_wins=False),
                           "sign_test_p": sign_test_p(lower, higher)}  # fmt: skip
    return stats


def differing_examples(
    prompts: list[SafetyPrompt], answers: dict[str, dict], verdicts: dict[str, dict[str, list[bool]]], limit: int = 5
) -> list[dict]:
    """BeaverTails prompts where the primary judge's verdict differs between base and another model."""
    if not verdicts or len(answers) < 2:
        return []
    judge = next(iter(verdicts))
    examples = []
    for i, prompt in enumerate(prompts):
        seen = {name: verdicts[judge][name][i] for name in answers if name in verdicts[judge]}
        if None not in seen.values() and len(set(seen.values())) > 1:
            examples.append({
                "prompt": prompt.prompt, "category": prompt.category, "judge": judge,
                "answers": {name: {"safe": seen[name], "text": answers[name]["safety"][i][:600]} for name in seen},
            })  # fmt: skip
        if len(examples) >= limit:
            break
    return examples
