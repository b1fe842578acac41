"""Safe RLHF's cost-model loss (Dai et al. 2024, eq. 6; safe-rlhf `values/cost/trainer.py`).

For a pair whose harmlessness label says which response is safer, with costs `c` from the value head
(cost > 0 means unsafe) and, where the data says so, each response's safety sign `s = +1` (unsafe) or
`−1` (safe):

    L = −log σ(c_unsafer − c_safer) − log σ(s_safer·c_safer) − log σ(s_unsafer·c_unsafer) + η·mean(c²)

The pairwise term orders the two costs; the sign terms put the decision boundary at 0, which is what
makes `cost ≤ 0` a safety verdict (Safe RLHF's own evaluation rule) rather than just a ranking; η = 1e-3
keeps costs near zero where the data says nothing. A row with no `is_response_*_safe` label (HH-RLHF
pairs) feeds the pairwise term only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Safety label encoding in batches: 1 safe, 0 unsafe, −1 unknown.
SAFE, UNSAFE, UNKNOWN = 1, 0, -1


def cost_model_loss(
    cost_0: torch.Tensor,
    cost_1: torch.Tensor,
    safer_id: torch.Tensor,
    safe_0: torch.Tensor,
    safe_1: torch.Tensor,
    regularization: float = 1e-3,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss over a batch (every row must have `safer_id` ∈ {0, 1}) and its statistics.

    Statistics: `pair_acc` (share of pairs with c_unsafer > c_safer), `sign_acc` (share of labelled
    responses whose verdict `cost > 0` matches "unsafe"; NaN when none is labelled), `n_sign`, `cost_mean`.
    """
    safer_is_0 = safer_id == 0
    c_safer = torch.where(safer_is_0, cost_0, cost_1)
    c_unsafer = torch.where(safer_is_0, cost_1, cost_0)
    per_row = -F.logsigmoid(c_unsafer - c_safer)
    correct, labelled = 0.0, 0
    for cost, safe in ((cost_0, safe_0), (cost_1, safe_1)):
        known = safe != UNKNOWN
        sign = torch.where(safe == SAFE, -1.0, 1.0).to(cost)
        per_row = per_row + torch.where(known, -F.logsigmoid(sign * cost), torch.zeros_like(cost))
        correct += ((cost > 0) == (safe == UNSAFE))[known].float().sum().item()
        labelled += int(known.sum().item())
    costs = torch.cat([cost_0, cost_1])
    loss = per_row.mean() + regularization * costs.square().mean()
    return loss, {
        "loss": loss.item(),
        "pair_acc": (c_unsafer > c_safer).float().mean().item(),
        "sign_acc": correct / labelled if labelled else math.nan,
        "n_sign": float(labelled),
        "cost_mean": costs.mean().item(),
    }
