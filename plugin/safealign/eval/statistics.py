"""The report's statistics, each from a library: tests with runs as the unit (Welch), paired tests
on shared prompts (exact sign / McNemar), binomial intervals (Wilson) and the multiplicity correction a
family of tests needs (Holm).

Why runs: two seeds of one objective on the same pairs land several points apart (issue 25 measured
4-6 points of held-out accuracy), so a test whose unit is the pair — holding one run per variant — calls
seed noise an effect. Here each run contributes one number (its mean over the same held-out pairs,
which pairs out the pairs' own spread), and Welch's t-test compares the runs of two variants: its
variance is the run-to-run variance. With 3 runs a side it has few degrees of freedom; that is the
price of not overstating.

Why exact paired tests: two models answer the same prompts, so their verdicts are paired; overlapping
Wilson intervals of two rates do not mean "no difference", and the paired test sees what they hide.
**Ties** (both safe, both unsafe, equal costs) say nothing about which model is better and are left out
of the test, the convention of the sign test and of McNemar's test (which reads only the discordant
cells); they are counted and reported beside it, never dropped silently.

Student's t tails and the exact binomial come from SciPy (`scipy.stats.t`, `binomtest`); McNemar's exact
test, Wilson's interval and Holm's step-down from statsmodels. The tests pin the numbers by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

Alternative = Literal["two-sided", "greater", "less"]


def t_test_p(t: float, df: float, alternative: Alternative = "two-sided") -> float:
    """p of Student's t statistic `t` with `df` degrees of freedom (non-integer allowed: Welch's)."""
    from scipy.stats import t as student_t  # lazily: scipy is only needed where a report is computed

    if alternative == "two-sided":
        return float(min(1.0, 2.0 * student_t.sf(abs(t), df)))
    return float(student_t.sf(t, df) if alternative == "greater" else student_t.cdf(t, df))


def mean_and_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with fewer than 2 values)."""
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def welch_t_test(treatment: Sequence[float], control: Sequence[float], alternative: Alternative = "two-sided") -> dict:
    """Welch's unequal-variance t-test of mean(treatment) − mean(control), Welch–Satterthwaite degrees of
    freedom; `greater` / `less`: the one-sided test that the treatment's mean is larger / smaller. p is None when either side
    has fewer than 2 runs or neither varies (nothing to weigh the difference against)."""
    (mean_t, sd_t), (mean_c, sd_c) = mean_and_sd(treatment), mean_and_sd(control)
    result = {"difference": mean_t - mean_c, "runs": [len(treatment), len(control)], "alternative": alternative}
    if sd_t is None or sd_c is None or sd_t == sd_c == 0.0:
        return {**result, "t": None, "df": None, "p_value": None}
    var_t, var_c = sd_t**2 / len(treatment), sd_c**2 / len(control)
    t = (mean_t - mean_c) / math.sqrt(var_t + var_c)
    df = (var_t + var_c) ** 2 / (var_t**2 / (len(treatment) - 1) + var_c**2 / (len(control) - 1))
    return {**result, "t": t, "df": df, "p_value": t_test_p(t, df, alternative)}


def paired_t_test(treatment: Sequence[float], control: Sequence[float], alternative: Alternative = "two-sided") -> dict:
    """Student's t on the differences of paired runs (`treatment[i]` with `control[i]`, e.g. one seed each),
    n − 1 degrees of freedom: what both runs of a pair share (the seed's data order and draws) cancels, so
    a small, consistent difference is not drowned by a large seed-to-seed spread. Same keys as
    `welch_t_test`; p is None with fewer than 2 pairs or when the differences do not vary."""
    if len(treatment) != len(control):
        raise ValueError(f"paired runs: {len(treatment)} against {len(control)}")
    differences = [t - c for t, c in zip(treatment, control)]
    mean, sd = mean_and_sd(differences) if differences else (math.nan, None)
    result = {"difference": mean, "runs": [len(treatment), len(control)], "alternative": alternative, "paired": True}
    if sd is None or sd == 0.0:
        return {**result, "t": None, "df": None, "p_value": None}
    t = mean / (sd / math.sqrt(len(differences)))
    df = len(differences) - 1
    return {**result, "t": t, "df": df, "p_value": t_test_p(t, df, alternative)}


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family's p-values (Holm 1979), in the given order; a None (a
    test that could not be run) stays None and does not count toward the family's size."""
    from statsmodels.stats.multitest import multipletests

    present = [i for i, p in enumerate(p_values) if p is not None]
    adjusted: list[float | None] = [None] * len(p_values)
    if present:
        corrected = multipletests([p_values[i] for i in present], method="holm")[1]
        for i, p in zip(present, corrected):
            adjusted[i] = float(p)
    return adjusted


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial p of `wins` against `losses` under "no difference" (p = ½), ties left
    out by the caller (see the module docstring); 1.0 with no untied pair."""
    from scipy.stats import binomtest

    n = wins + losses
    return float(binomtest(wins, n, 0.5).pvalue) if n else 1.0


def mcnemar_p(only_first: int, only_second: int) -> float:
    """McNemar's exact test of paired verdicts: `only_first` items the first model gets right and the
    second wrong, `only_second` the reverse (the concordant cells do not enter the test)."""
    from statsmodels.stats.contingency_tables import mcnemar

    if only_first + only_second == 0:
        return 1.0
    return float(mcnemar([[0, only_first], [only_second, 0]], exact=True).pvalue)


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """Wilson's 95 % score interval for a binomial proportion: well-behaved at small n and at rates near
    0 or 1, unlike the normal one; (0, 1) when n = 0."""
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return 0.0, 1.0
    low, high = proportion_confint(successes, n, alpha=0.05, method="wilson")
    p = successes / n  # it always contains p; float rounding can put a bound a hair inside (14/14 -> 0.9999…)
    return max(0.0, min(p, float(low))), min(1.0, max(p, float(high)))


def mean_interval(values: Sequence[float]) -> dict:
    """Mean of `values` with its 95 % t interval (n − 1 degrees of freedom)."""
    mean, sd = mean_and_sd(values)
    if sd is None:
        return {"mean": mean, "n": len(values), "ci95": None}
    half = t_quantile_975(len(values) - 1) * sd / math.sqrt(len(values))
    return {"mean": mean, "n": len(values), "ci95": [mean - half, mean + half]}


def t_quantile_975(df: float) -> float:
    """The 97.5 % quantile of Student's t: the half-width factor of a 95 % interval."""
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.975, df))


def win_rate(pairs: list[tuple[float, float]], higher_wins: bool = True) -> float | None:
    """Share of (model, base) pairs the model wins, a tie counting half; None without pairs."""
    if not pairs:
        return None
    sign = 1.0 if higher_wins else -1.0
    return sum(1.0 if sign * (a - b) > 0 else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
