"""The preference losses against numbers computed by hand, and the loss registry."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from safealign.core.errors import SafeAlignError
from safealign.losses import (
    LossSettings,
    PreferenceBatch,
    PreferenceLoss,
    available_losses,
    describe_losses,
    get_loss,
    mm_dpo_beta,
    register_loss,
)


def safe_mm_dpo_loss(
    policy_logps_0, policy_logps_1, ref_logps_0, ref_logps_1, better_id, safer_id, delta_h, delta_s, lam, beta_ori, w, k
):
    """The registered `safe_mm_dpo` loss on one batch, called as the trainer calls it."""
    batch = PreferenceBatch(
        policy_logps_0, policy_logps_1, ref_logps_0, ref_logps_1, better_id, safer_id, delta_h, delta_s
    )
    return get_loss("safe_mm_dpo")(LossSettings(beta_ori=beta_ori, w=w, k=k))(batch, lam)


def t(*values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def ids(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# β(δ) = 0.1·(1 + 0.5·(1 − e^(−0.5·max(δ,0)))):
#   δ=−1 → clamp 0 → 0.1;  δ=0 → 0.1;  δ=1 → 0.1·(1 + 0.5·(1 − 0.6065307)) = 0.11967347;
#   δ=2 → 0.1·(1 + 0.5·(1 − 0.3678794)) = 0.13160603
def test_mm_dpo_beta_by_hand_with_negative_margins_clamped():
    beta = mm_dpo_beta(t(-1.0, 0.0, 1.0, 2.0), beta_ori=0.1, w=0.5, k=0.5)
    assert beta.tolist() == pytest.approx([0.1, 0.1, 0.11967347, 0.13160603], abs=1e-7)


def test_mm_dpo_beta_is_bounded_and_never_flips_sign():
    beta = mm_dpo_beta(t(-100.0, 1e6), beta_ori=0.1, w=1.0, k=0.5)
    assert beta.tolist() == pytest.approx([0.1, 0.2])


def one_row(lam: float, **overrides):
    # h = (−10 − (−11)) − (−12 − (−11)) = 1 − (−1) = 2; helpful prefers 0 (s=+1), harmless prefers 1 (s=−1).
    args = dict(
        policy_logps_0=t(-10.0),
        policy_logps_1=t(-12.0),
        ref_logps_0=t(-11.0),
        ref_logps_1=t(-11.0),
        better_id=ids(0),
        safer_id=ids(1),
        delta_h=t(2.0),
        delta_s=t(-3.0),
        lam=lam,
        beta_ori=0.1,
        w=0.5,
        k=0.5,
    )
    args.update(overrides)
    return safe_mm_dpo_loss(**args)


# L_H = −log σ(0.13160603·(+1)·2) = log(1 + e^(−0.26321206)) = log(1.76859739) = 0.57017634
# L_S = −log σ(0.1·(−1)·2)        = log(1 + e^(0.2))         = 0.79813887   (δ_S = −3 clamps: β = β_ori)
L_H, L_S = 0.57017634, 0.79813887


def test_safe_mm_dpo_one_row_by_hand():
    loss, stats = one_row(lam=1.0)
    assert loss.item() == pytest.approx(0.5 * L_H + 0.5 * L_S, abs=1e-6)
    assert stats["loss_h"] == pytest.approx(L_H, abs=1e-6)
    assert stats["loss_s"] == pytest.approx(L_S, abs=1e-6)
    assert stats["beta_h_mean"] == pytest.approx(0.13160603, abs=1e-7)
    assert stats["beta_s_mean"] == pytest.approx(0.1, abs=1e-7)
    assert (stats["acc_h"], stats["acc_s"]) == (1.0, 0.0)  # h > 0 agrees with helpful, not with harmless


def test_lambda_zero_is_pure_helpful_and_large_lambda_is_pure_safe():
    assert one_row(lam=0.0)[0].item() == pytest.approx(L_H, abs=1e-6)
    assert one_row(lam=1e6)[0].item() == pytest.approx(L_S, abs=1e-5)
    # λ = 3: L_H/4 + 3·L_S/4
    assert one_row(lam=3.0)[0].item() == pytest.approx(0.25 * L_H + 0.75 * L_S, abs=1e-6)
    # beyond float32's range the formula as written is inf/inf = NaN; the weight form stays L_S
    assert one_row(lam=1e39)[0].item() == pytest.approx(L_S, abs=1e-6)


def test_rows_missing_a_dimension_feed_only_the_other():
    # Row A: helpful only (prefers 0); row B: harmless only (prefers 1). h_A = 2, h_B = −1.
    loss, stats = safe_mm_dpo_loss(
        t(-10.0, -5.0),
        t(-12.0, -4.0),
        t(-11.0, -5.0),
        t(-11.0, -5.0),
        ids(0, -1),
        ids(-1, 1),
        t(0.0, float("nan")),  # B's helpful margin is a placeholder: it must not reach the loss
        t(float("nan"), 0.0),
        lam=1.0,
        beta_ori=0.1,
        w=0.5,
        k=0.5,
    )
    # L_H = log(1 + e^(−0.2)) = 0.59813887 (row A only); L_S = log(1 + e^(−0.1·(−1)·(−1))) = log(1+e^(−0.1)) = 0.64439666
    assert stats["n_h"] == 1 and stats["n_s"] == 1
    assert stats["loss_h"] == pytest.approx(0.59813887, abs=1e-6)
    assert stats["loss_s"] == pytest.approx(0.64439666, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * 0.59813887 + 0.5 * 0.64439666, abs=1e-6)


def test_absent_dimension_contributes_zero_with_finite_gradient():
    policy_0 = t(-10.0, -9.0).requires_grad_()
    loss, stats = safe_mm_dpo_loss(
        policy_0, t(-12.0, -9.5), t(-11.0, -9.0), t(-11.0, -9.0), ids(0, 1), ids(-1, -1),
        t(1.0, 1.0), t(float("nan"), float("nan")), lam=2.0, beta_ori=0.1, w=0.5, k=0.5,
    )  # fmt: skip
    assert stats["n_s"] == 0 and math.isnan(stats["loss_s"])
    assert loss.item() == pytest.approx(stats["loss_h"] / 3.0, abs=1e-7)  # L_H/(1+λ) + λ·0/(1+λ)
    loss.backward()
    assert torch.isfinite(policy_0.grad).all()


def test_gradient_signs():
    # Both dimensions prefer response 0: raising log π(y0) must lower the loss, raising log π(y1) must raise it.
    p0, p1 = t(-10.0).requires_grad_(), t(-10.0).requires_grad_()
    loss, _ = safe_mm_dpo_loss(p0, p1, t(-10.0), t(-10.0), ids(0), ids(0), t(1.0), t(1.0), 1.0, 0.1, 0.5, 0.5)
    loss.backward()
    assert p0.grad.item() < 0 < p1.grad.item()

    # better ≠ safer with λ → ∞: the harmless label (prefer 1) wins, so the signs flip.
    p0, p1 = t(-10.0).requires_grad_(), t(-10.0).requires_grad_()
    loss, _ = safe_mm_dpo_loss(p0, p1, t(-10.0), t(-10.0), ids(0), ids(1), t(1.0), t(1.0), 1e4, 0.1, 0.5, 0.5)
    loss.backward()
    assert p0.grad.item() > 0 > p1.grad.item()


def test_conflicting_labels_cancel_at_equal_weight():
    # better ≠ safer, λ = 1, equal β (w = 0), h = 0: the two pulls are equal and opposite.
    p0 = t(-10.0).requires_grad_()
    loss, _ = safe_mm_dpo_loss(p0, t(-10.0), t(-10.0), t(-10.0), ids(0), ids(1), t(2.0), t(2.0), 1.0, 0.1, 0.0, 0.5)
    loss.backward()
    assert p0.grad.item() == pytest.approx(0.0, abs=1e-8)
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-7)


def batch(**overrides) -> PreferenceBatch:
    fields = dict(
        policy_logps_0=t(-10.0, -20.0, -7.0),
        policy_logps_1=t(-12.0, -19.0, -7.5),
        ref_logps_0=t(-11.0, -20.5, -7.0),
        ref_logps_1=t(-11.5, -19.0, -7.0),
        better_id=ids(0, 1, 0),
        safer_id=ids(1, 1, -1),
        delta_h=t(2.0, 0.5, -1.0),
        delta_s=t(1.0, 3.0, 0.0),
    )
    return PreferenceBatch(**{**fields, **overrides})


def test_dpo_matches_openrlhfs_own_dpo_loss():
    from openrlhf.models import DPOLoss as OpenRLHFDPOLoss

    b = batch(better_id=ids(0, 0, 0))
    ours, stats = get_loss("dpo")(LossSettings(beta_ori=0.1, dimension="helpful"))(b, lam=0.0)
    theirs, _, _ = OpenRLHFDPOLoss(beta=0.1)(b.policy_logps_0, b.policy_logps_1, b.ref_logps_0, b.ref_logps_1)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-7)
    assert stats["n_s"] == 2  # the other dimension is still measured


def test_mm_dpo_with_w_zero_is_dpo_and_dimension_selects_labels():
    b = batch()
    for dimension in ("helpful", "safe"):
        dpo, _ = get_loss("dpo")(LossSettings(beta_ori=0.1, dimension=dimension))(b, lam=0.0)
        mm0, _ = get_loss("mm_dpo")(LossSettings(beta_ori=0.1, w=0.0, dimension=dimension))(b, lam=0.0)
        mm, stats = get_loss("mm_dpo")(LossSettings(beta_ori=0.1, w=1.0, dimension=dimension))(b, lam=0.0)
        assert dpo.item() == pytest.approx(mm0.item(), abs=1e-7)
        assert mm.item() == pytest.approx(stats["loss_h" if dimension == "helpful" else "loss_s"], abs=1e-7)
    safe_loss, _ = get_loss("dpo")(LossSettings(dimension="safe"))(b, lam=0.0)
    helpful_loss, _ = get_loss("dpo")(LossSettings(dimension="helpful"))(b, lam=0.0)
    assert safe_loss.item() != pytest.approx(helpful_loss.item())


def test_registry_names_and_errors():
    assert {"dpo", "mm_dpo", "safe_mm_dpo"} <= set(available_losses())
    assert get_loss("safe_mm_dpo").uses_lambda and not get_loss("dpo").uses_lambda
    with pytest.raises(SafeAlignError, match="unknown loss 'nope'.*safe_mm_dpo"):
        get_loss("nope")
    with pytest.raises(TypeError):
        register_loss("not_a_loss")(object)
    with pytest.raises(ValueError, match="already registered"):

        @register_loss("dpo")
        class Clash(PreferenceLoss):
            def __call__(self, batch, lam):
                raise NotImplementedError


def test_entry_point_loss_from_another_package(tmp_path, monkeypatch):
    """A loss shipped by another distribution is found through the `safealign.losses` group."""
    (tmp_path / "my_losses.py").write_text(
        textwrap.dedent(
            """
            from safealign.losses import PreferenceLoss

            class HingeLoss(PreferenceLoss):
                reads = frozenset({"beta_ori", "dimension"})

                def __call__(self, batch, lam):
                    h = batch.log_ratio_margin
                    loss = (1 - self.settings.beta_ori * h).clamp(min=0).mean()
                    return loss, {"loss_h": loss.item()}
            """
        )
    )
    dist_info = tmp_path / "my_losses-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-losses\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[safealign.losses]\nhinge = my_losses:HingeLoss\nbroken = my_losses:Nothing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_losses", raising=False)

    assert "hinge" in available_losses()
    loss_cls = get_loss("hinge")
    value, _ = loss_cls(LossSettings(beta_ori=0.5))(batch(), lam=0.0)
    h = batch().log_ratio_margin
    assert value.item() == pytest.approx((1 - 0.5 * h).clamp(min=0).mean().item())
    with pytest.raises(SafeAlignError, match="broken.*failed to load"):
        get_loss("broken")
    # `safealign losses` lists what works and names what does not, instead of one traceback for all
    described = {name: (summary, loads) for name, summary, loads in describe_losses()}
    assert described["broken"][1] is False and "'my_losses:Nothing' for loss 'broken' failed to load" in described["broken"][0]
    assert described["hinge"] == ("HingeLoss", True)  # no docstring: its class name
    assert described["safe_mm_dpo"][1] and described["safe_mm_dpo"][0] == get_loss("safe_mm_dpo").summary()


def mixed_global_batch(policy_0: torch.Tensor) -> PreferenceBatch:
    """4 rows: 0 and 1 carry both labels, 2 and 3 are harmless-only (as HH-RLHF rows are)."""
    return PreferenceBatch(
        policy_logps_0=policy_0,
        policy_logps_1=t(-12.0, -19.0, -7.5, -32.0),
        ref_logps_0=t(-11.0, -20.5, -7.0, -29.0),
        ref_logps_1=t(-11.5, -19.0, -7.0, -31.0),
        better_id=ids(0, 1, -1, -1),
        safer_id=ids(1, 1, 0, 1),
        delta_h=t(2.0, 0.5, 0.0, 0.0),
        delta_s=t(1.0, 3.0, 0.5, 2.0),
    )


def split_loss(rows: list[int], micro: int, lam: float, global_counts: bool):
    """Σ of the micro-batches' losses over `rows` in that order (what the trainer back-propagates, up to
    DeepSpeed's averaging constant), and the gradient w.r.t. the policy log-probs of response 0."""
    policy_0 = t(-10.0, -20.0, -7.0, -28.0).requires_grad_()
    full = mixed_global_batch(policy_0)
    counts = dict(global_count_h=2, global_count_s=4) if global_counts else {}
    loss = get_loss("safe_mm_dpo")(LossSettings())
    total = 0.0
    for start in range(0, len(rows), micro):
        index = torch.tensor(rows[start : start + micro])
        part = PreferenceBatch(
            **{name: getattr(full, name)[index] for name in (
                "policy_logps_0", "policy_logps_1", "ref_logps_0", "ref_logps_1",
                "better_id", "safer_id", "delta_h", "delta_s",
            )},
            **counts,
        )  # fmt: skip
        share, _ = loss(part, lam)
        total = total + share
    if not global_counts:  # DeepSpeed's mean over micro-batches
        total = total / math.ceil(len(rows) / micro)
    total.backward()
    return total.item(), policy_0.grad.clone()


