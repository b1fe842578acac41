"""Tests with runs as the unit, and the multiplicity correction a report's family of tests needs.

Why runs: two seeds of one objective on the same pairs land several points apart (issue 25 measured
4-6 points of held-out accuracy), so a test whose unit is the pair — holding one run per variant — calls
seed noise an effect. Here each run contributes one number (its mean over the same held-out pairs,
which pairs out the pairs' own spread), and Welch's t-test compares the runs of two variants: its
variance is the run-to-run variance. With 3 runs a side it has few degrees of freedom; that is the
price of not overstating.

No SciPy: Student's t tail is the regularized incomplete beta function (Numerical Recipes' continued
fraction, modified Lentz), checked in the tests against tabulated quantiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

Alternative = Literal["two-sided", "greater"]


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_test_p(t: float, df: float, alternative: Alternative = "two-sided") -> float:
    """p of Student's t statistic `t` with `df` degrees of freedom (non-integer allowed: Welch's)."""
    two_sided = regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    if alternative == "two-sided":
        return two_sided
    return two_sided / 2.0 if t > 0 else 1.0 - two_sided / 2.0


def mean_and_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with fewer than 2 values)."""
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def welch_t_test(treatment: Sequence[float], control: Sequence[float], alternative: Alternative = "two-sided") -> dict:
    """Welch's unequal-variance t-test of mean(treatment) − mean(control), Welch–Satterthwaite degrees of
    freedom; `greater`: the one-sided test that the treatment's mean is larger. p is None when either side
    has fewer than 2 runs or neither varies (nothing to weigh the difference against)."""
    (mean_t, sd_t), (mean_c, sd_c) = mean_and_sd(treatment), mean_and_sd(control)
    result = {"difference": mean_t - mean_c, "runs": [len(treatment), len(control)], "alternative": alternative}
    if sd_t is None or sd_c is None or sd_t == sd_c == 0.0:
        return {**result, "t": None, "df": None, "p_value": None}
    var_t, var_c = sd_t**2 / len(treatment), sd_c**2 / len(control)
    t = (mean_t - mean_c) / math.sqrt(var_t + var_c)
    df = (var_t + var_c) ** 2 / (var_t**2 / (len(treatment) - 1) + var_c**2 / (len(control) - 1))
    return {**result, "t": t, "df": df, "p_value": t_test_p(t, df, alternative)}


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family's p-values (Holm 1979), in the given order; a None (a
    test that could not be run) stays None and does not count toward the family's size."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[i] = running
    return adjusted


def mean_interval(values: Sequence[float]) -> dict:
    """Mean of `values` with its 95 % t interval (n − 1 degrees of freedom)."""
    mean, sd = mean_and_sd(values)
    if sd is None:
        return {"mean": mean, "n": len(values), "ci95": None}
    half = t_quantile_975(len(values) - 1) * sd / math.sqrt(len(values))
    return {"mean": mean, "n": len(values), "ci95": [mean - half, mean + half]}


def t_quantile_975(df: float) -> float:
    """The 97.5 % quantile of Student's t (bisection on `t_test_p`): the half-width factor of a 95 % interval."""
    low, high = 0.0, 1e3
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_test_p(middle, df) > 0.05 else (low, middle)
    return (low + high) / 2
