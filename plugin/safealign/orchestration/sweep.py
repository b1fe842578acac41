"""`safealign sweep`: a grid of trials over recipe values, run with Ray Tune, and the seed's selection rule.

A sweep recipe is an ordinary recipe plus a `sweep` section (a grid of dotted recipe keys). The stages
that do not depend on the swept keys run once, in the sweep's run directory: the rm stage, whose
scored pairs and reward models every trial shares. Each trial then runs the remaining stages
(`safealign run --set KEY=VALUE …`, a fresh process: DeepSpeed keeps one process group per process) in
`trials/<id>/`, which links to the shared `rm/` and to the shared eval-answer cache (the base model
answers once for all trials). Ray Tune schedules the grid (`tune.grid_search`): trials run in parallel
where the resources allow (`gpus_per_trial`, Ray's CPU/GPU accounting) and one at a time on a CPU
machine. Selection follows the seed: among trials whose safety rate (the chosen judge, overall)
is above `min_safety`, the best helpfulness (MT-Bench score with an LLM judge, else the Helpful-RM
win rate); when none qualifies, that is said and the safest trial is picked.

Outputs in `runs/<name>/sweep/`: `results.json` (every trial's values, metrics, status), `table.md`,
and `heatmap.png` (the first two swept keys; helpfulness as colour, safety written in each cell,
the selected trial outlined).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safealign.core.errors import SafeAlignError
from safealign.core.files import write_text_atomically
from safealign.core.locks import RunLock
from safealign.eval.helpfulness import headline_helpfulness
from safealign.eval.plots import plt, png
from safealign.orchestration.runner import claim_run_dir
from safealign.recipe import Recipe, load_recipe, trial_overrides
from safealign.stages import finished_stage, load_builtin_stages

log = logging.getLogger("safealign")

#: The sweep driver's lock (parts all, shared and select), beside the run lock the shared stages' run takes.
SWEEP_LOCK_FILE = ".sweep.lock"

#: Stages whose outputs do not depend on what a sweep usually varies (align/distill/eval settings).
SHARED_STAGES = ("rm",)


@dataclass
class TrialResult:
    """One trial: its recipe values and what its eval measured (None when it did not finish)."""

    trial_id: str
    params: dict[str, Any]
    safety: float | None = None
    helpfulness: float | None = None
    status: str = "ok"  # ok | failed
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Selection:
    trial: TrialResult
    qualified: bool
    message: str


def select_trial(trials: list[TrialResult], min_safety: float) -> Selection:
    """The seed's rule: safety > `min_safety`, then the best helpfulness; if none qualifies, the safest.

    Ties go to the earlier trial in grid order; trials that failed or lack a safety rate never win."""
    finished = [t for t in trials if t.status == "ok" and t.safety is not None]
    if not finished:
        raise SafeAlignError("sweep: no trial finished with a safety rate; see each trial's log in trials/<id>/")

    def helpful(t: TrialResult) -> float:
        return -math.inf if t.helpfulness is None else t.helpfulness

    qualified = [t for t in finished if t.safety > min_safety]
    if qualified:
        best = max(qualified, key=lambda t: (helpful(t), t.safety, -trials.index(t)))
        return Selection(best, True, f"{len(qualified)} of {len(trials)} trials have safety > {min_safety:.0%}; "
                                     f"the most helpful of them is {best.trial_id}")  # fmt: skip
    best = max(finished, key=lambda t: (t.safety, helpful(t), -trials.index(t)))
    return Selection(best, False, f"no trial reached safety > {min_safety:.0%}: picked the safest, {best.trial_id} "
                                  f"({best.safety:.1%})")  # fmt: skip


def trial_id(params: dict[str, Any]) -> str:
    """A readable, filesystem-safe id: `lambda_init=0.5,w=0.3` (+ a hash when that gets long)."""
    text = ",".join(f"{k.split('.')[-1]}={v}" for k, v in params.items())
    safe = "".join(c if c.isalnum() or c in "=.,_-" else "_" for c in text)
    if len(safe) > 80:
        safe = safe[:60] + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return safe


def trial_metrics(run_dir: Path, recipe: Recipe) -> tuple[float | None, float | None, dict]:
    """(safety, helpfulness, details) of the aligned model from a trial's eval results."""
    results = json.loads(finished_stage(run_dir, "eval").output("results").read_text())
    model = results["models"].get("aligned") or results["models"]["base"]
    judge = recipe.sweep.select.judge
    details = {"safety_by_judge": {j: v["overall"]["rate"] for j, v in model["safety"].items()}}
    if judge == "heldout":  # judge-free: held-out preference accuracy on both axes
        held = model.get("heldout", {})
        details["helpfulness_metric"] = "heldout_helpful_accuracy"
        accuracy = lambda d: held.get(d, {}).get("likelihood", {}).get("accuracy")  # noqa: E731
        return accuracy("safe"), accuracy("helpful"), details
    safety = model["safety"].get(judge, {}).get("overall", {}).get("rate")
    helpful, details["helpfulness_metric"] = headline_helpfulness(model)
    return safety, helpful, details


