"""Run-level statistics against tabulated values and values computed by hand."""

from __future__ import annotations

import math

import pytest

from safealign.eval.statistics import holm, mean_interval, paired_t_test, t_quantile_975, t_test_p, welch_t_test


@pytest.mark.parametrize(
    ("t", "df", "p"),
    [
        (2.776445, 4, 0.05),  # Student's t tables: the two-sided 5 % and 1 % points at 4 and 10 df
        (4.604095, 4, 0.01),
        (2.228139, 10, 0.05),
        (1.0, 1, 0.5),  # Cauchy: P(|T| > 1) = 1/2 exactly
        (1.959964, 1e7, 0.05),  # the normal limit
        (0.0, 3, 1.0),
    ],
)
def test_t_tail_matches_the_tables(t, df, p):
    assert t_test_p(t, df) == pytest.approx(p, rel=1e-5, abs=1e-9)
    assert t_test_p(t, df, "greater") == pytest.approx(p / 2, rel=1e-5, abs=1e-9)
    assert t_test_p(-t, df, "greater") == pytest.approx(1 - p / 2, rel=1e-5)
    assert t_test_p(-t, df, "less") == pytest.approx(p / 2, rel=1e-5, abs=1e-9)


def test_welch_by_hand():
    """[1, 2, 3] vs [0, 0, 3]: means 2 and 1, variances 1 and 3; se² = 1/3 + 1 = 4/3, t = √3/2,
    df = (4/3)² / ((1/3)²/2 + 1²/2) = 3.2."""
    result = welch_t_test([1, 2, 3], [0, 0, 3])
    assert result["difference"] == 1.0
    assert result["t"] == pytest.approx(math.sqrt(3) / 2)
    assert result["df"] == pytest.approx(3.2)
    assert result["p_value"] == pytest.approx(t_test_p(math.sqrt(3) / 2, 3.2))
    assert welch_t_test([1, 2, 3], [0, 0, 3], "greater")["p_value"] == pytest.approx(result["p_value"] / 2)
    assert welch_t_test([1.0], [0.0, 1.0])["p_value"] is None  # one run: no run-to-run variance to test against
    assert welch_t_test([1.0, 1.0], [0.0, 0.0])["p_value"] is None


def test_holm_by_hand():
    """p = 0.01, 0.04, 0.03 of 3 tests: sorted 0.01×3 = 0.03, 0.03×2 = 0.06, 0.04×1 -> max(0.06, 0.04)."""
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.01, None, 0.02]) == [pytest.approx(0.02), None, pytest.approx(0.02)]
    assert holm([0.6, 0.9]) == [1.0, 1.0]


def test_mean_interval():
    assert t_quantile_975(4) == pytest.approx(2.776445, rel=1e-5)
    interval = mean_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(2) = 4.302653
    assert interval["mean"] == 2.0
    assert interval["ci95"] == pytest.approx([2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)], rel=1e-5)


def _rows_and_logps(shifts: dict[str, float], noise: dict[str, float]):
    """8 held-out pairs from two files (4 PKU-like with both labels, 4 HH-like harmless-only); the base's
    per-token margins are 0; model m moves every pair's safe margin by shifts[m] + noise[m] (the run's own
    offset) and leaves the helpful margin."""
    from safealign.domain.data import PreferenceRow

    rows = [PreferenceRow(prompt=[{"role": "user", "content": f"q{i}"}], response_0="a", response_1="b",
                          better_response_id=i % 2 if i < 4 else -1, safer_response_id=(i + 1) % 2,
                          source=f"/d/{'pku.jsonl' if i < 4 else 'hh.jsonl.gz'}:{i + 1}") for i in range(8)]  # fmt: skip
    base = {i: (-10.0, -10.0, -1.0, -1.0) for i in range(8)}
    logps = {"base": base}
    for name, shift in shifts.items():
        moved = {}
        for i, row in enumerate(rows):
            means = [-1.0, -1.0]
            means[row.safer_response_id] += shift + noise[name]
            moved[i] = (-10.0, -10.0, *means)
        logps[name] = moved
    return rows, logps


class Primary:
    treatment, controls, measure, dimension, sources, alpha = "dual", ["shuffled"], "margin", "safe", None, 0.01
    paired = False


