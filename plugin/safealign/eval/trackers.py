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


def log_eval(out_dir: Path, results: dict, *, tensorboard: bool, wandb_project: str | None, run_name: str) -> None:
    """Write `eval_scalars` to TensorBoard (`out_dir/tensorboard`) and to a W&B run `<run_name>-eval`, as
    the recipe's `logging` section enables them (its W&B set-up was checked when the run started)."""
    scalars = eval_scalars(results)
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))
        for key, value in scalars.items():
            writer.add_scalar(key, value, 0)
        writer.close()
    if wandb_project:
        import wandb

        run = wandb.init(project=wandb_project, name=f"{run_name}-eval", job_type="eval", reinit=True)
        run.log(scalars)
        run.summary.update(scalars)
        run.finish()
    trackers = [name for name, on in (("TensorBoard", tensorboard), ("W&B", bool(wandb_project))) if on]
    log.info("eval: %d scalars to %s", len(scalars), " and ".join(trackers) or "no tracker")
