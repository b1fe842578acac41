"""`safealign pool`: one registration's blocks pooled into its registered test, by hand."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import yaml
from scipy import stats
from support import pku_rows, run_cli, tiny_recipe, write_jsonl

from safealign.core.errors import SafeAlignError
from safealign.eval.blocks import Block, pool_blocks, pooled_markdown
from safealign.eval.pairs import HELDOUT_COST
from safealign.recipe.schema import PrimaryTestSection

PRIMARY = PrimaryTestSection(treatment="dual", controls=["fixed"], measure="heldout_cost", alpha=0.05, paired=True)
MARGIN = "helpful · pku.jsonl"


def block(name: str, base: float, dual: list[float], fixed: list[float], margins: list[float] | None = None, **changes) -> Block:
    """Runs d1.. and f1.. of one block; held-out Ĵ_C as the eval records it (absolute, not from the base)."""
    runs = {f"d{i}": v for i, v in enumerate(dual, 1)} | {f"f{i}": v for i, v in enumerate(fixed, 1)}
    measures = {HELDOUT_COST: runs}
    if margins is not None:
        measures[MARGIN] = dict(zip(runs, margins))
    fields = dict(name=name, groups={"dual": [f"d{i}" for i in range(1, len(dual) + 1)], "fixed": [f"f{i}" for i in range(1, len(fixed) + 1)]},
                  primary=PRIMARY, measures=measures, base_cost=base, cost_margin=0.4)  # fmt: skip
    return Block(**{**fields, **changes})


def test_the_pooled_test_pairs_within_blocks_and_measures_the_fall_from_each_blocks_own_base():
    # block 1's base −0.95, block 2's −1.5 (another session's draws): the offsets must not enter
    one = block("b1", -0.95, dual=[-1.5, -1.4, -1.3], fixed=[-1.4, -1.2, -1.3], margins=[0.01, 0.02, 0.0, 0.0, 0.01, 0.0])
    two = block("b2", -1.5, dual=[-2.0, -1.9, -1.8], fixed=[-1.7, -1.8, -1.6], margins=[0.0, 0.0, 0.0, 0.01, 0.0, 0.0])
    update = lambda step, cost, lam: {"step": step, "cost_estimate": cost, "cost_threshold": -1.4, "lambda_next": lam}  # noqa: E731
    one = replace(one, training_logs={"d1": [update(0, -1.0, 1.0), update(5, -1.2, 3.4), update(10, -1.45, 3.0)],
                                      "f1": [update(0, -1.0, 1.0)]})  # a control's log: not the treatment's  # fmt: skip
    result = pool_blocks([one, two])

    # by hand: dual − fixed per pair, −0.1 −0.2 0.0 | −0.3 −0.1 −0.2: mean −0.15, sd √(0.055/5)
    differences = [-0.1, -0.2, 0.0, -0.3, -0.1, -0.2]
    t = -0.15 / (math.sqrt(0.055 / 5) / math.sqrt(6))
    (primary,) = [c for c in result["comparisons"] if c["family"] == "primary"]
    assert primary["difference"] == pytest.approx(-0.15) and primary["t"] == pytest.approx(t) and primary["df"] == 5
    assert primary["p_value"] == pytest.approx(stats.ttest_1samp(differences, 0.0, alternative="less").pvalue)
    assert result["primary"]["holds"] == (primary["p_holm"] < 0.05)
    (secondary,) = [c for c in result["comparisons"] if c["family"] == "secondary"]
    assert secondary["measure"] == MARGIN and secondary["alternative"] == "two-sided"

    # each group's mean is its fall from its own block's base: dual −0.55 −0.45 −0.35 | −0.5 −0.4 −0.3
    assert result["groups"]["dual"][HELDOUT_COST]["mean"] == pytest.approx(-0.425)
    assert result["groups"]["fixed"][HELDOUT_COST]["mean"] == pytest.approx(-(0.45 + 0.25 + 0.35 + 0.2 + 0.3 + 0.1) / 6)
    fall = result["heldout_fall"]["groups"]
    assert fall["dual"]["meets"] and not fall["fixed"]["meets"]  # 0.425 ≥ 0.40; 0.275 < 0.40
    assert list(result["groups"]["dual"][HELDOUT_COST]["runs"]) == ["b1/d1", "b1/d2", "b1/d3", "b2/d1", "b2/d2", "b2/d3"]
    # the treatment's λ run by run: rose to 3.4 while above d, met d at step 10, λ then 3.0
    assert result["dual_runs"]["rows"] == [["b1/d1", "-1.4", "-1.000 (step 0)", "-1.450 (step 10)", "3.4", "3", "step 10"]]
    text = pooled_markdown(result)
    assert "**holds**" in text and "b2: 6 runs, base held-out Ĵ_C -1.500\n" in text and "dual 0.425 (≥ 0.4)" in text


@pytest.mark.parametrize(
    "blocks, message",
    [
        ([block("b1", -1.0, [-1.2, -1.1], [-1.1, -1.0])], "at least two run directories"),
        ([block("b1", -1.0, [-1.2], [-1.1]), block("b2", -1.0, [-1.2], [-1.1], primary=PRIMARY.model_copy(update={"alpha": 0.01}))],
         "b2's eval.primary differs from b1's"),
        ([block("b1", -1.0, [-1.2], [-1.1]), block("b1", -1.0, [-1.2], [-1.1])], "same recipe name"),
        ([block("b1", -1.0, [-1.2], [-1.1]), block("b2", None, [-1.2], [-1.1])], "b2 has held-out Ĵ_C for its runs but none for its base"),
        ([block("b1", -1.0, [-1.2], [-1.1]), block("b2", -1.0, [-1.2], [-1.1], cost_margin=0.35)], "cost threshold margin differs"),
    ],
)  # fmt: skip
def test_blocks_that_do_not_make_one_registration_are_refused_in_one_line(blocks, message):
    with pytest.raises(SafeAlignError, match=message):
        pool_blocks(blocks)


def test_the_cli_pools_run_directories_and_names_one_that_is_not_finished(tmp_path, tokenizer_dir):
    """`safealign pool` on two run directories as a run leaves them (recipe.yaml, eval/results.json;
    the results are written here, standing in for two finished evals)."""
    groups = {"dual": ["aligned", "dual_b"], "fixed": ["fixed_a", "fixed_b"]}
    ablations = {"dual_b": {"seed": 2}, "fixed_a": {"lambda_update": "fixed"}, "fixed_b": {"lambda_update": "fixed", "seed": 2}}
    primary = {"treatment": "dual", "controls": ["fixed"], "measure": "heldout_cost", "alpha": 0.05, "paired": True}
    write_jsonl(tmp_path / "pku.jsonl", pku_rows(40))
    recipe = yaml.safe_load(tiny_recipe(tmp_path, tokenizer_dir, tmp_path / "pku.jsonl", stages=["rm", "align", "eval"]).read_text())
    recipe["data"]["train"][0]["max_rows"] = 24
    for name, costs in {"b1": [-1.3, -1.25, -1.2, -1.2], "b2": [-1.6, -1.55, -1.45, -1.5]}.items():
        run = tmp_path / name
        (run / "eval").mkdir(parents=True)
        recipe["name"] = name
        recipe["align"] = {**recipe["align"], "ablations": ablations, "cost_threshold": "initial", "cost_threshold_margin": 0.3}
        recipe["eval"] = {"heldout_cost_prompts": 4, "heldout_pairs": [{"path": str(tmp_path / "pku.jsonl"), "skip_rows": 24}],
                          "groups": groups, "primary": primary}  # fmt: skip
        (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        runs = dict(zip(["aligned", "dual_b", "fixed_a", "fixed_b"], costs))
        tests = {"measures": [HELDOUT_COST], "groups": {g: {HELDOUT_COST: {"runs": {r: runs[r] for r in members}}} for g, members in groups.items()}}
        (run / "eval" / "results.json").write_text(json.dumps({"group_tests": tests, "models": {"base": {"heldout_cost": {"mean": costs[-1] + 0.2}}}}))

    done = run_cli("pool", "b1", "b2", "--json", "pooled.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    pooled = json.loads((tmp_path / "pooled.json").read_text())
    # dual − fixed: −0.1 −0.05 | −0.15 −0.05; fixed falls 0.2 0.2 | 0.15 0.2 from each block's base
    assert pooled["comparisons"][0]["difference"] == pytest.approx(-0.0875)
    assert pooled["groups"]["fixed"][HELDOUT_COST]["mean"] == pytest.approx(-0.1875)
    assert "# Pooled over blocks" in done.stdout

    (tmp_path / "b2" / "eval" / "results.json").unlink()
    missing = run_cli("pool", "b1", "b2", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "b2: not a finished eval stage" in missing.stderr
