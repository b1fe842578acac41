"""The held-out Ĵ_C against the base (`cost_threshold: initial` on prompts no stage trained on)."""

from __future__ import annotations

from safealign.eval.statistics import mean_interval


def held_to_the_base(costs: dict[str, dict]) -> None:
    """`cost_threshold: initial` ("no costlier than where it started") on held-out prompts: d is the base's
    mean there, and each model's per-prompt difference from the base (same prompts, paired) gets its mean
    and 95 % interval — the comparison the constraint is about, without the two means' own spread."""
    base = costs["base"]
    for name, result in costs.items():
        result.update(threshold=base["mean"], threshold_from="base", meets_threshold=result["mean"] <= base["mean"])
        if name != "base":
            result["vs_base"] = mean_interval([c - b for c, b in zip(result["costs"], base["costs"], strict=True)])
