"""Step statistics: per-dimension weighting across micro-batches, and metrics.jsonl on resume."""

from __future__ import annotations

import math

import pytest

from safealign.domain.metrics import MetricsLog, StatsAccumulator, read_metrics


def test_per_dimension_stats_are_weighted_by_their_row_counts():
    acc = StatsAccumulator()
    acc.add({"loss": 0.6, "loss_h": 0.5, "n_h": 3.0, "loss_s": math.nan, "n_s": 0.0, "lambda": 1.0})
    acc.add({"loss": 0.4, "loss_h": 0.9, "n_h": 1.0, "loss_s": 0.2, "n_s": 2.0, "lambda": 1.0})
    out = acc.reduce()
    assert out["loss_h"] == pytest.approx((3 * 0.5 + 1 * 0.9) / 4)  # 0.6, not the plain mean 0.7
    assert out["loss_s"] == pytest.approx(0.2)  # the batch without harmless rows neither counts nor poisons it
    assert out["loss"] == pytest.approx(0.5) and out["lambda"] == 1.0
    assert (out["n_h"], out["n_s"]) == (4.0, 2.0)
    assert acc.reduce() == {}  # reduce starts the next step afresh


def test_summed_statistics_add_up_shares_of_a_global_quantity():
    acc = StatsAccumulator(summed=frozenset({"loss"}))
    acc.add({"loss": 0.25, "loss_h": 0.5, "n_h": 2.0})
    acc.add({"loss": 0.5, "loss_h": 1.0, "n_h": 2.0})
    out = acc.reduce()
    assert out["loss"] == pytest.approx(0.75)  # the micro-batches' shares of one objective: summed
    assert out["loss_h"] == pytest.approx(0.75)  # a mean, weighted by n_h


def test_a_dimension_absent_for_a_whole_step_is_nan_not_zero():
    acc = StatsAccumulator()
    acc.add({"loss_s": math.nan, "n_s": 0.0})
    assert math.isnan(acc.reduce()["loss_s"])


def test_metrics_log_drops_lines_past_the_checkpoint_on_resume(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 0.1 * step, "acc_s": math.nan})
    log.write({"step": 2, "eval_loss": 0.5})
    log.truncate_after(2)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 2]
    assert records[0]["acc_s"] is None  # NaN is written as JSON null
    MetricsLog(tmp_path / "other.jsonl", enabled=False).write({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()