def shared_stages(recipe: Recipe) -> list[str]:
    """The recipe's stages that run once for all trials: those in SHARED_STAGES whose recipe sections no
    swept key touches (sweeping `rm.cost.learning_rate` makes every trial train its own reward models)."""
    stages = load_builtin_stages()
    swept = {key.split(".")[0] for key in recipe.sweep.grid}
    return [s for s in recipe.stages if s in SHARED_STAGES and not swept & set(stages[s].sections)]


#: What turns the sweep's recipe into one plain run, after every other override.
CHILD_RUN = ["--set", "sweep=null"]


def _trial_command(recipe_path: Path, trial_dir: Path, stages: list[str], params: dict, overrides: list[str],
                   gpus: int) -> list[str]:  # fmt: skip
    launcher = [sys.executable, "-m"]
    if gpus > 1:
        launcher += ["torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m"]
    command = launcher + ["safealign.cli", "run", str(recipe_path), "--run-dir", str(trial_dir)]
    for item in overrides:
        command += ["--set", item]
    for key, value in params.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    command += CHILD_RUN  # last: the user's --set may itself reshape the sweep (e.g. a smaller grid)
    for stage in stages:
        command += ["--stage", stage]
    return command


def _prepare_trial_dir(sweep_dir: Path, trial_dir: Path, shared: list[str]) -> None:
    """Link this sweep's shared stages and the eval-answer cache into a trial's run directory (only
    those: a trial that runs its own rm stage must not write through a link into another's)."""
    claim_run_dir(trial_dir)
    (sweep_dir / "cache").mkdir(exist_ok=True)
    for name in (*shared, "cache"):
        link, target = trial_dir / name, sweep_dir / name
        if target.exists() and not link.exists():
            link.symlink_to(target.resolve(), target_is_directory=True)


def run_trial(recipe_path: Path, recipe: Recipe, run_dir: Path, overrides: list[str], params: dict) -> TrialResult:
    """One grid point: the non-shared stages in a fresh process in `trials/<id>/`. The result is also
    written to `trials/<id>/result.json`, which is what selection reads (whoever ran the trial: Ray Tune
    here, or one pod of a Kubernetes Indexed Job)."""
    shared = shared_stages(recipe)
    stages = [s for s in recipe.stages if s not in shared]
    trial_dir = run_dir / "trials" / trial_id(params)
    _prepare_trial_dir(run_dir, trial_dir, shared)
    command = _trial_command(recipe_path, trial_dir, stages, params, overrides, recipe.sweep.gpus_per_trial)
    with (trial_dir / "trial.log").open("w") as log_file:
        code = subprocess.call(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=recipe_path.parent)
    if code != 0:
        result = TrialResult(
            trial_id(params), params, status="failed", error=f"exit {code}; see {trial_dir / 'trial.log'}"
        )
    else:
        safety, helpful, details = trial_metrics(trial_dir, recipe)
        result = TrialResult(trial_id(params), params, safety, helpful, "ok", "", details)
    write_text_atomically(trial_dir / "result.json", json.dumps(asdict(result), indent=2) + "\n")
    return result


def collect_trials(run_dir: Path, recipe: Recipe) -> list[TrialResult]:
    """Every grid point's result, in grid order; a trial without a result file counts as not run."""
    results = []
    for params in trial_overrides(recipe.sweep.grid):
        path = run_dir / "trials" / trial_id(params) / "result.json"
        if path.is_file():
            results.append(TrialResult(**json.loads(path.read_text())))
        else:
            results.append(TrialResult(trial_id(params), params, status="failed", error="not run"))
    return results


