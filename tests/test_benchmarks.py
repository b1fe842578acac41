"""The benchmark's arithmetic (benchmarks/dpo_step.py), on hand-made runs; the timings themselves are
measured by running the benchmark, never in tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "dpo_step", Path(__file__).resolve().parents[1] / "benchmarks" / "dpo_step.py"
)
dpo_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dpo_step)


def run(variant: str, steps: list[float], peak: float, base: float = 1000.0) -> dict:
    return {
        "variant": variant,
        "step_seconds": steps,
        "peak_rss_mb": peak,
        "base_rss_mb": base,
        "tokens_per_step": 2000.0,
    }


def test_summary_takes_medians_over_rounds_and_ratios_to_openrlhf_dpo():
    runs = [
        run("openrlhf_dpo", [2.0, 2.2], 1400), run("safe_mm_dpo_ref", [2.0, 2.1], 1410),
        run("safe_mm_dpo_cached", [1.5, 1.6], 1300), run("openrlhf_dpo", [1.8, 9.0], 1450),
        run("safe_mm_dpo_ref", [2.1, 2.05], 1400), run("safe_mm_dpo_cached", [1.4, 1.5], 1250),
    ]  # fmt: skip
    table = dpo_step.summarise(runs)
    assert table["openrlhf_dpo"]["median_step_s"] == pytest.approx(
        2.1
    )  # median of 1.8, 2.0, 2.2, 9.0: an outlier is ignored
    assert table["safe_mm_dpo_cached"]["step_ratio"] == pytest.approx(1.5 / 2.1)
    assert table["safe_mm_dpo_ref"]["tokens_per_s"] == pytest.approx(2000.0 / 2.075)
    # memory: the worst round's peak above the RSS before loading; cached 300 MiB vs DPO's 450 MiB
    assert table["safe_mm_dpo_cached"]["memory_ratio"] == pytest.approx(300 / 450)
    assert table["openrlhf_dpo"]["step_ratio"] == 1.0 and table["openrlhf_dpo"]["memory_ratio"] == 1.0