def test_group_tests_take_runs_as_the_unit_and_a_label_blind_change_does_not_pass():
    from safealign.eval.pairs import group_tests, run_values

    noise = {"d1": 0.001, "d2": -0.002, "d3": 0.0015, "s1": 0.002, "s2": -0.001, "s3": 0.0}
    groups = {"dual": ["d1", "d2", "d3"], "shuffled": ["s1", "s2", "s3"]}
    rows, logps = _rows_and_logps({"d1": 0.1, "d2": 0.1, "d3": 0.1, "s1": 0.0, "s2": 0.0, "s3": 0.0}, noise)
    values = run_values(rows, logps, set(noise))
    assert set(values) == {"safe · pku.jsonl", "helpful · pku.jsonl", "safe · hh.jsonl.gz"}
    assert values["safe · hh.jsonl.gz"]["d2"] == pytest.approx(0.098)  # by hand: 0.1 - 0.002 on every pair
    assert values["helpful · pku.jsonl"]["d1"] == pytest.approx(-0.101)  # each PKU pair's better one is the less safe
    result = group_tests(rows, logps, groups, Primary)
    primary = [c for c in result["comparisons"] if c["family"] == "primary"]
    assert {c["measure"] for c in primary} == {"safe · pku.jsonl", "safe · hh.jsonl.gz"}
    assert all(c["alternative"] == "greater" and c["p_holm"] < 0.01 for c in primary)
    assert result["primary"]["holds"] and result["primary"]["tests"] == 2
    assert result["groups"]["dual"]["safe · hh.jsonl.gz"]["mean"] == pytest.approx(0.1 + 0.0005 / 3)

    # A label-blind change moves the controls as much as the treatment: the claim does not hold.
    rows, logps = _rows_and_logps(dict.fromkeys(noise, 0.1), noise)
    assert not group_tests(rows, logps, groups, Primary)["primary"]["holds"]
    # Nor does a real but seed-sized difference: one run per side gives no run-to-run variance to test against.
    rows, logps = _rows_and_logps({"d1": 0.1, "s1": 0.0}, {"d1": 0.0, "s1": 0.0})
    single = group_tests(rows, logps, {"dual": ["d1"], "shuffled": ["s1"]}, Primary)
    assert not single["primary"]["holds"] and all(c["p_value"] is None for c in single["comparisons"])


def test_a_primary_test_names_its_sources_and_the_others_margins_are_secondary():
    """eval.primary.sources: the claim is about PKU's pairs only; HH's margin is still tested, two-sided,
    in the secondary family, and a treatment that loses on HH does not sink the claim."""
    from safealign.eval.pairs import group_tests

    class OnPku(Primary):
        sources = ["pku.jsonl"]

    noise = {"d1": 0.001, "d2": -0.002, "d3": 0.0015, "s1": 0.002, "s2": -0.001, "s3": 0.0}
    groups = {"dual": ["d1", "d2", "d3"], "shuffled": ["s1", "s2", "s3"]}
    rows, logps = _rows_and_logps({"d1": 0.1, "d2": 0.1, "d3": 0.1, "s1": 0.0, "s2": 0.0, "s3": 0.0}, noise)
    result = group_tests(rows, logps, groups, OnPku)
    families = {c["measure"]: (c["family"], c["alternative"]) for c in result["comparisons"]}
    assert families == {"safe · pku.jsonl": ("primary", "greater"), "safe · hh.jsonl.gz": ("secondary", "two-sided"),
                        "helpful · pku.jsonl": ("secondary", "two-sided")}  # fmt: skip
    assert result["primary"]["tests"] == 1 and result["primary"]["sources"] == ["pku.jsonl"]
    # The treatment moved HH the wrong way: with both sources primary the claim fails, with PKU named it holds.
    for i in range(4, 8):  # the HH-like pairs: the dual runs leave them where the base has them
        for name in ("d1", "d2", "d3"):
            logps[name][i] = (-10.0, -10.0, -1.0, -1.0)
    assert group_tests(rows, logps, groups, OnPku)["primary"]["holds"]
    assert not group_tests(rows, logps, groups, Primary)["primary"]["holds"]


