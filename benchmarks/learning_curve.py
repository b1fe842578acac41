"""Held-out accuracy against training pairs, and how many pairs the curve says a significant effect needs.

    .venv/bin/python benchmarks/learning_curve.py runs/evidence            # after the run's eval stage

Reads a finished run (align/stage.json for each model's training pairs and steps, eval/results.json for
its held-out measure) and prints, per model of the curve (default: recipes/evidence.yaml's Safe-MM-DPO
models on nested subsets — curve_100, curve_200, frontier_dual, aligned — after the base at 0 pairs), the
held-out likelihood accuracy per dimension, its change against the base and the exact McNemar p.

Then the projection, for one dimension (`--dimension`, default safe) and each measure (likelihood
accuracy against the base's; implicit-reward accuracy against 50 %): the gain over the base is fitted
as a + b·ln(pairs) (least squares over the trained models), and the smallest gain that the exact McNemar
test calls significant at `--alpha` (0.01, issue 17's criterion) is computed for this run's held-out
pairs (likelihood: the exact McNemar test, assuming the largest model's share of discordant pairs, those
on which it and the base disagree; implicit reward: the exact sign test over all pairs);
the fit is solved for the training pairs that reach that gain. Also: the held-out pairs the largest
model's measured gain would need to reach significance. Both are extrapolations from a handful of noisy
points; they say which side of the budget the criterion falls on, not more.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from safealign.eval.pairs import smallest_significant_difference
from safealign.eval.statistics import sign_test_p

CURVE = ("curve_100", "curve_200", "frontier_dual", "aligned")


def curve_points(run: Path, models: tuple[str, ...], dimension: str, measure: str = "likelihood") -> list[dict]:
    """Per model: pairs, steps and a held-out measure of `dimension`, base first at 0 pairs (for the
    implicit reward, which the base does not have: 50 %, no margin moved either way)."""
    align = json.loads((run / "align" / "stage.json").read_text())
    results = json.loads((run / "eval" / "results.json").read_text())["models"]
    base = results["base"]["heldout"][dimension]["likelihood"]
    if measure == "implicit_reward":
        base = {**base, "accuracy": 0.5, "correct": base["n"] / 2, "ci95": [0.5, 0.5]}
    points = [{"model": "base", "pairs": 0, "steps": 0, **base}]
    for name in models:
        trained = align if name == "aligned" else align["ablations"][name]
        entry = results[name]["heldout"][dimension][measure]
        points.append({"model": name, "pairs": trained["train_pairs"], "steps": trained["steps"], **entry})
    return points


def significant_share(n: int, alpha: float) -> float | None:
    """The smallest share of n pairs moved toward the preferred response that the exact sign test calls
    significant at `alpha` (the implicit reward's test against no change)."""
    difference = smallest_significant_difference(n, alpha)
    return None if difference is None else (n + difference) / (2 * n)


def significant_gain(n: int, discordant_share: float, alpha: float) -> float | None:
    """The smallest net gain (share of n) the exact McNemar test calls significant at `alpha` when
    `discordant_share`·n pairs change; None when no split of them would be."""
    difference = smallest_significant_difference(round(discordant_share * n), alpha)
    return None if difference is None else difference / n


def fit_log(points: list[dict]) -> tuple[float, float]:
    """Least-squares a, b of gain = a + b·ln(pairs) over the trained models."""
    xs = [math.log(p["pairs"]) for p in points]
    ys = [p["accuracy"] - p["base_accuracy"] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def heldout_pairs_needed(gain: float, discordant_share: float, alpha: float, limit: int = 1_000_000) -> int | None:
    """Held-out pairs at which a measured `gain` with this discordant share becomes significant."""
    if gain <= 0:
        return None
    n = 10
    while n <= limit:
        changed = round(discordant_share * n)
        gained = round((changed + gain * n) / 2)
        if changed and sign_test_p(gained, changed - gained) < alpha:
            return n
        n = math.ceil(n * 1.05)
    return None


def project(points: list[dict], alpha: float, measure: str = "likelihood") -> dict:
    """Fit gain = a + b·ln(pairs) over the trained models and solve it for the gain the test needs."""
    base = points[0]["accuracy"]
    trained = [{**p, "base_accuracy": base} for p in points[1:]]
    n = points[-1]["n"]
    if measure == "implicit_reward":
        share = None
        needed = None if significant_share(n, alpha) is None else significant_share(n, alpha) - 0.5
    else:
        last = points[-1]["vs_base"]
        share = (last["gained"] + last["lost"]) / n
        needed = significant_gain(n, share, alpha)
    a, b = fit_log(trained)
    pairs = math.exp((needed - a) / b) if needed is not None and b > 0 else None
    measured = points[-1]["accuracy"] - base
    return {
        "measure": measure,
        "fit": {"a": a, "b_per_ln_pairs": b},
        "discordant_share": share,
        "gain_needed": needed,
        "training_pairs_needed": pairs,
        "largest_gain": measured,
        "heldout_pairs_needed_at_largest_gain": heldout_pairs_needed(measured, share, alpha) if share else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--models", default=",".join(CURVE), help="the curve's models, fewest pairs first")
    parser.add_argument("--dimension", choices=("helpful", "safe"), default="safe")
    parser.add_argument("--alpha", type=float, default=0.01)
    args = parser.parse_args()
    models = tuple(args.models.split(","))
    for dimension in ("safe", "helpful"):
        likelihood = curve_points(args.run, models, dimension)
        implicit = curve_points(args.run, models, dimension, "implicit_reward")
        print(f"\n{dimension} ({likelihood[0]['n']} held-out pairs)")
        print("| model | pairs | steps | likelihood accuracy [95 % CI] | vs base: gained / lost, p (McNemar) "
              "| implicit-reward accuracy [95 % CI], p (sign test) |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for p, q in zip(likelihood, implicit):
            versus = p.get("vs_base")
            compared = f"+{versus['gained']} / −{versus['lost']}, p {versus['p_value']:.2g}" if versus else "—"
            reward = f"{q['accuracy']:.1%} [{q['ci95'][0]:.1%}, {q['ci95'][1]:.1%}], p {q['p_value']:.2g}" if "p_value" in q else "—"
            print(f"| {p['model']} | {p['pairs']} | {p['steps']} | {p['accuracy']:.1%} [{p['ci95'][0]:.1%}, "
                  f"{p['ci95'][1]:.1%}] | {compared} | {reward} |")  # fmt: skip
    for measure in ("likelihood", "implicit_reward"):
        projection = project(curve_points(args.run, models, args.dimension, measure), args.alpha, measure)
        print(f"\nprojection ({args.dimension}, {measure}, alpha {args.alpha}):")
        print(json.dumps(projection, indent=2))


if __name__ == "__main__":
    main()