def run_trials(recipe_path: Path, recipe: Recipe, run_dir: Path, overrides: list[str]) -> list[TrialResult]:
    """Every grid point through Ray Tune; a trial that fails is recorded as failed, not fatal."""
    import ray
    from ray import tune

    sweep = recipe.sweep
    run_dir = run_dir.resolve()
    recipe_path = recipe_path.resolve()

    def trainable(config: dict) -> None:
        result = run_trial(recipe_path, recipe, run_dir, overrides, {key: config[key] for key in sweep.grid})
        tune.report({"status": result.status, "safety": result.safety, "helpfulness": result.helpfulness})

    # Ray's resource accounting decides how many trials run at once: on a CPU machine a trial asks for
    # every core (so one at a time); on GPUs, `gpus_per_trial` each (8 GPUs / 1 per trial: 8 at once).
    cpus = os.cpu_count() or 1
    resources = {"cpu": cpus, "gpu": 0} if not sweep.gpus_per_trial else {"cpu": 1, "gpu": sweep.gpus_per_trial}
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, configure_logging=False,
             ignore_reinit_error=True)  # fmt: skip
    try:
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            param_space={key: tune.grid_search(values) for key, values in sweep.grid.items()},
            tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent_trials),
            run_config=tune.RunConfig(name="tune", storage_path=str(run_dir / "sweep"), verbose=1),
        )  # fmt: skip
        tuner.fit()
    finally:
        ray.shutdown()
    return collect_trials(run_dir, recipe)


def format_table(trials: list[TrialResult], selection: Selection, recipe: Recipe) -> str:
    keys = list(recipe.sweep.grid)
    header = ["trial"] + [k.split(".")[-1] for k in keys] + [f"safety ({recipe.sweep.select.judge})", "helpfulness", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in trials:
        safety = "failed" if t.status != "ok" else ("n/a" if t.safety is None else f"{t.safety:.1%}")
        helpful = "" if t.helpfulness is None else f"{t.helpfulness:.3f}"
        mark = "**selected**" if t is selection.trial else ""
        lines.append("| " + " | ".join([t.trial_id, *(str(t.params[k]) for k in keys), safety, helpful, mark]) + " |")
    return "\n".join(lines)


def plot_heatmap(trials: list[TrialResult], selection: Selection, recipe: Recipe) -> bytes | None:
    """Helpfulness over the first two swept keys; each cell also shows its safety rate."""
    keys = list(recipe.sweep.grid)
    if len(keys) < 2:
        return None
    xs, ys = recipe.sweep.grid[keys[1]], recipe.sweep.grid[keys[0]]
    values = [[math.nan] * len(xs) for _ in ys]
    fig, ax = plt.subplots(figsize=(1.6 * len(xs) + 2.5, 1.2 * len(ys) + 1.5))
    cells: list[tuple[int, int, str]] = []
    for t in trials:
        if t.params[keys[0]] not in ys or t.params[keys[1]] not in xs:
            continue  # a grid over more than two keys: the first two are drawn
        i, j = ys.index(t.params[keys[0]]), xs.index(t.params[keys[1]])
        values[i][j] = math.nan if t.helpfulness is None else t.helpfulness
        label = "failed" if t.status != "ok" else f"safety {t.safety:.0%}" if t.safety is not None else "n/a"
        if t.helpfulness is not None:
            label += f"\nhelpful {t.helpfulness:.2f}"
        if t is selection.trial:
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=3, ec="black"))
        cells.append((i, j, label))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    for i, j, label in cells:  # dark text on viridis' light end, white on its dark end
        shade = image.norm(values[i][j]) if not math.isnan(values[i][j]) else 1.0
        ax.text(j, i, label, ha="center", va="center", fontsize=9, color="black" if shade > 0.5 else "white")
    fig.colorbar(image, ax=ax, label=f"helpfulness ({selection.trial.extra.get('helpfulness_metric', '')})")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(ys)), [str(y) for y in ys])
    ax.set_xlabel(keys[1])
    ax.set_ylabel(keys[0])
    ax.set_title("Sweep: helpfulness (colour), safety (text); outlined: selected")
    return png(fig)


def run_shared(recipe_path: Path, overrides: list[str], run_dir: Path, shared: list[str]) -> None:
    """The stages every trial shares, once, in the sweep's run directory."""
    log.info("sweep: running the shared stages (%s) once in %s", ", ".join(shared), run_dir)
    command = [sys.executable, "-m", "safealign.cli", "run", str(recipe_path), "--run-dir", str(run_dir),
               *(f"--set={o}" for o in overrides), *CHILD_RUN, *(f"--stage={s}" for s in shared)]  # fmt: skip
    if subprocess.call(command) != 0:
        raise SafeAlignError(f"sweep: the shared stage(s) {', '.join(shared)} failed (see above)")


