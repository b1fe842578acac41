"""λ's dual update (Safe RLHF's rule on log λ) and the implicit cost estimate, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from safealign.lagrange import LagrangeMultiplier, implicit_cost_estimate


def test_rises_while_cost_is_above_threshold_and_falls_below():
    up = LagrangeMultiplier(init=1.0, lr=0.1)
    # log λ = 0 + 0.1 · (0.5 − 0) · 1 = 0.05
    assert up.update(0.5) == pytest.approx(math.exp(0.05))
    # log λ = 0.05 + 0.1 · 0.5 · e^0.05 = 0.10256355
    assert up.update(0.5) == pytest.approx(math.exp(0.10256355), rel=1e-7)

    down = LagrangeMultiplier(init=2.0, lr=0.1, threshold=1.0)
    # log λ = log 2 + 0.1 · (0.5 − 1.0) · 2 = 0.69314718 − 0.1
    assert down.update(0.5) == pytest.approx(math.exp(0.59314718), rel=1e-7)


def test_cap_delay_and_window():
    capped = LagrangeMultiplier(init=1.0, lr=1.0, max_value=1.2)
    for _ in range(5):
        capped.update(10.0)
    assert capped.value == pytest.approx(1.2)

    delayed = LagrangeMultiplier(init=1.0, lr=0.1, delay_steps=2, window=2)
    assert delayed.update(1.0) == 1.0
    assert delayed.update(3.0) == 1.0  # still delayed, but the window now holds [1, 3]
    # third update: window [3, 5], mean 4 → log λ = 0.1 · 4 · 1 = 0.4
    assert delayed.update(5.0) == pytest.approx(math.exp(0.4))
    assert delayed.cost_estimate == 4.0

    balanced = LagrangeMultiplier(init=1.0, lr=0.5, window=2)
    balanced.update(1.0)  # mean 1 → moves up
    after_first = balanced.value
    balanced.update(-1.0)  # window [1, −1], mean 0 → no move
    assert balanced.value == after_first > 1.0


def test_state_round_trip_continues_exactly():
    straight = LagrangeMultiplier(init=0.5, lr=0.2, window=3, delay_steps=1)
    resumed = LagrangeMultiplier(init=0.5, lr=0.2, window=3, delay_steps=1)
    estimates = [0.3, -0.1, 0.8, 0.4, -0.6, 0.2]
    for x in estimates[:3]:
        straight.update(x)
        resumed.update(x)
    restored = LagrangeMultiplier(init=0.5, lr=0.2, window=3, delay_steps=1)
    restored.load_state_dict(resumed.state_dict())
    for x in estimates[3:]:
        straight.update(x)
        restored.update(x)
    assert restored.value == straight.value
    assert restored.state_dict() == straight.state_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"init": 0.0, "lr": 0.1}, "positive"),
        ({"init": 2.0, "lr": 0.1, "max_value": 1.0}, "at least"),
        ({"init": 1.0, "lr": 0.1, "window": 0}, "window"),
    ],
)
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LagrangeMultiplier(**kwargs)


def test_non_finite_estimate_is_rejected():
    with pytest.raises(ValueError, match="finite"):
        LagrangeMultiplier(init=1.0, lr=0.1).update(float("nan"))


def test_implicit_cost_estimate_by_hand():
    # Row 1: equal mean log-probs → p = 0.5 → 0.5·1 + 0.5·(−1) = 0.
    # Row 2: ℓ̄0 − ℓ̄1 = ln 3 → p = σ(ln 3) = 0.75 → 0.75·2 + 0.25·(−2) = 1.
    estimate = implicit_cost_estimate(
        torch.tensor([-1.0, math.log(3.0) - 2.0]),
        torch.tensor([-1.0, -2.0]),
        torch.tensor([1.0, 2.0]),
        torch.tensor([-1.0, -2.0]),
    )
    assert estimate == pytest.approx(0.5, abs=1e-6)
