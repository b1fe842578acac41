"""The one rule for a model's headline helpfulness number, shared by the report and the sweep's
selection: MT-Bench's score when an LLM judge rated the answers, else the Helpful-RM's win rate of
the model's first-turn answers against the base model's (a proxy, and labelled so)."""

from __future__ import annotations

#: What each headline helpfulness metric is, for tables and axes.
LABELS = {
    "mt_bench": "MT-Bench score (LLM judge, 1-10)",
    "rm_win_rate_vs_base": "Helpful-RM win rate vs base (proxy)",
}


def headline_helpfulness(model: dict) -> tuple[float | None, str]:
    """(value, metric) from one model's eval results: `mt_bench` when it has a score, else
    `rm_win_rate_vs_base` (its value None when the rm stage did not run either)."""
    helpfulness = model["helpfulness"]
    score = (helpfulness.get("mt_bench") or {}).get("score")
    if score is not None:
        return score, "mt_bench"
    return helpfulness.get("rm_win_rate_vs_base"), "rm_win_rate_vs_base"


def headline_interval(model: dict) -> list[float] | None:
    """The 95 % interval of the headline number (`headline_helpfulness`) where the eval recorded one: the
    t interval of the MT-Bench ratings, or the Wilson interval of the win rate (ties as half a win)."""
    helpfulness = model["helpfulness"]
    value, metric = headline_helpfulness(model)
    if value is None:
        return None
    if metric == "mt_bench":
        return helpfulness["mt_bench"].get("ci95")
    return helpfulness.get("rm_win_rate_vs_base_ci95")
