"""Preference losses: a registry plus the built-ins `dpo`, `mm_dpo` and `safe_mm_dpo`.

Every loss sees the same per-row inputs (`PreferenceBatch`): the summed response log-probs of both
responses under the policy and the reference, the two label ids and the two reward-model margins. All
three built-ins therefore run from one policy forward and one reference forward per step, and an
ablation is a change of name in the recipe, not a change of code path.

Notation (one row): `h = [log πθ(y0) − log πref(y0)] − [log πθ(y1) − log πref(y1)]`; for a dimension
with preferred id `i`, its orientation is `s = +1` if `i == 0` else `−1`, and `id == −1` means the row
carries no label for that dimension (it then feeds no term of that dimension).

- DPO (Rafailov et al. 2023, eq. 7): `L = −log σ(β · s · h)`.
- MM-DPO (MM-RLHF, Zhang et al. 2025, §4): `β(δ) = β_ori · (1 + w · (1 − e^(−k·δ)))`, δ the reward-model
  margin in the label's direction, clamped at 0 so a disagreeing RM can only leave β at β_ori, never
  flip the sign of the loss (the bracket is unbounded below for δ < 0).
- Safe-MM-DPO: `L = L_H/(1+λ) + λ·L_S/(1+λ)`, the Safe RLHF Lagrangian (Dai et al. 2024, eq. 13) with
  both terms MM-DPO losses over the same pair, λ the multiplier of `safealign.domain.lagrange`.

Another package adds a loss by subclassing `PreferenceLoss` and exposing it as an entry point in the
group `safealign.losses` (`my_loss = my_pkg.losses:MyLoss`), then naming it in a recipe (`align.loss`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from safealign.core.errors import SafeAlignError
from safealign.domain.data import Dimension

ENTRY_POINT_GROUP = "safealign.losses"



@dataclass
class PreferenceBatch:
    """Per-row inputs of a preference loss; every tensor has shape `[B]`.

    `policy_logps_*`/`ref_logps_*` are sums of response-token log-probs. `better_id`/`safer_id` are
    0, 1, or −1 (no label). `delta_h`/`delta_s` are reward-model margins in the label's direction
    (0 where the data carries none).
    """

    policy_logps_0: torch.Tensor
    policy_logps_1: torch.Tensor
    ref_logps_0: torch.Tensor
    ref_logps_1: torch.Tensor
    better_id: torch.Tensor
    safer_id: torch.Tensor
    delta_h: torch.Tensor
    delta_s: torch.Tensor
    #: Rows labelled helpful / harmless in the whole global batch this batch is part of (all its
    #: micro-batches on all ranks); None: this batch is the whole global batch.
    global_count_h: int | None = None
    global_count_s: int | None = None

    @property
    def log_ratio_margin(self) -> torch.Tensor:
        """`h`: how much more the policy (relative to the reference) prefers response 0 over 1."""
        return (self.policy_logps_0 - self.ref_logps_0) - (self.policy_logps_1 - self.ref_logps_1)


@dataclass(frozen=True)
class LossSettings:
    """The recipe's loss hyper-parameters (section `align`), handed to every loss constructor.

    `options` carries `align.loss_options` verbatim for losses from other packages.
    """

    beta_ori: float = 0.1
    w: float = 0.5
    k: float = 0.5
    dimension: Dimension = "helpful"
    options: Mapping[str, Any] = field(default_factory=dict)


def mm_dpo_beta(delta: torch.Tensor, beta_ori: float, w: float, k: float) -> torch.Tensor:
    """MM-DPO's per-sample scale `β_ori·(1 + w·(1 − exp(−k·max(δ, 0))))`, elementwise.

    Bounded in `[β_ori, β_ori·(1 + w)]` for w ≥ 0: confident margins sharpen the loss, a margin at or
    below zero (the RM is unsure or disagrees with the label) leaves plain DPO.
    """
    return beta_ori * (1.0 + w * (1.0 - torch.exp(-k * delta.clamp(min=0.0))))


@dataclass
class DimensionTerm:
    """One dimension's DPO term over the rows labelled for it, with the numbers worth logging.

    `loss` is this batch's *share* of the global batch's term: the sum over its labelled rows divided
    by the labelled rows of the whole global batch. Summing the shares of all micro-batches on all
    ranks gives exactly the global mean, however the rows fell into micro-batches. `mean` is the mean
    over this batch's own labelled rows (what statistics report, weighted by `count`).
    """

    loss: torch.Tensor  # 0 (with grad) when no row is labelled
    mean: float
    accuracy: float  # share of labelled rows whose log-ratio margin points the labelled way
    beta_mean: float
    count: int


def dimension_term(
    h: torch.Tensor, preferred_id: torch.Tensor, beta: torch.Tensor, global_count: int | None = None
) -> DimensionTerm:
    """`Σ over rows with id ∈ {0,1} of −log σ(β · s · h)` / `global_count` (default: this batch's
    labelled rows, i.e. the mean), `s = +1 if id == 0 else −1`.

    Unlabelled rows are removed before the loss, so a NaN placeholder in them can never reach a
    gradient; an absent dimension contributes an exact zero that still keeps the graph connected.
    """
    labelled = preferred_id >= 0
    count = int(labelled.sum().item())
    if count == 0:
        return DimensionTerm(loss=h.sum() * 0.0, mean=math.nan, accuracy=math.nan, beta_mean=math.nan, count=0)
    normaliser = count if global_count is None else global_count
    if normaliser < count:
        raise ValueError(f"global_count ({normaliser}) is below this batch's own labelled rows ({count})")
    orientation = 1.0 - 2.0 * preferred_id[labelled].to(h.dtype)
    oriented = orientation * h[labelled]
    beta = beta[labelled]
    total = -F.logsigmoid(beta * oriented).sum()
    return DimensionTerm(
        loss=total / normaliser,
        mean=total.item() / count,
        accuracy=(oriented > 0).float().mean().item(),
        beta_mean=beta.mean().item(),
        count=count,
    )


def _term_stats(suffix: str, term: DimensionTerm) -> dict[str, float]:
    return {
        f"loss_{suffix}": term.mean,
        f"acc_{suffix}": term.accuracy,
        f"beta_{suffix}_mean": term.beta_mean,
        f"n_{suffix}": float(term.count),
    }


def _labelled_only(delta: torch.Tensor, preferred_id: torch.Tensor) -> torch.Tensor:
    """Margins with unlabelled rows set to 0, so their (unused) β is finite."""
    return torch.where(preferred_id >= 0, delta, torch.zeros_like(delta))


def preference_terms(
    batch: PreferenceBatch, beta_h: torch.Tensor, beta_s: torch.Tensor
) -> tuple[DimensionTerm, DimensionTerm]:
    """The helpful and harmless DPO terms of one batch: both from the same `h` (one forward)."""
    h = batch.log_ratio_margin
    return (
        dimension_term(h, batch.better_id, beta_h, batch.global_count_h),
        dimension_term(h, batch.safer_id, beta_s, batch.global_count_s),
    )


def mm_dpo_terms(batch: PreferenceBatch, beta_ori: float, w: float, k: float) -> tuple[DimensionTerm, DimensionTerm]:
    """Both dimensions' terms, each with MM-DPO's scale of its own margin."""
    return preference_terms(
        batch,
        mm_dpo_beta(_labelled_only(batch.delta_h, batch.better_id), beta_ori, w, k),
        mm_dpo_beta(_labelled_only(batch.delta_s, batch.safer_id), beta_ori, w, k),
    )


def lagrangian_mix(helpful: DimensionTerm, safe: DimensionTerm, lam: float) -> tuple[torch.Tensor, dict[str, float]]:
    """`L_H/(1+λ) + λ·L_S/(1+λ)` (this batch's share of it) and both terms' statistics; λ is a constant.

    Computed as `(1−w)·L_H + w·L_S` with `w = λ/(1+λ)` taken in float64 (a Python float) before it meets
    the float32 losses: written as the formula, a λ beyond float32's range (≈ 3.4e38) becomes inf in the
    tensor arithmetic and inf/inf is NaN, while w is exactly the weight in [0, 1] for every λ.
    Linear in the two shares, so the shares of a global batch's micro-batches add up to the formula
    over the global batch: one weighting, whatever the batching."""
    weight_s = float(lam) / (1.0 + float(lam))
    loss = (1.0 - weight_s) * helpful.loss + weight_s * safe.loss
    return loss, {**_term_stats("h", helpful), **_term_stats("s", safe), "lambda": lam}


# --- registry ---------------------------------------------------------------------------------------


class PreferenceLoss(ABC):
    """Base class of every registered loss.

    `reads` names the `align` recipe keys the loss uses: a recipe that sets any other loss key is
    rejected, so no setting is silently ignored. `uses_lambda` says whether the Lagrange multiplier
    enters the loss (the trainer then runs the dual update).
    """

    name: ClassVar[str] = ""
    reads: ClassVar[frozenset[str]] = frozenset()
    uses_lambda: ClassVar[bool] = False

    def __init__(self, settings: LossSettings) -> None:
        self.settings = settings

    @classmethod
    def summary(cls) -> str:
        """One line on what the loss trains: its docstring's first line (the log and `safealign losses`)."""
        lines = (cls.__doc__ or "").strip().splitlines()
        return lines[0] if lines else cls.__qualname__

    @abstractmethod
    def __call__(self, batch: PreferenceBatch, lam: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the scalar loss and its statistics (floats; NaN where undefined)."""


_REGISTRY: dict[str, type[PreferenceLoss]] = {}


def register_loss(name: str):
    """Class decorator: make a `PreferenceLoss` subclass selectable as `align.loss: <name>`."""

    def decorate(cls: type[PreferenceLoss]) -> type[PreferenceLoss]:
        if not (isinstance(cls, type) and issubclass(cls, PreferenceLoss)):
            raise TypeError(f"register_loss({name!r}) needs a PreferenceLoss subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a loss named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _entry_point_losses() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_losses() -> list[str]:
    """Names of the built-in, registered and entry-point losses."""
    return sorted(set(_REGISTRY) | set(_entry_point_losses()))


def describe_losses() -> list[tuple[str, str, bool]]:
    """Every loss with its summary, and whether it loads: a plugin that fails to import is listed with
    its one-line error instead of hiding every other loss behind a traceback."""
    described = []
    for name in available_losses():
        try:
            described.append((name, get_loss(name).summary(), True))
        except SafeAlignError as exc:
            described.append((name, str(exc), False))
    return described


def get_loss(name: str) -> type[PreferenceLoss]:
    """The loss class registered under `name` (built-ins first, then entry points)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    entry_point = _entry_point_losses().get(name)
    if entry_point is None:
        raise SafeAlignError(f"align.loss: unknown loss {name!r}; available: {', '.join(available_losses())}")
    try:
        cls = entry_point.load()
    except Exception as exc:  # a third-party import error: say which entry point broke
        raise SafeAlignError(
            f"align.loss: entry point {entry_point.value!r} for loss {name!r} failed to load: {exc}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, PreferenceLoss)):
        raise SafeAlignError(f"align.loss: entry point {entry_point.value!r} is not a safealign.losses.PreferenceLoss")
    return register_loss(name)(cls)


class _SingleDimensionLoss(PreferenceLoss):
    """DPO-style loss on one dimension; the other dimension is still measured, for ablations."""

    @abstractmethod
    def terms(self, batch: PreferenceBatch) -> tuple[DimensionTerm, DimensionTerm]:
        """Both dimensions' terms under this loss's β."""

    def __call__(self, batch: PreferenceBatch, lam: float) -> tuple[torch.Tensor, dict[str, float]]:
        helpful, safe = self.terms(batch)
        trained = helpful if self.settings.dimension == "helpful" else safe
        return trained.loss, {**_term_stats("h", helpful), **_term_stats("s", safe)}


@register_loss("dpo")
class DPOLoss(_SingleDimensionLoss):
    """Plain DPO (Rafailov et al. 2023, eq. 7) with constant β = `beta_ori` on `dimension`'s labels."""

    reads = frozenset({"beta_ori", "dimension"})

    def terms(self, batch: PreferenceBatch) -> tuple[DimensionTerm, DimensionTerm]:
        beta = torch.full_like(batch.delta_h, self.settings.beta_ori)
        return preference_terms(batch, beta, beta)


@register_loss("mm_dpo")
class MMDPOLoss(_SingleDimensionLoss):
    """MM-DPO (MM-RLHF §4): DPO with the per-sample scale `mm_dpo_beta` of that dimension's margin."""

    reads = frozenset({"beta_ori", "w", "k", "dimension"})

    def terms(self, batch: PreferenceBatch) -> tuple[DimensionTerm, DimensionTerm]:
        s = self.settings
        return mm_dpo_terms(batch, s.beta_ori, s.w, s.k)


@register_loss("safe_mm_dpo")
class SafeMMDPOLoss(PreferenceLoss):
    """Safe-MM-DPO: `L_H/(1+λ) + λ·L_S/(1+λ)`, both MM-DPO terms over the same response pair.

    λ is a constant here (detached): it is moved by the dual update in `safealign.domain.lagrange`, never by
    this loss's gradient. Statistics: `loss_h, loss_s, acc_h, acc_s, beta_h_mean, beta_s_mean, n_h,
    n_s, lambda` (NaN for a dimension no row of the batch carries).
    """

    reads = frozenset({"beta_ori", "w", "k"})
    uses_lambda = True

    def __call__(self, batch: PreferenceBatch, lam: float) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        return lagrangian_mix(*mm_dpo_terms(batch, s.beta_ori, s.w, s.k), float(lam))
