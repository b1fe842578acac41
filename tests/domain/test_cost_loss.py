"""Safe RLHF's cost-model loss against values computed by hand, and the RM stage's label rules."""

from __future__ import annotations

import math

import pytest
import torch

from safealign.domain.cost_loss import SAFE, UNKNOWN, UNSAFE, cost_model_loss
from safealign.domain.data import PreferenceRow
from safealign.stages.rm import held_out_metrics, is_contradictory, oriented_margin


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def ids(*values):
    return torch.tensor(values, dtype=torch.long)


# Row 1: c0 = 1.0 (labelled unsafe), c1 = −0.5 (labelled safe), response 1 is the safer one.
#   pairwise  −log σ(c_unsafer − c_safer) = −log σ(1.5)             = log(1 + e^−1.5) = 0.20141328
#   sign of 0 (unsafe, s = +1): −log σ(+1 · 1.0)                     = log(1 + e^−1)   = 0.31326169
#   sign of 1 (safe,   s = −1): −log σ(−1 · −0.5) = −log σ(0.5)      = log(1 + e^−0.5) = 0.47407698
#   η·mean(c²) = 0.001 · (1 + 0.25)/2 = 0.000625                     → 0.98937695
def test_one_labelled_row_by_hand():
    loss, stats = cost_model_loss(t(1.0), t(-0.5), ids(1), ids(UNSAFE), ids(SAFE))
    assert loss.item() == pytest.approx(0.98937695, abs=1e-6)
    assert stats["pair_acc"] == 1.0 and stats["sign_acc"] == 1.0 and stats["n_sign"] == 2


# Row 2 (HH-RLHF style, no safety signs): c0 = 0.2, c1 = 0.3, response 0 safer:
#   pairwise only: −log σ(0.3 − 0.2) = log(1 + e^−0.1) = 0.64439666
# Batch of rows 1 and 2: mean(0.98875195, 0.64439666) + 0.001 · mean(1, 0.25, 0.04, 0.09) = 0.81691930
def test_rows_without_safety_labels_feed_the_pairwise_term_only():
    loss, stats = cost_model_loss(t(1.0, 0.2), t(-0.5, 0.3), ids(1, 0), ids(UNSAFE, UNKNOWN), ids(SAFE, UNKNOWN))
    assert loss.item() == pytest.approx(0.81691930, abs=1e-6)
    assert stats["n_sign"] == 2 and stats["pair_acc"] == 1.0
    _, unlabelled = cost_model_loss(t(0.2), t(0.3), ids(0), ids(UNKNOWN), ids(UNKNOWN))
    assert math.isnan(unlabelled["sign_acc"])


def test_regulariser_and_gradient_signs():
    c0, c1 = t(0.0).requires_grad_(), t(0.0).requires_grad_()
    loss, _ = cost_model_loss(c0, c1, ids(1), ids(UNSAFE), ids(SAFE), regularization=0.0)
    loss.backward()
    # Descent raises the unsafe response's cost and lowers the safe one's: the boundary at 0 separates them.
    assert c0.grad.item() < 0 < c1.grad.item()
    big, _ = cost_model_loss(t(10.0), t(-10.0), ids(1), ids(UNSAFE), ids(SAFE), regularization=0.0)
    big_reg, _ = cost_model_loss(t(10.0), t(-10.0), ids(1), ids(UNSAFE), ids(SAFE), regularization=1e-3)
    assert big_reg.item() - big.item() == pytest.approx(0.1, abs=1e-6)  # 0.001 · mean(100, 100)


def row(safer: int, safe_0, safe_1, better: int = 0) -> PreferenceRow:
    return PreferenceRow(
        prompt=[{"role": "user", "content": "q"}], response_0="a", response_1="b",
        better_response_id=better, safer_response_id=safer, is_response_0_safe=safe_0, is_response_1_safe=safe_1,
    )  # fmt: skip


def test_contradictory_rows():
    assert is_contradictory(row(0, False, True))  # the "safer" one is unsafe, the other safe
    assert not is_contradictory(row(0, True, False))
    assert not is_contradictory(row(0, False, False))  # both unsafe: the pair still says which is worse
    assert not is_contradictory(row(1, None, None))


def test_margins_point_the_label_way():
    assert oriented_margin((2.0, 0.5), preferred_id=0) == 1.5  # reward: preferred minus other
    assert oriented_margin((2.0, 0.5), preferred_id=1) == -1.5  # the RM disagrees with the label
    assert oriented_margin((2.0, 0.5), preferred_id=1, higher_is_better=False) == 1.5  # cost: other minus safer
    assert oriented_margin((2.0, 0.5), preferred_id=-1) == 0.0


def test_held_out_metrics():
    rows = [row(1, False, True), row(0, True, False, better=1), row(0, None, None, better=-1)]
    scored = {
        0: {"delta_h": 1.0, "delta_s": 2.0, "cost_0": 1.0, "cost_1": -1.0},
        1: {"delta_h": -1.0, "delta_s": 0.5, "cost_0": 0.3, "cost_1": 0.2},
        2: {"delta_h": 0.0, "delta_s": -0.1, "cost_0": 0.0, "cost_1": 0.0},
    }
    metrics = held_out_metrics(rows, [0, 1, 2], scored)
    assert metrics["helpful"] == {"pair_accuracy": 0.5, "pair_interval": [0.0945, 0.9055], "pairs": 2}  # Wilson
    assert metrics["cost"]["pair_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    # signs: row0 c0=1>0 unsafe ✓, c1=−1 safe ✓; row1 c0=0.3>0 but safe ✗, c1=0.2>0 unsafe ✓ → 3/4
    assert metrics["cost"]["sign_accuracy"] == 0.75 and metrics["cost"]["responses"] == 4
