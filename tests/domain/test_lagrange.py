"""λ's dual update (Safe RLHF's rule on log λ, and the linear step on λ itself) by hand, its bounds, and
that no input can break it."""

from __future__ import annotations

import math

import pytest

from safealign.domain.lagrange import LAMBDA_FLOOR, LagrangeMultiplier

CAP = 5.0


def test_rises_while_cost_is_above_threshold_and_falls_below():
    up = LagrangeMultiplier(init=1.0, lr=0.1, max_value=CAP)
    # log λ = 0 + 0.1 · (0.5 − 0) · 1 = 0.05
    assert up.update(0.5) == pytest.approx(math.exp(0.05))
    # log λ = 0.05 + 0.1 · 0.5 · e^0.05 = 0.10256355
    assert up.update(0.5) == pytest.approx(math.exp(0.10256355), rel=1e-7)

    down = LagrangeMultiplier(init=2.0, lr=0.1, max_value=CAP, threshold=1.0)
    # log λ = log 2 + 0.1 · (0.5 − 1.0) · 2 = 0.69314718 − 0.1
    assert down.update(0.5) == pytest.approx(math.exp(0.59314718), rel=1e-7)


def test_cap_delay_and_window():
    capped = LagrangeMultiplier(init=1.0, lr=1.0, max_value=1.2)
    for _ in range(5):
        capped.update(10.0)
    assert capped.value == pytest.approx(1.2)

    delayed = LagrangeMultiplier(init=1.0, lr=0.1, max_value=CAP, delay_steps=2, window=2)
    assert delayed.update(1.0) == 1.0
    assert delayed.update(3.0) == 1.0  # still delayed, but the window now holds [1, 3]
    # third update: window [3, 5], mean 4 → log λ = 0.1 · 4 · 1 = 0.4
    assert delayed.update(5.0) == pytest.approx(math.exp(0.4))
    assert delayed.cost_estimate == 4.0

    balanced = LagrangeMultiplier(init=1.0, lr=0.5, max_value=CAP, window=2)
    balanced.update(1.0)  # mean 1 → moves up
    after_first = balanced.value
    balanced.update(-1.0)  # window [1, −1], mean 0 → no move
    assert balanced.value == after_first > 1.0


def test_state_round_trip_continues_exactly():
    straight = LagrangeMultiplier(init=0.5, lr=0.2, max_value=CAP, window=3, delay_steps=1)
    resumed = LagrangeMultiplier(init=0.5, lr=0.2, max_value=CAP, window=3, delay_steps=1)
    estimates = [0.3, -0.1, 0.8, 0.4, -0.6, 0.2]
    for x in estimates[:3]:
        straight.update(x)
        resumed.update(x)
    restored = LagrangeMultiplier(init=0.5, lr=0.2, max_value=CAP, window=3, delay_steps=1)
    restored.load_state_dict(resumed.state_dict())
    for x in estimates[3:]:
        straight.update(x)
        restored.update(x)
    assert restored.value == straight.value
    assert restored.state_dict() == straight.state_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"init": 0.0, "lr": 0.1, "max_value": CAP}, "finite number >= 1e-06"),
        ({"init": 2.0, "lr": 0.1, "max_value": 1.0}, "at least"),
        ({"init": 1.0, "lr": 0.1, "max_value": math.inf}, "finite"),
        ({"init": 1.0, "lr": -0.1, "max_value": CAP}, "lr must be finite"),
        ({"init": 1.0, "lr": 0.1, "max_value": CAP, "window": 0}, "window"),
        ({"init": 1.0, "lr": 0.1, "max_value": CAP, "update_every": 0}, "update_every"),
        ({"init": 1.0, "lr": 0.1, "max_value": CAP, "step": "exp"}, "'log' or 'linear'"),
    ],
)
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LagrangeMultiplier(**kwargs)


def test_update_every_sets_which_steps_end_with_a_dual_update():
    every_third = LagrangeMultiplier(init=1.0, lr=0.1, max_value=CAP, update_every=3)
    assert [step for step in range(1, 10) if every_third.due(step)] == [3, 6, 9]
    assert all(LagrangeMultiplier(init=1.0, lr=0.1, max_value=CAP).due(step) for step in range(1, 5))


def test_non_finite_estimate_is_rejected():
    with pytest.raises(ValueError, match="finite"):
        LagrangeMultiplier(init=1.0, lr=0.1, max_value=CAP).update(float("nan"))


def test_uncapped_growth_is_what_the_cap_prevents():
    """The issue's numbers: at lr 0.01 and a sustained violation of 0.3, log λ += 0.003·λ reaches λ ≈ 9.7
    at step 300 and would overflow `exp` soon after; with the cap λ sits at λ_max from the step it gets
    there (log 5 is reached after ~268 steps by the same recursion)."""
    log_value, uncapped = 0.0, []
    for _ in range(300):
        log_value += 0.01 * 0.3 * math.exp(log_value)
        uncapped.append(math.exp(log_value))
    assert 9 < uncapped[-1] < 11
    capped = LagrangeMultiplier(init=1.0, lr=0.01, max_value=CAP)
    trajectory = [capped.update(0.3) for _ in range(1000)]
    assert max(trajectory) == pytest.approx(CAP) and trajectory[-1] == pytest.approx(CAP)
    first_at_cap = next(i for i, v in enumerate(trajectory) if v == pytest.approx(CAP))
    assert trajectory[:first_at_cap] == sorted(trajectory[:first_at_cap])


