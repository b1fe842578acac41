"""`safealign pool RUN_DIR…`: read finished runs as the blocks of one registration (`safealign.eval.blocks`).

The run-directory side of pooling — the recipe as run, the eval's results and the align stage's training
logs, found the way `safealign report` finds them — so the pooling itself stays a function of numbers."""

from __future__ import annotations

import json
from pathlib import Path

from safealign.core.errors import SafeAlignError
from safealign.domain.metrics import read_metrics
from safealign.eval.blocks import Block
from safealign.recipe.loading import load_recipe
from safealign.stages import finished_stage


def load_block(run_dir: Path) -> Block:
    """A run directory's recipe (as run) and eval results; one line naming what is missing otherwise."""
    recipe_file = run_dir / "recipe.yaml"
    evaluated = finished_stage(run_dir, "eval")
    results_file = evaluated.output("results") if evaluated else run_dir / "eval" / "results.json"
    for path, what in ((recipe_file, "a run directory (recipe.yaml)"), (results_file, "a finished eval stage")):
        if not path.is_file():
            raise SafeAlignError(f"{run_dir}: not {what}: {path} not found; pool the run directories of finished runs")
    recipe = load_recipe(recipe_file)
    if recipe.eval.primary is None or not recipe.eval.groups:
        raise SafeAlignError(f"{recipe_file}: eval.primary and eval.groups: a block must register the test to pool")
    try:
        results = json.loads(results_file.read_bytes())
        tests = results["group_tests"]
        measures = {
            measure: {run: value for summary in tests["groups"].values() for run, value in summary.get(measure, {}).get("runs", {}).items()}
            for measure in tests["measures"]
        }  # fmt: skip
        base = results["models"]["base"].get("heldout_cost", {}).get("mean")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SafeAlignError(f"{results_file}: not an eval stage's results with group tests ({type(exc).__name__}: {exc})") from None
    aligned = finished_stage(run_dir, "align")
    logs = {name: read_metrics(path) for name, path in (aligned.policy_metrics() if aligned else {}).items() if path.is_file()}
    return Block(
        name=recipe.name,
        groups={group: list(runs) for group, runs in recipe.eval.groups.items() if runs},
        primary=recipe.eval.primary,
        measures=measures,
        base_cost=base,
        cost_margin=recipe.align.cost_threshold_margin if recipe.align.cost_threshold == "initial" else None,
        training_logs=logs,
    )
