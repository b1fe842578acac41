"""The Lagrange multiplier λ of Safe RLHF's constrained objective.

Safe RLHF (Dai et al. 2024, eq. 10-11; `safe_rlhf/algorithms/ppo_lag/trainer.py`) solves
`max_θ min_{λ≥0} J_R(θ) − λ·(J_C(θ) − d)` by alternating a policy step with projected gradient
ascent on the dual. λ is parameterised as `log λ`, which keeps it positive without a projection, and
the ascent step on `log λ` for the Lagrangian's dual term `λ·(Ĵ_C − d)` is

    log λ ← clamp(log λ + lr · (Ĵ_C − d) · λ,  log λ_floor,  log λ_max)

so λ grows while the policy's expected cost Ĵ_C is above the threshold d and shrinks once it is
below. `step="linear"` takes the ascent on λ itself instead, projected onto [λ_floor, λ_max]:

    λ ← clamp(λ + lr · (Ĵ_C − d),  λ_floor,  λ_max)

the textbook dual ascent (the integral term of Stooke, Achiam & Abbeel 2020's PID Lagrangian). Why both: the
log step is proportional to λ, so λ's fall from the cap is steepest exactly when λ is largest — measured, one
update 0.1 below d took λ from 5 to 0.02–0.4, below λ_init, and those runs gave back what the rise had bought
(docs/results/issue-25.md, the sixth registration). The linear step moves λ by the same amount at any λ, so λ
comes down from the cap as fast as it went up, in proportion to how far below d the policy is.

d may be set after construction (`threshold=None`): `align.cost_threshold: initial` calibrates it
to the policy's own Ĵ_C before training, less `align.cost_threshold_margin` ("cheaper than it started by
this much": a d that binds on whatever pool and cost model, where an absolute d chosen on one pool may sit
above another pool's start — docs/results/issue-25.md, confirm-dual), and it rides in the checkpoint like λ. Ĵ_C is the mean of the
last `window` estimates (Safe RLHF averages over a deque of episode costs); the first `delay_steps`
updates only fill that window (Safe RLHF's `lambda_update_delay_steps`), so early, noisy estimates do
not kick λ.

Why both bounds are always there: on log λ the step is proportional to λ, so under a sustained violation log λ
grows like λ² — uncapped, λ = 62 after 330 steps of a 0.3 violation at lr 0.01 and `exp` overflows at
339. The cap keeps every step finite (|step| ≤ lr·|Ĵ_C − d|·λ_max) and the helpfulness term's weight
1/(1+λ) above 1/(1+λ_max). The floor (`LAMBDA_FLOOR`) keeps λ a positive, representable number: a large
lr with a large negative violation would otherwise underflow `exp` to exactly 0, where the
multiplicative step is 0 forever. Where Ĵ_C comes from is `safealign.trainers.cost_sampling`.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Literal

#: How the dual step moves λ: on log λ (Safe RLHF's, step ∝ λ) or on λ itself (step independent of λ).
LambdaStep = Literal["log", "linear"]

#: λ never goes below this: the harmless term's weight λ/(1+λ) is then under 1e-6, i.e. off, while
#: log λ stays finite and the update can still raise it.
LAMBDA_FLOOR = 1e-6


class LagrangeMultiplier:
    """λ with its dual update; state is plain numbers so it rides in any checkpoint."""

    def __init__(
        self,
        init: float,
        lr: float,
        max_value: float,
        threshold: float | None = 0.0,
        threshold_margin: float = 0.0,
        delay_steps: int = 0,
        window: int = 1,
        update_every: int = 1,
        step: LambdaStep = "log",
    ) -> None:
        if not (math.isfinite(init) and init >= LAMBDA_FLOOR):
            raise ValueError(f"lambda init must be a finite number >= {LAMBDA_FLOOR}, got {init}")
        if not (math.isfinite(max_value) and max_value >= init):
            raise ValueError(f"lambda max_value ({max_value}) must be finite and at least init ({init})")
        if not (math.isfinite(lr) and lr >= 0 and (threshold is None or math.isfinite(threshold))):
            raise ValueError(f"lambda lr must be finite and >= 0 and the threshold finite, got {lr} and {threshold}")
        if not math.isfinite(threshold_margin) or (threshold is not None and threshold_margin):
            raise ValueError(f"a threshold margin must be finite and only moves a calibrated threshold, got {threshold_margin}")
        if window < 1 or delay_steps < 0 or update_every < 1:
            raise ValueError(
                f"window and update_every must be >= 1 and delay_steps >= 0, got {window}, {update_every} and {delay_steps}"
            )
        if step not in ("log", "linear"):
            raise ValueError(f"lambda step must be 'log' or 'linear', got {step!r}")
        self.lr = lr
        self.step = step
        self.max_value = max_value
        self.threshold = threshold
        self.threshold_margin = threshold_margin
        self.delay_steps = delay_steps
        self.update_every = update_every
        self.log_value = math.log(init)
        self.estimates: deque[float] = deque(maxlen=window)
        self.num_updates = 0

    @property
    def value(self) -> float:
        """λ itself."""
        return math.exp(self.log_value)

    @property
    def cost_estimate(self) -> float:
        """The windowed Ĵ_C the last update used (NaN before any update)."""
        n = len(self.estimates)
        return math.fsum(x / n for x in self.estimates) if n else math.nan  # x/n: no overflow of the sum

    def calibrate(self, initial_cost: float) -> float:
        """Set d from the policy's Ĵ_C before its first step: that estimate less the margin; returns d."""
        if not math.isfinite(initial_cost):
            raise ValueError(f"the calibrating cost estimate must be finite, got {initial_cost}")
        self.threshold = initial_cost - self.threshold_margin
        return self.threshold

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` ends with a dual update (every `update_every` steps; each one
        costs a Ĵ_C sample of the policy's answers)."""
        return step % self.update_every == 0

    def update(self, cost_estimate: float) -> float:
        """Record one Ĵ_C estimate and, past the delay, take one ascent step; returns the new λ."""
        if not math.isfinite(cost_estimate):
            raise ValueError(f"cost estimate must be finite, got {cost_estimate}")
        if self.threshold is None:
            raise ValueError("the cost threshold was never set (calibrate it before the first update)")
        self.estimates.append(float(cost_estimate))
        self.num_updates += 1
        if self.num_updates > self.delay_steps and self.lr > 0:
            violation = self.cost_estimate - self.threshold  # may be ±inf for finite but huge inputs
            if self.step == "linear":
                moved = self.value + self.lr * violation if math.isfinite(violation) else violation
                self.log_value = math.log(min(max(moved, LAMBDA_FLOOR), self.max_value))
            else:
                step = self.lr * violation * self.value if math.isfinite(violation) else violation
                self.log_value = min(max(self.log_value + step, math.log(LAMBDA_FLOOR)), math.log(self.max_value))
        return self.value

    def reach(self, violation: float, updates: int) -> float:
        """The factor by which λ moves over `updates` dual steps at a constant `violation`, to first order
        (each step taken at the current λ): `exp(updates · lr · violation · λ)` on log λ, `1 + updates · lr ·
        violation / λ` on λ itself (0 where that would cross zero). The step is in the cost model's units, so
        the same λ_lr is brisk on one cost model and inert on another; this is how the trainer tells which
        (docs/algorithm.md, "Sizing λ_lr"). On log λ the step grows with λ, so a sustained violation moves λ up
        faster than this and down slower. Not bounded by λ_max or the floor: it measures the step size, not
        where λ may go (the exponent is clipped at ±50 only so that it cannot overflow)."""
        if self.step == "linear":
            return max(1.0 + updates * self.lr * violation / self.value, 0.0)
        return math.exp(min(max(updates * self.lr * violation * self.value, -50.0), 50.0))

    def doubling_lr(self, violation: float) -> float:
        """The λ_lr at which one update at `violation` (> 0) doubles the current λ: what to suggest when λ
        cannot act (`ln 2 / (violation · λ)` on log λ, `λ / violation` on λ itself)."""
        return self.value / violation if self.step == "linear" else math.log(2) / (violation * self.value)

    def state_dict(self) -> dict[str, Any]:
        """Everything `load_state_dict` needs to continue exactly where this left off."""
        return {
            "log_value": self.log_value,
            "estimates": list(self.estimates),
            "num_updates": self.num_updates,
            "threshold": self.threshold,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_value = float(state["log_value"])
        self.estimates.clear()
        self.estimates.extend(float(x) for x in state["estimates"])
        self.num_updates = int(state["num_updates"])
        if state.get("threshold") is not None:  # (checkpoints from before calibration carried none)
            self.threshold = float(state["threshold"])