def write_selection(recipe: Recipe, run_dir: Path, trials: list[TrialResult]) -> Selection:
    """The seed's rule over the trials, then table.md, results.json and heatmap.png in `sweep/`."""
    selection = select_trial(trials, recipe.sweep.select.min_safety)
    out = run_dir / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(trials, selection, recipe)
    write_text_atomically(out / "table.md", table + "\n\n" + selection.message + "\n")
    write_text_atomically(out / "results.json", json.dumps({
        "trials": [asdict(t) for t in trials], "selected": selection.trial.trial_id,
        "qualified": selection.qualified, "message": selection.message, "rule": recipe.sweep.select.model_dump(),
    }, indent=2) + "\n")  # fmt: skip
    heatmap = plot_heatmap(trials, selection, recipe)
    if heatmap:
        (out / "heatmap.png").write_bytes(heatmap)
    print(table)
    print(selection.message)
    print(f"sweep: {out / 'table.md'}" + (f", {out / 'heatmap.png'}" if heatmap else ""))
    return selection


def run_sweep(
    recipe_path: Path,
    overrides: list[str],
    run_dir: Path | None = None,
    part: str = "all",
    trial_index: int | None = None,
) -> Selection | None:
    """The whole sweep (shared stages once, the grid through Ray Tune, selection, table and heat map), or
    one `part` of it: `shared`, `trial` (grid point `trial_index`, no Ray: a Kubernetes Indexed Job's pod
    runs one each), `select` (over the trials' result files)."""
    recipe = load_recipe(recipe_path, overrides)
    if recipe.sweep is None:
        raise SafeAlignError(f"{recipe_path}: no sweep section; add sweep.grid (see docs/sweep.md)")
    select = recipe.sweep.select.judge
    usable = bool(recipe.eval.heldout_pairs) if select == "heldout" else select in recipe.eval.judges
    if not usable or "eval" not in recipe.stages:
        raise SafeAlignError(
            f"sweep.select.judge: {select!r} must be one of eval.judges ({', '.join(recipe.eval.judges)}), or "
            "heldout with eval.heldout_pairs, and the recipe must run the eval stage"
        )
    if (part == "trial") != (trial_index is not None):
        raise SafeAlignError("--trial-index goes with --part trial (and --part trial needs --trial-index)")
    run_dir = (run_dir or Path("runs") / recipe.name).resolve()
    grid = trial_overrides(recipe.sweep.grid)
    if part == "trial":
        if not 0 <= trial_index < len(grid):
            raise SafeAlignError(f"--trial-index {trial_index}: the grid has trials 0..{len(grid) - 1}")
        run_one_trial(recipe_path, recipe, run_dir, overrides, grid[trial_index])
        return None
    claim_run_dir(run_dir)
    with RunLock(run_dir / SWEEP_LOCK_FILE):  # one driver; a trial's own run locks its trial directory
        shared = shared_stages(recipe)
        if part in ("all", "shared") and shared:
            run_shared(recipe_path, overrides, run_dir, shared)
        if part == "shared":
            return None
        if part == "all":
            log.info("sweep: %d trials over %s", len(grid), ", ".join(recipe.sweep.grid))
            trials = run_trials(recipe_path, recipe, run_dir, overrides)
        else:
            trials = collect_trials(run_dir, recipe)
        return write_selection(recipe, run_dir, trials)


def run_one_trial(recipe_path: Path, recipe: Recipe, run_dir: Path, overrides: list[str], params: dict) -> None:
    """`--part trial`: one grid point, after the shared stages (what one pod of the Indexed Job runs)."""
    missing = [s for s in shared_stages(recipe) if not (run_dir / s / "stage.json").is_file()]
    if missing:
        raise SafeAlignError(f"sweep trial: shared stage(s) {', '.join(missing)} not run yet in {run_dir} (--part shared)")
    result = run_trial(recipe_path.resolve(), recipe, run_dir, overrides, params)
    if result.status != "ok":
        raise SafeAlignError(f"sweep trial {result.trial_id} failed: {result.error}")
    print(f"sweep trial {result.trial_id}: safety {result.safety}, helpfulness {result.helpfulness}")