def test_a_primary_test_on_the_held_out_cost_is_one_sided_toward_lower_cost():
    """measure: heldout_cost (claim b): the treatment's held-out Ĵ_C against each control's, Welch over
    runs, one-sided toward the treatment being cheaper; the margins move to the secondary family."""
    from safealign.eval.pairs import HELDOUT_COST, group_tests

    class OnCost(Primary):
        controls, measure, alpha = ["fixed"], "heldout_cost", 0.05

    noise = {"d1": 0.0, "d2": 0.0, "d3": 0.0, "f1": 0.0, "f2": 0.0, "f3": 0.0}
    rows, logps = _rows_and_logps(dict.fromkeys(noise, 0.0), noise)
    groups = {"dual": ["d1", "d2", "d3"], "fixed": ["f1", "f2", "f3"]}
    cost = {HELDOUT_COST: {"d1": -1.20, "d2": -1.16, "d3": -1.18, "f1": -1.10, "f2": -1.06, "f3": -1.08}}
    result = group_tests(rows, logps, groups, OnCost, cost)
    primary = [c for c in result["comparisons"] if c["family"] == "primary"]
    assert [(c["measure"], c["alternative"]) for c in primary] == [(HELDOUT_COST, "less")]
    # by hand: both sds 0.02, se = 0.02·√(2/3), t = −0.10/0.01633 = −6.124, df 4; one-sided p = 0.00179
    assert primary[0]["t"] == pytest.approx(-6.1237, rel=1e-4) and primary[0]["df"] == pytest.approx(4.0)
    assert primary[0]["p_value"] == pytest.approx(t_test_p(6.1237, 4, "greater"), rel=1e-3)
    assert result["primary"]["holds"] and result["primary"]["measure"] == "heldout_cost"
    assert all(c["family"] == "secondary" for c in result["comparisons"] if c["measure"] != HELDOUT_COST)
    cost[HELDOUT_COST] = {**cost[HELDOUT_COST], "d1": -1.0, "d2": -0.96, "d3": -0.98}  # the dual runs costlier
    assert not group_tests(rows, logps, groups, OnCost, cost)["primary"]["holds"]


def test_the_paired_t_test_by_hand():
    """Differences 0.05, 0.07, 0.06 (the treatment's runs each above their pair): mean 0.06, sd 0.01,
    t = 0.06 / (0.01/√3) = 10.392, df 2. Welch on the same numbers sees only the seeds' spread."""
    treated, control = [-1.20, -1.60, -1.45], [-1.25, -1.67, -1.51]
    paired = paired_t_test(treated, control, "greater")
    assert paired["difference"] == pytest.approx(0.06) and paired["df"] == 2 and paired["paired"]
    assert paired["t"] == pytest.approx(10.392, rel=1e-4)
    assert paired["p_value"] == pytest.approx(t_test_p(10.392, 2, "greater"), rel=1e-3) and paired["p_value"] < 0.01
    assert welch_t_test(treated, control, "greater")["p_value"] > 0.3
    assert paired_t_test([1.0, 2.0], [0.5, 1.5])["p_value"] is None  # the differences do not vary
    with pytest.raises(ValueError, match="paired runs: 2 against 1"):
        paired_t_test([1.0, 2.0], [0.5])


def test_a_paired_primary_test_pairs_runs_by_their_place_in_the_groups():
    """eval.primary.paired: d1 with f1, d2 with f2, … — confirm-dual's picture: the seeds scatter the cost
    by ±0.2 and each dual run sits 0.06 above its fixed twin. Welch cannot tell; paired it is clear."""
    from safealign.eval.pairs import HELDOUT_COST, group_tests

    class Paired(Primary):
        controls, measure, alpha, paired = ["fixed"], "heldout_cost", 0.05, True

    noise = dict.fromkeys(["d1", "d2", "d3", "f1", "f2", "f3"], 0.0)
    rows, logps = _rows_and_logps(dict.fromkeys(noise, 0.0), noise)
    groups = {"dual": ["d1", "d2", "d3"], "fixed": ["f1", "f2", "f3"]}
    cost = {HELDOUT_COST: {"d1": -1.31, "d2": -1.74, "d3": -1.57, "f1": -1.25, "f2": -1.67, "f3": -1.51}}
    result = group_tests(rows, logps, groups, Paired, cost)
    (primary,) = [c for c in result["comparisons"] if c["family"] == "primary"]
    assert primary["paired"] and primary["df"] == 2 and primary["difference"] == pytest.approx(-0.0633, abs=1e-4)
    assert result["primary"]["holds"] and result["primary"]["paired"]
    assert not group_tests(rows, logps, groups, type("Welch", (Paired,), {"paired": False}), cost)["primary"]["holds"]
