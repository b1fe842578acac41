"""Held-out safety margins where PKU-SafeRLHF's two labels disagree: does a model move toward the safer
response even where it is the *less* helpful one?

    .venv/bin/python benchmarks/pku_conflict.py runs/evidence25 --recipe recipes/evidence.yaml

Why: in this PKU sample the safer response is also the more helpful one in 75 of the 100 held-out pairs
(104 of 125 training pairs), so a model that learnt only helpfulness moves the safety margin too (the lever
diagnostic, docs/results/issue-25.md). The pairs where the labels disagree separate the two: there, learning
harmlessness moves the safety margin up and learning helpfulness moves it down.

Reads the recipe the run was started with, its held-out pairs (as the eval stage split them) and every
model's held-out log-probs from the eval stage's cache (through the eval stage's own `heldout_logps`,
which would compute a model the cache lacks), and prints per model, then per `eval.groups` group (mean
and the runs), the per-token safety-margin shift from the base (`safealign.eval.pairs.mean_margin_shift`,
the group tests' own measure) on the PKU pairs where the labels agree and where they disagree.
Exploratory: no test, no correction.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from safealign.domain.data import PreferenceRow
from safealign.eval.pairs import mean_margin_shift
from safealign.recipe import load_recipe
from safealign.stages.evaluate import heldout_logps
from safealign.workflows.heldout import heldout_rows, load_training_rows


def subsets(rows: list[PreferenceRow]) -> dict[str, list[int]]:
    """The held-out pairs with both labels, split by whether the safer response is the more helpful one."""
    both = [i for i, r in enumerate(rows) if r.better_response_id >= 0 and r.safer_response_id >= 0]
    return {
        "agree": [i for i in both if rows[i].better_response_id == rows[i].safer_response_id],
        "disagree": [i for i in both if rows[i].better_response_id != rows[i].safer_response_id],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory whose eval stage has finished")
    parser.add_argument("--recipe", type=Path, required=True, help="the recipe the run was started with")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    results = json.loads((args.run / "eval" / "results.json").read_text())["models"]
    rows = heldout_rows(recipe, load_training_rows(recipe))
    split = subsets(rows)
    cache = args.run / "cache" / "eval"
    with tempfile.TemporaryDirectory() as scratch:
        logps = {}
        for name, entry in results.items():
            logps[name], _ = heldout_logps(Path(entry["path"]), rows, recipe, Path(scratch), cache)
    print(f"{len(split['agree'])} pairs where the safer response is the more helpful, {len(split['disagree'])} where not")
    shifts = {
        name: {kind: mean_margin_shift(rows, logps[name], logps["base"], indices, "safe") for kind, indices in split.items()}
        for name in logps
        if name != "base"
    }
    print(f"{'model':<16} {'agree':>9} {'disagree':>9}")
    for name, values in shifts.items():
        print(f"{name:<16} {values['agree']:+9.4f} {values['disagree']:+9.4f}")
    for group, members in recipe.eval.groups.items():
        runs = [shifts[m]["disagree"] for m in members if m in shifts]
        if runs:
            print(f"group {group}: disagree mean {math.fsum(runs) / len(runs):+.4f} [{', '.join(f'{v:+.4f}' for v in runs)}]")


if __name__ == "__main__":
    main()
