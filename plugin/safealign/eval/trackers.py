"""Eval results to the experiment trackers the recipe enables (`logging.tensorboard`,
`logging.wandb_project`), beside the training curves OpenRLHF already logs there: one place to compare
runs, instead of opening every run's report.

What goes there: per model, each judge's safety rate, the headline helpfulness number, the held-out Ĵ_C
and its share above d; and the pre-registered test's Holm-adjusted p-values. The report stays the
reference (intervals, tables, examples); trackers get scalars.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safealign.eval.helpfulness import headline_helpfulness
from safealign.recipe import Recipe, check_wandb

log = logging.getLogger("safealign")


def eval_scalars(results: dict) -> dict[str, float]:
    """The results as flat `eval/...` scalars (None values left out)."""
    scalars: dict[str, float | None] = {}
    for name, model in results["models"].items():
        for judge, rates in model["safety"].items():
            scalars[f"eval/{name}/safety_{judge}"] = rates["overall"]["rate"] if rates["overall"]["n"] else None
        value, metric = headline_helpfulness(model)
        scalars[f"eval/{name}/{metric}"] = value
        cost = model.get("heldout_cost") or {}
        scalars[f"eval/{name}/heldout_cost"] = cost.get("mean")
        scalars[f"eval/{name}/heldout_cost_above_zero"] = cost.get("above_zero")
    for comparison in (results.get("group_tests") or {}).get("comparisons", []):
        key = f"eval/tests/{comparison['treatment']}_vs_{comparison['versus']}/{comparison['measure']}_p_holm"
        scalars[key] = comparison.get("p_holm")
    return {key: float(value) for key, value in scalars.items() if value is not None}


def log_eval(recipe: Recipe, out_dir: Path, results: dict) -> None:
    """Write `eval_scalars` to TensorBoard (`out_dir/tensorboard`) and W&B, as the recipe enables them."""
    scalars = eval_scalars(results)
    if recipe.logging.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))
        for key, value in scalars.items():
            writer.add_scalar(key, value, 0)
        writer.close()
    if recipe.logging.wandb_project:
        check_wandb(recipe)
        import wandb

        run = wandb.init(project=recipe.logging.wandb_project, name=f"{recipe.name}-eval", job_type="eval",
                         config={"recipe": recipe.name, "seed": recipe.seed}, reinit=True)  # fmt: skip
        run.log(scalars)
        run.summary.update(scalars)
        run.finish()
    log.info("eval: %d scalars to %s", len(scalars),
             " and ".join(t for t, on in (("TensorBoard", recipe.logging.tensorboard),
                                          ("W&B", bool(recipe.logging.wandb_project))) if on) or "no tracker")  # fmt: skip