def test_the_objective_is_the_global_batch_formula_whatever_the_micro_batching():
    """L = L_H/(1+λ) + λ·L_S/(1+λ), each term the mean over the global batch's labelled rows, by hand;
    every micro-batching and row order gives that loss and that gradient."""
    # h per row: (−10+11) − (−12+11.5) = 1.5; (−20+20.5) − (−19+19) = 0.5; 0 − (−7.5+7) = 0.5; 1 − (−1) = 2
    policy_0 = t(-10.0, -20.0, -7.0, -28.0)
    h = mixed_global_batch(policy_0).log_ratio_margin
    assert h.tolist() == pytest.approx([1.5, 0.5, 0.5, 2.0])
    beta = lambda d: 0.1 * (1 + 0.5 * (1 - math.exp(-0.5 * d)))  # noqa: E731
    nll = lambda z: math.log1p(math.exp(-z))  # noqa: E731  (−log σ(z))
    l_h = (nll(beta(2.0) * 1.5) + nll(beta(0.5) * -0.5)) / 2  # better 0 and 1: s = +1, −1
    # safer 1, 1, 0, 1: s = −1, −1, +1, −1
    l_s = (nll(beta(1.0) * -1.5) + nll(beta(3.0) * -0.5) + nll(beta(0.5) * 0.5) + nll(beta(2.0) * -2.0)) / 4
    lam = 1.0
    expected = l_h / (1 + lam) + lam * l_s / (1 + lam)

    reference_loss, reference_grad = split_loss([0, 1, 2, 3], 4, lam, global_counts=True)
    assert reference_loss == pytest.approx(expected, abs=1e-6)
    for rows in ([0, 1, 2, 3], [2, 0, 3, 1], [0, 2, 1, 3]):
        for micro in (1, 2, 4):
            loss, grad = split_loss(rows, micro, lam, global_counts=True)
            assert loss == pytest.approx(expected, abs=1e-6), (rows, micro)
            assert torch.allclose(grad, reference_grad, atol=1e-7), (rows, micro)

    # Per-micro-batch means (what the trainer did before) depend on the batching: this test can fail.
    per_micro = {split_loss(rows, 2, lam, global_counts=False)[0] for rows in ([0, 1, 2, 3], [0, 2, 1, 3])}
    assert len(per_micro) == 2 and any(v != pytest.approx(expected, abs=1e-4) for v in per_micro)


def test_a_global_count_below_the_batch_own_is_refused():
    with pytest.raises(ValueError, match="global_count"):
        get_loss("safe_mm_dpo")(LossSettings())(batch(global_count_h=1), 1.0)