@pytest.mark.parametrize("step", ["log", "linear"])
@pytest.mark.parametrize("violation", [10.0, -10.0, 1e300, -1e300])
@pytest.mark.parametrize("lr", [0.01, 1.0, 1e6])
def test_no_finite_cost_sequence_overflows_or_leaves_the_bounds(violation, lr, step):
    lam = LagrangeMultiplier(init=1.0, lr=lr, max_value=CAP, window=4, step=step)
    for _ in range(100_000):
        value = lam.update(violation)
        assert LAMBDA_FLOOR * (1 - 1e-12) <= value <= CAP * (1 + 1e-12)
    assert math.isfinite(lam.log_value)
    expected = CAP if violation > 0 else LAMBDA_FLOOR
    if lr >= 1.0 or violation > 0 or step == "linear":  # a small lr on log λ nears the floor slowly (step ∝ λ)
        assert value == pytest.approx(expected)
    # and it can come back: the floor keeps the multiplicative step alive
    recovered = [lam.update(-violation) for _ in range(10)]
    assert recovered[-1] != value


def test_mixed_extreme_estimates_stay_finite():
    lam = LagrangeMultiplier(init=1.0, lr=1e308, max_value=CAP, window=3)
    for x in [1.7e308, -1.7e308, 1.7e308, 0.0, -1e-300, 1e-300] * 1000:
        assert 0 < lam.update(x) <= CAP
        assert math.isfinite(lam.cost_estimate)


def test_a_threshold_set_later_rides_in_the_state_and_is_required_before_updating():
    """align.cost_threshold: initial: d is unknown until the policy's first Ĵ_C is sampled."""
    uncalibrated = LagrangeMultiplier(init=1.0, lr=0.5, max_value=CAP, threshold=None)
    with pytest.raises(ValueError, match="never set"):
        uncalibrated.update(0.1)
    uncalibrated.threshold = -0.2
    uncalibrated.update(-0.1)  # violation +0.1: log λ += 0.5 · 0.1 · 1
    assert uncalibrated.value == pytest.approx(math.exp(0.05))
    restored = LagrangeMultiplier(init=1.0, lr=0.5, max_value=CAP, threshold=None)
    restored.load_state_dict(uncalibrated.state_dict())
    assert restored.threshold == -0.2 and restored.value == uncalibrated.value
    # a checkpoint from before thresholds were saved keeps the recipe's own
    fixed = LagrangeMultiplier(init=1.0, lr=0.5, max_value=CAP, threshold=0.3)
    fixed.load_state_dict({k: v for k, v in uncalibrated.state_dict().items() if k != "threshold"})
    assert fixed.threshold == 0.3


def test_a_calibrated_threshold_is_the_first_estimate_less_the_margin():
    """align.cost_threshold_margin: d = initial Ĵ_C − margin, so a policy that has not moved is in
    violation by exactly the margin: log λ += lr · margin · λ = 0.5 · 0.2 · 1 on the first update."""
    lam = LagrangeMultiplier(init=1.0, lr=0.5, max_value=CAP, threshold=None, threshold_margin=0.2)
    assert lam.calibrate(-1.3) == pytest.approx(-1.5) and lam.threshold == pytest.approx(-1.5)
    assert lam.update(-1.3) == pytest.approx(math.exp(0.1))
    slack = LagrangeMultiplier(init=1.0, lr=0.5, max_value=CAP, threshold=None, threshold_margin=-0.2)
    assert slack.calibrate(-1.3) == pytest.approx(-1.1)  # a negative margin is the cost the policy may gain
    assert slack.update(-1.3) == pytest.approx(math.exp(-0.1))
    with pytest.raises(ValueError, match="only moves a calibrated threshold"):
        LagrangeMultiplier(init=1.0, lr=0.5, max_value=CAP, threshold=0.0, threshold_margin=0.2)
    with pytest.raises(ValueError, match="must be finite"):
        lam.calibrate(math.nan)


def test_reach_is_the_first_order_factor_over_the_run_in_the_cost_models_units():
    """exp(updates · lr · violation · λ), by hand: the seed's λ_lr 0.01 against a 0.3 violation over 10
    updates at λ 1 is ×1.0305 (inert); λ_lr 2 at λ 5, 0.1 below d, one update is ×e^−1; nothing overflows."""
    seed = LagrangeMultiplier(init=1.0, lr=0.01, max_value=5.0)
    assert seed.reach(0.3, 10) == pytest.approx(1.030454534, rel=1e-9)
    brisk = LagrangeMultiplier(init=5.0, lr=2.0, max_value=5.0)
    assert brisk.reach(-0.1, 1) == pytest.approx(math.exp(-1.0))
    assert brisk.reach(1e300, 10) == math.exp(50.0) and brisk.reach(-1e300, 10) == math.exp(-50.0)
    assert LagrangeMultiplier(init=1.0, lr=0.0, max_value=5.0).reach(0.3, 10) == 1.0


