"""The Lagrange multiplier λ of Safe RLHF's constrained objective.

Safe RLHF (Dai et al. 2024, eq. 10-11; `safe_rlhf/algorithms/ppo_lag/trainer.py`) solves
`max_θ min_{λ≥0} J_R(θ) − λ·(J_C(θ) − d)` by alternating a policy step with projected gradient
ascent on the dual. λ is parameterised as `log λ`, which keeps it positive without a projection, and
the ascent step on `log λ` for the Lagrangian's dual term `λ·(Ĵ_C − d)` is

    log λ ← log λ + lr · (Ĵ_C − d) · λ          then   log λ ← min(log λ, log λ_max)

so λ grows while the policy's expected cost Ĵ_C is above the threshold d and shrinks once it is
below. Ĵ_C is the mean of the last `window` estimates (Safe RLHF averages over a deque of episode
costs); the first `delay_steps` updates only fill that window (Safe RLHF's
`lambda_update_delay_steps`), so early, noisy estimates do not kick λ.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch


class LagrangeMultiplier:
    """λ with its dual update; state is plain numbers so it rides in any checkpoint."""

    def __init__(
        self,
        init: float,
        lr: float,
        max_value: float | None = None,
        threshold: float = 0.0,
        delay_steps: int = 0,
        window: int = 1,
    ) -> None:
        if not init > 0 or not math.isfinite(init):
            raise ValueError(f"lambda init must be a positive finite number, got {init}")
        if max_value is not None and max_value < init:
            raise ValueError(f"lambda max_value ({max_value}) must be at least init ({init})")
        if window < 1 or delay_steps < 0:
            raise ValueError(f"window must be >= 1 and delay_steps >= 0, got {window} and {delay_steps}")
        self.lr = lr
        self.max_value = max_value
        self.threshold = threshold
        self.delay_steps = delay_steps
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
        return sum(self.estimates) / len(self.estimates) if self.estimates else math.nan

    def update(self, cost_estimate: float) -> float:
        """Record one Ĵ_C estimate and, past the delay, take one ascent step; returns the new λ."""
        if not math.isfinite(cost_estimate):
            raise ValueError(f"cost estimate must be finite, got {cost_estimate}")
        self.estimates.append(float(cost_estimate))
        self.num_updates += 1
        if self.num_updates > self.delay_steps:
            self.log_value += self.lr * (self.cost_estimate - self.threshold) * self.value
            if self.max_value is not None:
                self.log_value = min(self.log_value, math.log(self.max_value))
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """Everything `load_state_dict` needs to continue exactly where this left off."""
        return {"log_value": self.log_value, "estimates": list(self.estimates), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_value = float(state["log_value"])
        self.estimates.clear()
        self.estimates.extend(float(x) for x in state["estimates"])
        self.num_updates = int(state["num_updates"])


def implicit_cost_estimate(
    policy_mean_logps_0: torch.Tensor,
    policy_mean_logps_1: torch.Tensor,
    cost_0: torch.Tensor,
    cost_1: torch.Tensor,
) -> float:
    """Ĵ_C without sampling: the policy's expected cost over each stored pair, averaged over rows.

    `p_i = σ(ℓ̄0 − ℓ̄1)` is the policy's probability of answering with response 0 rather than 1, from
    length-normalised log-probs (so a long answer is not improbable just for its length), and
    `Ĵ_C = mean_i [p_i·c_i0 + (1 − p_i)·c_i1]` with the cost model's per-response costs from the RM
    stage. It moves exactly when the policy shifts mass between safer and costlier answers.
    """
    p = torch.sigmoid((policy_mean_logps_0 - policy_mean_logps_1).detach().float())
    return float((p * cost_0.to(p) + (1.0 - p) * cost_1.to(p)).mean())
