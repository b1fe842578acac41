"""How much of a held-out Ĵ_C comparison is the eval's own sampling: every model answers each held-out cost
prompt several times (one generator seed per answer) and the cost model scores every answer.

    .venv/bin/python benchmarks/heldout_cost_noise.py runs/diagnostic-noise --recipe recipes/diagnostic-noise.yaml \
        --models aligned fixed_s26 --answers 4
    .venv/bin/python benchmarks/heldout_cost_noise.py --costs benchmarks/results/heldout_cost_noise.json   # re-read

Why: the eval reads a model's held-out Ĵ_C from one sampled answer per prompt (`eval.heldout_cost_prompts`,
align's temperature), and claim (b)'s registrations compare two such numbers per seed. The paired spread
over seeds (0.099 in the sixth registration) mixes training variance, which only more seeds shrink, with
sampling variance, which more answers per prompt shrink at the price of eval time only. This separates them.

The answers come from the eval stage's own path (`cached_answers`: the eval's cache, so answer 0 — the
recipe's seed — *is* the eval's answer), answer j at seed recipe.seed + j. Measured per model: its mean, the
within-prompt sd of one answer's cost σ_w and the between-prompt sd σ_b (σ_b² = var of the prompts' means −
σ_w²/K), and the sd of the model's Ĵ_C from seed to seed two ways — as independent answers would give it
(σ_w/√n) and as measured over the K seeds (the ratio of their squares is the design effect: > 1 when one
seed's answers share their luck). For the first two models, the same for their paired difference at one
answer per prompt, with common random numbers (both at seed j, as the eval draws them) and without (seeds j
and j + 1). Then, from `--observed-sd` (the paired sd over training seeds, one answer per prompt), the
training sd the measured sampling sd leaves and the seed pairs a one-sided paired t at α 0.05 needs for
80 % power at `--effect`, with 1, 2, 4 and 8 answers per prompt.

Results: benchmarks/results/heldout_cost_noise.json (every answer's cost kept) and a table.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import asdict
from pathlib import Path

from safealign.eval.statistics import mean_and_sd

HERE = Path(__file__).resolve().parent
ANSWER_COUNTS = (1, 2, 4, 8)


def within_between(costs: list[list[float]]) -> dict:
    """One model's costs[answer][prompt] (≥ 2 answers): σ_w, σ_b, and the sd of its Ĵ_C over seeds, as
    independent answers would give it (σ_w/√n) and as measured (the per-seed means' sd)."""
    answers, prompts = len(costs), len(costs[0])
    means = [math.fsum(c[p] for c in costs) / answers for p in range(prompts)]
    within = (
        math.fsum(math.fsum((c[p] - means[p]) ** 2 for c in costs) / (answers - 1) for p in range(prompts)) / prompts
    )
    grand = math.fsum(means) / prompts
    between = math.fsum((m - grand) ** 2 for m in means) / (prompts - 1) - within / answers
    per_seed = [math.fsum(c) / prompts for c in costs]
    return {
        "mean": grand,
        "sigma_within": math.sqrt(within),
        "sigma_between": math.sqrt(max(between, 0.0)),
        "seed_sd_if_independent": math.sqrt(within / prompts),
        "seed_sd": mean_and_sd(per_seed)[1],
        "per_seed_means": per_seed,
    }


def differences(first: list[list[float]], second: list[list[float]], shift: int) -> list[list[float]]:
    """first − second, answer j of `first` against answer (j + shift) mod K of `second`, per prompt (shift 0:
    common random numbers): a costs[answer][prompt] of its own, which `within_between` reads."""
    answers = len(first)
    return [[a - b for a, b in zip(first[j], second[(j + shift) % answers])] for j in range(answers)]


def pairs_needed(effect: float, sd: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """The fewest seed pairs at which a one-sided paired t-test at `alpha` detects `effect` with `power`
    (Student's noncentral t, exact for normal differences)."""
    from scipy.stats import nct, t

    if sd == 0.0:
        return 2
    n = 2
    while nct.sf(t.ppf(1 - alpha, n - 1), n - 1, abs(effect) * math.sqrt(n) / sd) < power:
        n += 1
    return n


def sd_interval(value: float, count: int) -> tuple[float, float]:
    """The 95 % interval of a normal sample's sd measured as `value` from `count` values (chi-square)."""
    from scipy.stats import chi2

    df = count - 1
    return value * math.sqrt(df / chi2.ppf(0.975, df)), value * math.sqrt(df / chi2.ppf(0.025, df))


def analyse(costs: dict[str, list[list[float]]], observed_sd: float, observed_pairs: int, effect: float) -> dict:
    """Every number the table prints, from costs[model][answer][prompt]."""
    result: dict = {"models": {name: within_between(c) for name, c in costs.items()}}
    for m in result["models"].values():
        m["design_effect"] = (m["seed_sd"] / m["seed_sd_if_independent"]) ** 2
    if len(costs) < 2:
        return result
    first, second = list(costs)[:2]
    answers = len(costs[first])
    paired = within_between(differences(costs[first], costs[second], 0))
    crn_means, crn = paired["per_seed_means"], paired["seed_sd"]
    training = math.sqrt(max(observed_sd**2 - crn**2, 0.0))
    crn_high = sd_interval(crn, answers)[1]
    result["pair"] = {
        "models": [first, second],
        "per_seed_differences": crn_means,
        "sampling_sd": crn,
        "sampling_sd_ci95": list(sd_interval(crn, answers)),
        "sampling_sd_if_independent": paired["seed_sd_if_independent"],
        "sampling_sd_without_common_random_numbers": within_between(differences(costs[first], costs[second], 1))[
            "seed_sd"
        ],
        "observed_sd": observed_sd,
        "observed_sd_ci95": list(sd_interval(observed_sd, observed_pairs)),
        "training_sd": training,
        "effect": effect,
        "pairs_needed_by_answers": {
            k: pairs_needed(effect, math.sqrt(training**2 + crn**2 / k)) for k in ANSWER_COUNTS
        },
        "pairs_needed_at_sampling_sd_ci95_high": {
            k: pairs_needed(effect, math.sqrt(max(observed_sd**2 - crn_high**2, 0.0) + crn_high**2 / k))
            for k in ANSWER_COUNTS
        },
    }
    return result


def sample_costs(run_dir: Path, recipe_path: Path, names: list[str], answers: int) -> dict:
    """costs[model][answer][prompt] on the eval's held-out cost prompts, through the eval stage's code."""
    from safealign.domain.generation import resolve_backend
    from safealign.openrlhf import engine
    from safealign.recipe import load_recipe
    from safealign.stages import StageContext, cost_model_dir
    from safealign.stages.evaluate import cached_answers, heldout_prompts, produced_models
    from safealign.trainers.cost_sampling import CostModel, cost_requests
    from safealign.workflows.heldout import heldout_rows, load_training_rows
    from safealign.workflows.inference import scoring_settings

    recipe = load_recipe(recipe_path)
    with tempfile.TemporaryDirectory() as scratch:
        ctx = StageContext(recipe, run_dir, Path(scratch))
        models = produced_models(ctx)
        if unknown := [n for n in names if n not in models]:
            raise SystemExit(f"--models: {', '.join(unknown)} not in this run (it has {', '.join(models)})")
        cost_dir = cost_model_dir(ctx)
        args = scoring_settings(recipe, "rm", cost_dir, Path(scratch))
        cost = CostModel(cost_dir, recipe, args, engine.make_strategy(args))
        rows = heldout_rows(recipe, load_training_rows(recipe))
        sampling = recipe.align.cost_sampling
        prompts, _ = heldout_prompts(rows, cost, recipe.eval.heldout_cost_prompts, sampling.max_new_tokens)
        requests = cost_requests(prompts, sampling)
        content = [[asdict(r) for r in requests]]
        costs: dict[str, list[list[float]]] = {}
        for name in names:
            costs[name] = []
            for j in range(answers):
                seeded = recipe.model_copy(update={"seed": recipe.seed + j})
                generated = cached_answers(
                    models[name],
                    seeded,
                    ctx.cache_dir("eval"),
                    content,
                    lambda g: {"answers": g.generate(requests)},
                    tag="heldout-cost-",
                )
                costs[name].append(cost.score(prompts, generated["answers"], recipe.rm.score_batch_size))
                print(
                    f"{name} answer {j + 1}/{answers}: Ĵ_C {math.fsum(costs[name][-1]) / len(prompts):.3f}", flush=True
                )
    return {"backend": resolve_backend(recipe.eval.backend), "prompts": len(prompts), "costs": costs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, nargs="?", help="a run directory with a finished rm stage (and align)")
    parser.add_argument("--recipe", type=Path, help="the recipe the run was started with")
    parser.add_argument(
        "--models", nargs="+", default=["base"], help="models by their eval name (base, aligned, an ablation)"
    )
    parser.add_argument("--answers", type=int, default=4, help="answers per prompt (≥ 2; one seed each)")
    parser.add_argument("--costs", type=Path, help="re-read a results file's costs instead of sampling")
    parser.add_argument(
        "--observed-sd",
        type=float,
        default=0.099,
        help="paired sd over training seeds at one answer (sixth registration: 0.099)",
    )
    parser.add_argument("--observed-pairs", type=int, default=7, help="seed pairs the observed sd is from")
    parser.add_argument(
        "--effect", type=float, default=0.072, help="the difference to detect (sixth registration: 0.072)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "heldout_cost_noise.json")
    options = parser.parse_args()
    if options.costs and not options.costs.is_file():
        parser.error(f"--costs: {options.costs} is not a file (a results file this script wrote)")
    if options.costs:
        sampled = {
            k: v
            for k, v in json.loads(options.costs.read_text()).items()
            if k in ("recipe", "backend", "prompts", "costs")
        }
    elif options.run_dir is None or options.recipe is None:
        parser.error("give RUN_DIR and --recipe (or --costs FILE to re-read one)")
    elif options.answers < 2:
        parser.error("--answers: at least 2 (a within-prompt spread needs two answers)")
    else:
        sampled = {
            "recipe": str(options.recipe),
            **sample_costs(options.run_dir, options.recipe.resolve(), options.models, options.answers),
        }
    result = {**sampled, **analyse(sampled["costs"], options.observed_sd, options.observed_pairs, options.effect)}
    answers = len(next(iter(sampled["costs"].values())))

    print(f"\n{sampled['prompts']} held-out prompts, {answers} answers each (one seed each)")
    print("| model | Ĵ_C | σ_w | σ_b | Ĵ_C's sd over seeds: measured (if independent) | design effect | per-seed Ĵ_C |")
    print("|---|---|---|---|---|---|---|")
    for name, m in result["models"].items():
        seeds = ", ".join(f"{v:.3f}" for v in m["per_seed_means"])
        print(
            f"| {name} | {m['mean']:.3f} | {m['sigma_within']:.3f} | {m['sigma_between']:.3f} | {m['seed_sd']:.3f} "
            f"({m['seed_sd_if_independent']:.3f}) | {m['design_effect']:.1f} | {seeds} |"
        )
    if pair := result.get("pair"):
        first, second = pair["models"]
        low, high = pair["sampling_sd_ci95"]
        print(f"\n{first} − {second} per seed: {', '.join(f'{d:+.3f}' for d in pair['per_seed_differences'])}")
        print(
            f"sampling sd at one answer: {pair['sampling_sd']:.4f} (95 % {low:.4f}–{high:.4f}) with common random "
            f"numbers; {pair['sampling_sd_if_independent']:.4f} if prompts were independent; "
            f"{pair['sampling_sd_without_common_random_numbers']:.4f} without common random numbers"
        )
        olow, ohigh = pair["observed_sd_ci95"]
        print(
            f"observed paired sd over {options.observed_pairs} training seeds {pair['observed_sd']:.3f} "
            f"(95 % {olow:.3f}–{ohigh:.3f}); training sd left {pair['training_sd']:.4f}"
        )
        for label, needed in (
            ("", pair["pairs_needed_by_answers"]),
            (" (sampling sd at its 95 % high)", pair["pairs_needed_at_sampling_sd_ci95_high"]),
        ):
            print(
                f"seed pairs for 80 % power at {pair['effect']}{label}: "
                + ", ".join(f"{k} answer{'s' if k > 1 else ''} {n}" for k, n in needed.items())
            )
    options.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{options.out}")


if __name__ == "__main__":
    main()