def test_the_linear_step_moves_lambda_itself_by_the_same_amount_at_any_lambda():
    """align.lambda_step: linear — λ += lr·(Ĵ_C − d), clipped to [floor, λ_max]. The registration's numbers:
    λ_init 1, λ_lr 8, d = the first estimate − 0.4."""
    lam = LagrangeMultiplier(init=1.0, lr=8.0, max_value=CAP, threshold=None, threshold_margin=0.4, step="linear")
    assert lam.calibrate(-1.0) == pytest.approx(-1.4)
    assert lam.update(-1.1) == pytest.approx(1.0 + 8 * 0.3)  # 3.4
    assert lam.update(-1.3) == pytest.approx(3.4 + 8 * 0.1)  # 4.2
    assert lam.update(-1.35) == pytest.approx(4.2 + 8 * 0.05)  # 4.6
    assert lam.update(-1.2) == pytest.approx(CAP)  # 4.6 + 1.6, capped
    assert lam.update(-1.5) == pytest.approx(CAP - 0.8)  # 0.1 below d: down by 0.8
    assert lam.update(-2.0) == pytest.approx(LAMBDA_FLOOR)  # 4.2 − 4.8: the floor, not below


def test_from_the_cap_the_log_step_falls_below_lambda_init_where_the_linear_one_does_not():
    """Why the linear step exists (docs/results/issue-25.md, the sixth registration): at λ 5 and λ_lr 4, one
    update 0.1 below d takes log λ down by 4 · 0.1 · 5 = 2 (λ → 5/e² ≈ 0.68, under λ_init 1); the linear
    step takes λ down by 4 · 0.1 = 0.4."""
    log_step = LagrangeMultiplier(init=CAP, lr=4.0, max_value=CAP, threshold=0.0)
    linear = LagrangeMultiplier(init=CAP, lr=4.0, max_value=CAP, threshold=0.0, step="linear")
    fallen = log_step.update(-0.1)
    assert fallen == pytest.approx(CAP * math.exp(-2.0)) and fallen < 1.0
    assert linear.update(-0.1) == pytest.approx(4.6)


@pytest.mark.parametrize("step", ["log", "linear"])
def test_doubling_lr_doubles_lambda_in_one_update_and_reach_measures_the_step(step):
    lam = LagrangeMultiplier(init=2.0, lr=1.0, max_value=100.0, threshold=0.0, step=step)
    doubling = LagrangeMultiplier(init=2.0, lr=lam.doubling_lr(0.5), max_value=100.0, threshold=0.0, step=step)
    assert doubling.update(0.5) == pytest.approx(4.0)
    # reach: first order over 3 updates at violation 0.5 and lr 1 from λ 2
    expected = math.exp(3 * 1.0 * 0.5 * 2.0) if step == "log" else 1 + 3 * 1.0 * 0.5 / 2.0
    assert lam.reach(0.5, 3) == pytest.approx(expected)
    if step == "linear":  # one update's worth of a violation that crosses zero: λ at the floor, a factor of 0
        assert lam.reach(-4.0, 1) == 0.0


def test_a_linear_state_round_trip_continues_exactly():
    straight = LagrangeMultiplier(init=1.0, lr=3.0, max_value=CAP, threshold=None, threshold_margin=0.2, step="linear")
    straight.calibrate(-1.0)
    for x in [-1.0, -1.1]:
        straight.update(x)
    restored = LagrangeMultiplier(init=1.0, lr=3.0, max_value=CAP, threshold=None, threshold_margin=0.2, step="linear")
    restored.load_state_dict(straight.state_dict())
    for x in [-1.3, -1.05, -1.4]:
        assert restored.update(x) == pytest.approx(straight.update(x))
    assert restored.state_dict() == straight.state_dict()


def test_the_recipe_settings_reach_the_multiplier():
    """align.lambda_* → `build_lagrange`: the step, its size and the calibrated margin; a fixed λ is a step of 0."""
    from safealign.recipe.schema import AlignSection
    from safealign.workflows.policy import build_lagrange

    align = AlignSection(lambda_step="linear", lambda_lr=8.0, cost_threshold="initial", cost_threshold_margin=0.4)
    lam = build_lagrange(align)
    assert (lam.step, lam.lr, lam.threshold, lam.threshold_margin) == ("linear", 8.0, None, 0.4)
    assert build_lagrange(align.model_copy(update={"lambda_update": "fixed"})).lr == 0.0
    assert build_lagrange(AlignSection()).step == "log"
