"""The report: `report.md` and a self-contained `report.html` (plots embedded, opens offline).

What a reader wants first is the trade-off, so the report opens with the models × (safety, helpfulness)
table and the safety-vs-helpfulness scatter, then per-category safety, the align stage's λ and loss
curves, judge agreement, and example answers where the models differ. Plots are matplotlib PNGs,
written to `plots/` (linked from the Markdown) and base64-embedded in the HTML.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from safealign.domain.metrics import read_metrics
from safealign.eval.helpfulness import LABELS, headline_helpfulness, headline_interval
from safealign.eval.plots import plt, png


def _helpfulness(model: dict) -> tuple[float | None, str]:
    """The headline helpfulness number a model has, and its label ("" when it has none)."""
    value, metric = headline_helpfulness(model)
    return value, LABELS[metric] if value is not None else ""


def _fmt_rate(rate: dict) -> str:
    low, high = rate["ci95"]
    return f"{rate['rate']:.1%} [{low:.0%}, {high:.0%}]" if rate["n"] else "n/a"


def _fmt_share(value: float | None) -> str:
    return "none possible" if value is None else f"±{value:.1%}"


def _plane(
    points: list[tuple], xlabel: str, ylabel: str, title: str, ylim: tuple[float, float] | None = None,
    chance: float | None = None,
) -> bytes:
    """Labelled models on a plane with 95 % error bars: points are (name, x, x_ci or None, y, y_ci);
    `chance` draws the no-effect level on both axes."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    if chance is not None:
        ax.axhline(chance, color="grey", lw=0.8, ls="--")
        ax.axvline(chance, color="grey", lw=0.8, ls="--")
    span = (max(p[1] for p in points) - min(p[1] for p in points)) or 1.0
    placed: list[tuple[float, float]] = []
    for name, x, x_ci, y, y_ci in points:
        xerr = None if x_ci is None else [[x - x_ci[0]], [x_ci[1] - x]]
        ax.errorbar(x, y, xerr=xerr, yerr=[[y - y_ci[0]], [y_ci[1] - y]], fmt="o", capsize=4, label=name)
        # Models on (almost) the same spot get their labels stacked, not drawn over each other.
        near = sum(abs(x - px) < 0.04 * span and abs(y - py) < 0.04 for px, py in placed)
        placed.append((x, y))
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6 - 11 * near))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.set_title(title, pad=12)
    return png(fig)


def plot_tradeoff(results: dict, judge: str) -> bytes | None:
    """BeaverTails safety (one judge) against the best helpfulness number every model has."""
    points = [
        (name, _helpfulness(m)[0], headline_interval(m), m["safety"][judge]["overall"]["rate"],
         m["safety"][judge]["overall"]["ci95"])
        for name, m in results["models"].items()
        if judge in m["safety"]
    ]
    points = [p for p in points if p[1] is not None]
    if not points:
        return None
    label = _helpfulness(next(iter(results["models"].values())))[1]
    return _plane(points, label, f"BeaverTails safety rate ({judge} judge)",
                  "Safety vs helpfulness (up and right is better)", ylim=(-0.02, 1.12))  # fmt: skip


def _heldout_points(results: dict, measure: str) -> list[tuple]:
    points = []
    for name, m in results["models"].items():
        held = m.get("heldout", {})
        if measure in held.get("helpful", {}) and measure in held.get("safe", {}):
            h, s = held["helpful"][measure], held["safe"][measure]
            points.append((name, h["accuracy"], h["ci95"], s["accuracy"], s["ci95"]))
    return points


def plot_heldout(results: dict) -> bytes | None:
    """Held-out preference accuracy, helpfulness against harmlessness: the judge-free trade-off plane."""
    points = _heldout_points(results, "likelihood")
    if not points:
        return None
    return _plane(points, "held-out helpfulness accuracy (preferred response more likely)",
                  "held-out harmlessness accuracy", "Held-out preference accuracy (up and right is better)")  # fmt: skip


def plot_heldout_reward(results: dict) -> bytes | None:
    """The same plane in DPO's implicit reward: where training moved each model's preferences (0.5: nowhere)."""
    points = _heldout_points(results, "implicit_reward")
    if not points:
        return None
    return _plane(points, "helpfulness: margin moved toward the preferred response",
                  "harmlessness: margin moved toward the safer response",
                  "Held-out implicit-reward accuracy (up and right is better)", chance=0.5)  # fmt: skip


def heldout_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """Per model and dimension: likelihood accuracy with its interval, the paired change against the base
    (pairs gained / lost, exact McNemar p) and, for models trained from the base, DPO's implicit-reward accuracy."""
    rows = []
    for name, m in results["models"].items():
        for dimension, entry in m.get("heldout", {}).items():
            if dimension not in ("helpful", "safe"):
                continue
            like = entry["likelihood"]
            low, high = like["ci95"]
            change = like.get("vs_base")
            implicit = entry.get("implicit_reward")
            rows.append([
                name, dimension, f"{like['accuracy']:.1%} [{low:.0%}, {high:.0%}] of {like['n']}",
                f"+{change['gained']} / −{change['lost']}" if change else "",
                format_p(change["p_value"]) if change else "",
                _fmt_share(change.get("min_significant_change")) if change else "",
                _fmt_implicit(implicit) if implicit else "",
                f"{m['heldout'].get('seconds_per_100_pairs', '')}",
            ])  # fmt: skip
    header = ["model", "dimension", "likelihood accuracy [95 % CI]", "vs base (pairs)", "p (McNemar)",
              "smallest significant change", "implicit-reward accuracy [95 % CI], p (sign test)",
              "s / 100 pairs"]  # fmt: skip
    return (header, rows) if rows else None


def _fmt_implicit(implicit: dict) -> str:
    """Accuracy, interval and sign-test p (results.json written before the test existed have no p)."""
    low, high = implicit["ci95"]
    p = implicit.get("p_value")
    return f"{implicit['accuracy']:.1%} [{low:.0%}, {high:.0%}]" + (f", p {format_p(p)}" if p is not None else "")


HELDOUT_NOTE = (
    "Labelled pairs no stage trained on (eval.heldout_pairs). Likelihood accuracy: the share of pairs whose "
    "preferred response the model finds more likely per token; paired with the base on the same pairs "
    "(exact McNemar on the pairs that changed). Implicit-reward accuracy: DPO's reward (log-ratio to the base) "
    "ranks the preferred response higher, i.e. training moved the model's preference margin toward it; "
    "also paired with the base, on every pair (exact sign test of toward against away; 50 %: no effect)."
)

#: The report's plots, in order, with their titles (markdown and HTML alike).
PLOTS = (
    ("heldout", "Held-out preference accuracy"),
    ("heldout_reward", "Held-out implicit-reward accuracy"),
    ("tradeoff", "Safety vs helpfulness"),
    ("categories", "Safety by category"),
    ("training", "Training (align)"),
    ("dual", "λ and Ĵ_C of every dual run"),
)


def plot_categories(results: dict, judge: str) -> bytes | None:
    models = [(n, m["safety"][judge]["categories"]) for n, m in results["models"].items() if judge in m["safety"]]
    if not models:
        return None
    categories = sorted(models[0][1])
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(categories) + 1.2))
    height = 0.8 / len(models)
    for k, (name, rates) in enumerate(models):
        ys = [i + k * height for i in range(len(categories))]
        values = [rates[c]["rate"] for c in categories]
        xerr = [[v - rates[c]["ci95"][0] for v, c in zip(values, categories)],
                [rates[c]["ci95"][1] - v for v, c in zip(values, categories)]]  # fmt: skip
        ax.barh(ys, values, height=height, label=name, xerr=xerr, error_kw={"elinewidth": 0.8, "capsize": 2})
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(categories))])
    ax.set_yticklabels([c.replace(",", ", ") for c in categories], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"safety rate ({judge} judge)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach 1.0
    ax.invert_yaxis()
    ax.set_title("BeaverTails safety by harm category (Wilson 95 % intervals)")
    return png(fig)


def plot_training(metrics: list[dict], threshold: float | None = None) -> bytes | None:
    """The aligned run's losses, and its λ with the sampled Ĵ_C against the threshold d (λ should rise
    while Ĵ_C is above d). λ's axis spans at least 0.5, so a change in the third decimal looks flat."""
    steps = [m for m in metrics if "loss" in m]
    if not steps:
        return None
    x = [m["step"] for m in steps]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("loss", "total"), ("loss_h", "helpful L_H"), ("loss_s", "harmless L_S")):
        values = [m.get(key) for m in steps]
        if any(v is not None for v in values):
            left.plot(x, [math.nan if v is None else v for v in values], label=label)
    left.set_xlabel("optimizer step")
    left.set_title("align losses")
    left.legend()
    left.grid(alpha=0.3)
    lambdas = [m.get("lambda", math.nan) for m in steps]
    right.plot(x, lambdas, color="tab:red", label="λ")
    calm_limits(right, lambdas, min_span=0.5)
    right.set_xlabel("optimizer step")
    right.set_ylabel("λ", color="tab:red")
    right.set_title("Lagrange multiplier λ and cost estimate Ĵ_C")
    right.grid(alpha=0.3)
    updates = [(m["step"], m["cost_estimate"]) for m in steps if m.get("cost_estimate") is not None]
    if updates:  # Ĵ_C exists only at the steps λ was updated (every align.lambda_update_every)
        twin = right.twinx()
        twin.plot(*zip(*updates), color="tab:blue", alpha=0.6, marker="o", markersize=3, label="Ĵ_C")
        if threshold is not None:
            twin.axhline(threshold, color="tab:blue", linestyle="--", linewidth=1, label=f"d = {threshold:g}")
            twin.legend(fontsize=8, loc="lower right")
        twin.set_ylabel("Ĵ_C (sampled)", color="tab:blue")
    return png(fig)


def _verdict(example: dict, answer: dict) -> str:
    """An example answer's verdict with the judge that gave it ("unsafe, cost_model judge")."""
    verdict = "safe" if answer["safe"] else "unsafe"
    return f"{verdict}, {example['judge']} judge" if example.get("judge") else verdict


def calm_limits(ax, values: list[float], min_span: float) -> None:
    """Y limits spanning at least `min_span` around `values`: matplotlib stretches any range to the full
    axis, so a λ going 1.000 → 0.998 would look like a collapse; with a floor on the span it looks flat."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return
    low, high = min(finite), max(finite)
    if high - low < min_span:
        middle = (low + high) / 2
        ax.set_ylim(middle - min_span / 2, middle + min_span / 2)


def _threshold(results: dict) -> float | None:
    """d on the training pool, for the training plots: the recipe's number, or the aligned run's
    calibrated one under `initial` (the held-out table's d is then the base's held-out Ĵ_C, another scale)."""
    d = results.get("provenance", {}).get("cost_threshold")
    return d if isinstance(d, (int, float)) else None


def own_thresholds(updates: dict[str, list[dict]]) -> dict[str, float] | None:
    """Each dual run's d (its update rows' `cost_threshold`) when the runs' ds differ — under
    `cost_threshold: initial` every run calibrates its own —, else None (one d for all, or not logged)."""
    own = {name: rows[-1].get("cost_threshold") for name, rows in updates.items() if rows}
    return own if None not in own.values() and len(set(own.values())) > 1 else None


#: What the dual-runs table says.
DUAL_RUNS_NOTE = (
    "Safe RLHF's picture in numbers, for every run that sampled Ĵ_C (fixed-λ runs too with "
    "align.cost_sampling.in_fixed_runs: λ then stays put, and the row says whether fixed λ reached d): its d "
    "(each run's own under cost_threshold: initial), the pool's Ĵ_C at the first and last update, the largest λ "
    "an update that saw Ĵ_C above d set (how far λ rose while the constraint was violated), λ's last value, and "
    "the first update at which Ĵ_C was at or below d (λ then comes down). λ rising while "
    "Ĵ_C > d and settling once it is met is the mechanism working; the held-out table above says whether it "
    "held on other prompts."
)


def dual_runs_table(logs: dict[str, list[dict]], threshold: float | None) -> tuple[list[str], list[list[str]]] | None:
    """One row per run that sampled Ĵ_C (`DUAL_RUNS_NOTE`); `threshold`: d for rows that do not log their
    own (runs from before `cost_threshold` was logged per update)."""
    rows = []
    for name, steps in logs.items():
        updates = [m for m in steps if m.get("cost_estimate") is not None]
        if not updates:
            continue
        d = updates[-1].get("cost_threshold", threshold)
        met = next((m["step"] for m in updates if d is not None and m["cost_estimate"] <= d), None)
        with_lambda = [m for m in updates if m.get("lambda_next") is not None]
        # λ after the updates that saw Ĵ_C above d: how far it rose while the constraint was violated
        rising = [m["lambda_next"] for m in with_lambda if d is None or m["cost_estimate"] > d]
        rows.append([name, _fmt_number(d), f"{updates[0]['cost_estimate']:.3f} (step {updates[0]['step']})",
                     f"{updates[-1]['cost_estimate']:.3f} (step {updates[-1]['step']})",
                     _fmt_number(max(rising) if rising else None),
                     _fmt_number(with_lambda[-1]["lambda_next"] if with_lambda else None),
                     "n/a" if d is None else "not reached" if met is None else f"step {met}"])  # fmt: skip
    header = ["run", "d", "Ĵ_C at the first update", "at the last", "λ max while Ĵ_C > d", "λ last", "Ĵ_C ≤ d first at"]
    return (header, rows) if rows else None


def plot_dual_runs(logs: dict[str, list[dict]], threshold: float | None) -> bytes | None:
    """λ and the sampled Ĵ_C of every run that sampled it (fixed-λ runs too, λ flat, with `in_fixed_runs`),
    step by step, against d (each run's own, dashed in its colour, when `cost_threshold: initial` calibrated
    them apart): whether λ rises while Ĵ_C > d and settles once it is met, run by run (only when more than
    one run samples Ĵ_C; the training plot shows a single one)."""
    dual = {name: [m for m in steps if m.get("cost_estimate") is not None] for name, steps in logs.items()}
    dual = {name: updates for name, updates in dual.items() if updates}
    if len(dual) < 2:
        return None
    own = own_thresholds(dual)
    per_run = own is not None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, updates in sorted(dual.items()):
        steps = [m["step"] for m in updates]
        (line,) = left.plot(steps, [m.get("lambda_next", math.nan) for m in updates], marker="o", markersize=3, label=name)
        right.plot(steps, [m["cost_estimate"] for m in updates], marker="o", markersize=3, color=line.get_color())
        if per_run:
            right.axhline(own[name], color=line.get_color(), linestyle="--", linewidth=1)
    if per_run:
        right.plot([], [], color="black", linestyle="--", linewidth=1, label="d (each run's own)")
        right.legend(fontsize=8)
    elif threshold is not None:
        right.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"d = {threshold:g}")
        right.legend(fontsize=8)
    calm_limits(left, [m.get("lambda_next") for updates in dual.values() for m in updates], min_span=0.5)
    left.set(xlabel="optimizer step", ylabel="λ after the update", title="λ, every run with the dual update")
    right.set(xlabel="optimizer step", ylabel="Ĵ_C (sampled pool)", title="The policy's sampled cost Ĵ_C")
    left.legend(fontsize=7, ncol=2)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return png(fig)


def _params(model: dict) -> str:
    count = model.get("parameters")
    return "n/a" if count is None else f"{count / 1e6:.1f}M"


def _safety_cell(rates: dict) -> str:
    """A judge's overall rate, and how many answers it gave no verdict on (left out of the rate)."""
    unjudged = rates.get("unjudged")
    return _fmt_rate(rates["overall"]) + (f", {unjudged} without a verdict" if unjudged else "")


def _fmt_repetition(value: float | None) -> str:
    """A distinct-n-gram share (safealign.eval.heldout_cost.distinct_ngram_share), n/a when there was none."""
    return "n/a" if value is None else f"{value:.2f}"


def _shows_repetition(results: dict) -> bool:
    """Whether the eval measured the BeaverTails answers' repetition (results written before it did not)."""
    return any("distinct_3grams" in m["generation"] for m in results["models"].values())


def _tables(results: dict, judges: list[str]) -> tuple[list[str], list[list[str]]]:
    with_cost = any("cost" in m for m in results["models"].values())
    header = ["model", "parameters"] + [f"safety ({j})" for j in judges]
    header += ["mean cost (lower: safer)", "cost below base's"] if with_cost else []
    repetition = _shows_repetition(results)
    header += ["helpfulness", "answers/s"] + (["distinct 3-grams"] if repetition else [])
    rows = []
    for name, m in results["models"].items():
        cost = m.get("cost")
        cost_cells = (
            [f"{cost['mean_cost']:.3f}", f"{cost['lower_cost_than_base']:.1%}"] if cost else ["n/a", "n/a"]
        ) if with_cost else []  # fmt: skip
        value, label = _helpfulness(m)
        helpful = (
            "n/a" if value is None else (f"{value:.2f}" if "MT-Bench" in label else f"{value:.1%}") + f" ({label})"
        )
        rows.append(
            [name, _params(m)]
            + [_safety_cell(m["safety"][j]) if j in m["safety"] else "n/a" for j in judges]
            + cost_cells
            + [helpful, f"{m['generation']['answers_per_second']:.2f} ({m['generation']['backend']})"]
            + ([_fmt_repetition(m["generation"].get("distinct_3grams"))] if repetition else [])
        )
    return header, rows


def teacher_vs_student(results: dict, judges: list[str]) -> tuple[list[str], list[list[str]]] | None:
    """What distillation kept: the student against its teacher (aligned, else base), with ratios."""
    models = results["models"]
    if "student" not in models:
        return None
    teacher_name = "aligned" if "aligned" in models else "base"
    teacher, student = models[teacher_name], models["student"]

    def row(label: str, t: float | None, s: float | None, fmt: str) -> list[str]:
        ratio = f"{s / t:.2f}×" if t and s is not None else "n/a"
        show = lambda v: "n/a" if v is None else format(v, fmt)  # noqa: E731
        return [label, show(t), show(s), ratio]

    def millions(model: dict) -> float | None:
        return None if model.get("parameters") is None else model["parameters"] / 1e6

    rows = [row("parameters (M)", millions(teacher), millions(student), ".1f")]
    for judge in judges:
        if judge in teacher["safety"] and judge in student["safety"]:
            t, s = teacher["safety"][judge]["overall"]["rate"], student["safety"][judge]["overall"]["rate"]
            rows.append(row(f"safety ({judge})", t, s, ".1%"))
    (t, label), (s, _) = _helpfulness(teacher), _helpfulness(student)
    if label:
        rows.append(row(f"helpfulness: {label}", t, s, ".2f" if "MT-Bench" in label else ".1%"))
    rows.append(row("answers/s", teacher["generation"]["answers_per_second"],
                    student["generation"]["answers_per_second"], ".2f"))  # fmt: skip
    return ["", f"teacher ({teacher_name})", "student", "student / teacher"], rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table (a `|` inside a cell escaped): the report's, and `safealign pool`'s."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def multiplicity_note(rows: list[list[str]]) -> str:
    """How many p-values the paired table holds and what they may be used for."""
    return (f"{len(rows)} paired tests, each uncorrected for the others: exploratory. A claim rests only on a "
            "test named before the run (eval.primary, Holm-corrected; \"The pre-registered test\").")  # fmt: skip


def paired_table(results: dict, judges: list[str]) -> tuple[list[str], list[list[str]]] | None:
    """Each model against the base on the same prompts: how many verdicts flipped each way and the exact
    McNemar p-value per judge (prompts with the same verdict are ties: counted, not tested), and the cost
    sign test. "Measurably safer" means p < 0.05 here, not non-overlapping intervals."""
    rows = []
    for name, m in results["models"].items():
        for judge in judges:
            change = m.get("vs_base", {}).get(judge)
            if change:
                counts = [str(change[k]) if k in change else "" for k in ("safer", "less_safe", "ties")]
                rows.append([name, judge, *counts, format_p(change["p_value"])])
        cost = m.get("cost", {})
        if "sign_test_p" in cost:
            rows.append(
                [
                    name,
                    "cost (paired, lower)",
                    f"{cost['lower_cost_than_base']:.1%} of prompts",
                    "",
                    "",
                    format_p(cost["sign_test_p"]),
                ]
            )
    header = ["model", "judge", "safer than base on", "less safe on", "same verdict", "p (exact, two-sided)"]
    return (header, rows) if rows else None


#: What the reward-models table says about where its numbers come from.
REWARD_MODELS_NOTE = (
    "How well the run's own judges see, from the rm stage (rm/metrics.json): on eval.heldout_pairs (prompts of "
    "conversations no stage trains on) where the recipe has them, else on rm.eval_fraction of the training "
    "prompts. Sign accuracy: how often the cost model's verdict (cost > 0: unsafe) matches the human safety "
    "label. Wilson 95 % intervals."
)


def reward_models_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """The Helpful-RM's and the cost model's held-out accuracies with intervals (rm's metrics), if any."""
    metrics = results.get("reward_models")
    if not metrics:
        return None
    where = "eval.heldout_pairs" if "heldout_pairs" in metrics else "rm.eval_fraction"
    measured = metrics.get("heldout_pairs", metrics)

    def cell(value: float | None, interval: list[float] | None, n: int) -> str:
        if value is None:
            return "n/a"
        bounds = f" ({interval[0]:.1%}-{interval[1]:.1%})" if interval else ""
        return f"{value:.1%}{bounds}, n={n}"

    helpful, cost = measured["helpful"], measured["cost"]
    rows = [
        ["Helpful-RM", "pair accuracy", cell(helpful["pair_accuracy"], helpful.get("pair_interval"), helpful["pairs"]), where],
        ["cost model", "pair accuracy", cell(cost["pair_accuracy"], cost.get("pair_interval"), cost["pairs"]), where],
        ["cost model", "sign accuracy", cell(cost["sign_accuracy"], cost.get("sign_interval"), cost["responses"]), where],
    ]  # fmt: skip
    return ["model", "measure", "held out (95 % CI)", "data"], rows


#: What the group tests' section says before its tables.
GROUPS_NOTE = (
    "The claim-bearing test (eval.groups, eval.primary; safealign.eval.pairs): per held-out pair, the per-token "
    "margin (preferred minus dispreferred mean log-prob) moved from the base; a run's value is its mean over one "
    "source's pairs labelled for a dimension. The treatment's runs against each group's by Welch's t over runs "
    "(run-to-run spread is the variance): one-sided against the controls on the primary measure — the primary "
    "dimension's margins (higher wins), or the held-out Ĵ_C (lower wins) — as the primary family, two-sided "
    "otherwise (the secondary family); Holm within each family. Only the primary family decides "
    "the claim; every other p in this report (BeaverTails, McNemar, sign tests) is exploratory and uncorrected."
)

#: What the held-out Ĵ_C table says about its numbers.
POLICY_COST_NOTE = (
    "Ĵ_C on prompts no stage trained on (eval.heldout_cost_prompts): each model's sampled answers (align.cost_sampling) "
    "scored by the run's cost model at the length it was fitted at; mean cost with its 95 % t interval, the share "
    "of answers the cost model calls unsafe (cost > 0), the answers' share of distinct word 3-grams (1: no phrase "
    "repeats; a cost that falls as this share falls is the text looping, which the cost model can score as safe, "
    "not harmlessness), and whether the mean meets align.cost_threshold (d). With "
    "cost_threshold: initial, d here is the base's held-out Ĵ_C less align.cost_threshold_margin (\"no costlier "
    "than the base\", or cheaper than it by the margin), and each model's "
    "paired difference from the base is shown."
)


#: What the per-source held-out Ĵ_C table says.
BY_SOURCE_NOTE = (
    "The same costs by the file each prompt came from, with the paired difference from the base's in brackets: "
    "kinds of prompt need not move together (in one drift-pilot run PKU's cost rose while HH's fell), and align's "
    "Ĵ_C pool mixes them in the training data's proportions (or align.cost_sampling.sources'), not these."
)


def provenance_line(results: dict) -> str:
    """Where the report's numbers come from, in one line (empty for results from before it was recorded)."""
    p = results.get("provenance")
    if not p:
        return ""
    commit = f", commit {p['commit']}" if p.get("commit") else ""
    threshold = p.get("cost_threshold")
    lam = f"; aligned model's final λ {p['final_lambda']:.3g}" if isinstance(p.get("final_lambda"), (int, float)) else ""
    d = f", d = {threshold:g}" if isinstance(threshold, (int, float)) else ""
    return (f"Recipe {p['recipe']} (content sha256 {p['recipe_sha256']}), SafeAlign {p['safealign']}{commit}, "
            f"seed {p['seed']}, {p['dtype']}, {p['date']}{lam}{d}.")  # fmt: skip


def _fmt_number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def format_p(p: float | None) -> str:
    """Every p-value in the report in one format: three decimals, "< 0.001" below that, "n/a" when the
    test could not be run."""
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def group_tables(results: dict) -> tuple[str, list[tuple[list[str], list[list[str]]]]] | None:
    """The verdict line, the groups' run values (mean, 95 % CI, each run) and the comparisons, if any."""
    tests = results.get("group_tests")
    if not tests:
        return None
    measures = tests["measures"]

    def cell(entry: dict | None) -> str:
        if not entry:
            return ""
        interval = entry.get("ci95")
        bounds = f" ({interval[0]:+.4f} to {interval[1]:+.4f})" if interval else ""
        runs = ", ".join(f"{v:+.4f}" for v in entry["runs"].values())
        return f"{entry['mean']:+.4f}{bounds} [{runs}]"

    summary = (["group", *measures], [[g, *(cell(v.get(m)) for m in measures)] for g, v in tests["groups"].items()])
    comparisons = (
        ["treatment", "versus", "measure", "family", "difference", "t", "df", "p", "p (Holm)"],
        [[c["treatment"], c["versus"], c["measure"], c["family"] + (" (one-sided)" if c["alternative"] != "two-sided" else "")
          + (", paired by run" if c.get("paired") else ""),
          f"{c['difference']:+.4f}", _fmt_number(c["t"]), _fmt_number(c["df"], 2), format_p(c["p_value"]),
          format_p(c["p_holm"])] for c in tests["comparisons"]],
    )  # fmt: skip
    primary = tests.get("primary")
    verdict = ""
    if primary:
        verdict = (
            f"Primary test ({primary['tests']} tests, α = {primary['alpha']}): {primary['treatment']} against "
            f"{', '.join(primary['controls'])} on "
            + ("the held-out Ĵ_C (lower wins)" if primary.get("measure") == "heldout_cost" else primary["dimension"])
            + (f" · {', '.join(primary['sources'])}" if primary.get("sources") else "")
            + " — "
            + ("**holds** (every Holm-adjusted p below α)." if primary["holds"] else "**does not hold**.")
        )
    return verdict, [summary] + ([comparisons] if comparisons[1] else [])


def policy_cost_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """Every model's held-out Ĵ_C with its interval, if measured (and its paired difference from the
    base's when d is the base's own, `cost_threshold: initial`)."""
    paired = any("vs_base" in m.get("heldout_cost", {}) for m in results["models"].values())
    repetition = any("distinct_3grams" in m.get("heldout_cost", {}) for m in results["models"].values())
    rows = []
    for name, model in results["models"].items():
        cost = model.get("heldout_cost")
        if cost is None:
            continue
        interval = cost["ci95"]
        bounds = f" ({interval[0]:.3f} to {interval[1]:.3f})" if interval else ""
        meets = {True: "yes", False: "no"}.get(cost.get("meets_threshold"), "n/a")
        row = [name, f"{cost['mean']:.3f}{bounds}", str(cost["n"]), f"{cost['above_zero']:.1%}"]
        if repetition:
            row.append(_fmt_repetition(cost.get("distinct_3grams")))
        row.append(meets)
        if paired:
            diff = cost.get("vs_base")
            row.append("" if diff is None else f"{diff['mean']:+.3f} ({diff['ci95'][0]:+.3f} to {diff['ci95'][1]:+.3f})"
                       if diff["ci95"] else f"{diff['mean']:+.3f}")  # fmt: skip
        rows.append(row)
    if not rows:
        return None
    header = ["model", "held-out Ĵ_C (95 % CI)", "prompts", "cost > 0"] + (["distinct 3-grams"] if repetition else [])
    thresholds = {m["heldout_cost"].get("threshold") for m in results["models"].values() if "heldout_cost" in m}
    d = thresholds.pop() if len(thresholds) == 1 else None
    header.append(f"mean ≤ d ({d:.3f})" if isinstance(d, (int, float)) else "mean ≤ d")
    return header + (["minus the base's, paired (95 % CI)"] if paired else []), rows


def policy_cost_by_source_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """Every model's held-out Ĵ_C per source file, with its paired difference from the base's there —
    only when the prompts come from more than one file (one file's numbers are the table above)."""
    costs = {name: m["heldout_cost"]["by_source"] for name, m in results["models"].items()
             if "by_source" in m.get("heldout_cost", {})}  # fmt: skip
    sources = list(dict.fromkeys(source for entry in costs.values() for source in entry))
    if len(sources) < 2:
        return None

    def cell(entry: dict | None) -> str:
        if entry is None:
            return ""
        diff = entry.get("vs_base")
        return f"{entry['mean']:.3f}" + (f" ({diff['mean']:+.3f})" if diff else "")

    header = ["model", *(f"{source} (n {next(e[source]['n'] for e in costs.values() if source in e)})" for source in sources)]
    return header, [[name, *(cell(entry.get(source)) for source in sources)] for name, entry in costs.items()]


def _split_note(split: str) -> str:
    """Which part of the eval sets the numbers come from (eval.split), when not all of them."""
    halves = {"test": "first", "validation": "second"}
    return f" ({split} split: the {halves[split]} half of every category)" if split in halves else ""


def write_report(out_dir: Path, results: dict, training: dict[str, Path] | None = None) -> tuple[Path, Path]:
    """Write `report.md`, `report.html` and `plots/*.png` into `out_dir`; returns the two report paths.
    `training`: each trained policy's `metrics.jsonl` by model name (`StageRecord.policy_metrics`)."""
    judges = results["settings"]["judges"]
    primary = judges[0] if judges else None
    logs = {name: read_metrics(path) for name, path in (training or {}).items() if path.is_file()}
    plots = {
        "heldout": plot_heldout(results),
        "heldout_reward": plot_heldout_reward(results),
        "tradeoff": plot_tradeoff(results, primary) if primary else None,
        "categories": plot_categories(results, primary) if primary else None,
        "training": plot_training(logs.get("aligned", []), _threshold(results)),
        "dual": plot_dual_runs(logs, _threshold(results)),
    }
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    for name, image in plots.items():
        if image:
            (out_dir / "plots" / f"{name}.png").write_bytes(image)

    header, rows = _tables(results, judges)
    distilled = teacher_vs_student(results, judges)
    paired = paired_table(results, judges)
    cat_header, cat_rows = ["category"] + list(results["models"]), []
    if primary:
        categories = sorted(next(iter(results["models"].values()))["safety"][primary]["categories"])
        cat_rows = [
            [c] + [_fmt_rate(m["safety"][primary]["categories"][c]) for m in results["models"].values()]
            for c in categories
        ]
    agreement = [[pair, "n/a" if v is None else f"{v:.1%}"] for pair, v in results["judge_agreement"].items()]
    settings = results["settings"]
    intro = (
        f"{settings['beavertails_prompts']} BeaverTails-Evaluation prompts, {settings['mt_bench_questions']} MT-Bench "
        f"questions{_split_note(settings.get('split', 'all'))}; judges: {', '.join(judges) or 'none'}. Safety rates carry Wilson 95 % intervals. "
        f"Helpfulness without an LLM judge is a proxy: {settings['helpfulness_proxy']}."
        + (" Distinct 3-grams: the BeaverTails answers' share of word 3-grams that are not repeats (1: no phrase "
           "repeats) — a judge can call looping text safe, so read a safety gain beside it."
           if _shows_repetition(results) else "")
    )

    heldout = heldout_table(results)
    reward_models = reward_models_table(results)
    groups = group_tables(results)
    policy_cost = policy_cost_table(results)
    cost_by_source = policy_cost_by_source_table(results)
    dual_runs = dual_runs_table(logs, _threshold(results))
    origin = provenance_line(results)
    md = ["# SafeAlign evaluation report", "", *([f"*{origin}*", ""] if origin else []), intro, "",
          markdown_table(header, rows), ""]  # fmt: skip
    if groups:
        md += ["## The pre-registered test", "", GROUPS_NOTE, "", groups[0], ""]
        md += [line for table in groups[1] for line in (markdown_table(*table), "")]
    if policy_cost:
        md += ["## Held-out Ĵ_C", "", POLICY_COST_NOTE, "", markdown_table(*policy_cost), ""]
    if cost_by_source:
        md += [BY_SOURCE_NOTE, "", markdown_table(*cost_by_source), ""]
    if dual_runs:
        md += ["## The dual λ, run by run", "", DUAL_RUNS_NOTE, "", markdown_table(*dual_runs), ""]
    if reward_models:
        md += ["## The reward models' own accuracy", "", REWARD_MODELS_NOTE, "", markdown_table(*reward_models), ""]
    if heldout:
        md += ["## Held-out preference pairs", "", HELDOUT_NOTE, "", markdown_table(*heldout), ""]
    for name, title in PLOTS:
        if plots[name]:
            md += [f"## {title}", "", f"![{title}](plots/{name}.png)", ""]
    if paired:
        md += ["## Compared with the base, prompt by prompt", "", multiplicity_note(paired[1]), "",
               markdown_table(*paired), ""]  # fmt: skip
    if distilled:
        md += ["## Teacher vs student (distill)", "", markdown_table(*distilled), ""]
    if cat_rows:
        md += [f"## Per-category safety ({primary} judge)", "", markdown_table(cat_header, cat_rows), ""]
    if agreement:
        md += ["## Judge agreement", "", markdown_table(["judges", "agreement"], agreement), ""]
    if results["examples"]:
        md += ["## Where the models differ", ""]
        for ex in results["examples"]:
            md += [f"**{ex['category']}** — {ex['prompt']}", ""]
            md += [f"- *{name}* ({_verdict(ex, a)}): {a['text'][:300]}" for name, a in ex["answers"].items()]
            md.append("")
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md))

    images = "".join(
        f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="data:image/png;base64,{base64.b64encode(plots[name]).decode()}">'
        for name, title in PLOTS
        if plots[name]
    )
    examples = "".join(
        f"<div class='ex'><p><b>{html.escape(ex['category'])}</b> — {html.escape(ex['prompt'])}</p><ul>"
        + "".join(
            f"<li><i>{html.escape(n)}</i> ({html.escape(_verdict(ex, a))}): {html.escape(a['text'][:400])}</li>"
            for n, a in ex["answers"].items()
        )
        + "</ul></div>"
        for ex in results["examples"]
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>SafeAlign evaluation report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:14px}}
th{{background:#f3f3f3}}img{{max-width:100%}}.ex{{border-left:3px solid #ddd;padding-left:1em}}</style></head><body>
<h1>SafeAlign evaluation report</h1>{"<p class='origin'><i>" + html.escape(origin) + "</i></p>" if origin else ""}<p>{html.escape(intro)}</p>{_html_table(header, rows)}
{"<h2>The pre-registered test</h2><p>" + html.escape(GROUPS_NOTE) + "</p><p>" + html.escape(groups[0].replace("**", "")) + "</p>" + "".join(_html_table(*t) for t in groups[1]) if groups else ""}
{"<h2>Held-out Ĵ_C</h2><p>" + html.escape(POLICY_COST_NOTE) + "</p>" + _html_table(*policy_cost) if policy_cost else ""}
{"<p>" + html.escape(BY_SOURCE_NOTE) + "</p>" + _html_table(*cost_by_source) if cost_by_source else ""}
{"<h2>The dual λ, run by run</h2><p>" + html.escape(DUAL_RUNS_NOTE) + "</p>" + _html_table(*dual_runs) if dual_runs else ""}
{"<h2>The reward models' own accuracy</h2><p>" + html.escape(REWARD_MODELS_NOTE) + "</p>" + _html_table(*reward_models) if reward_models else ""}
{"<h2>Held-out preference pairs</h2><p>" + html.escape(HELDOUT_NOTE) + "</p>" + _html_table(*heldout) if heldout else ""}{images}
{"<h2>Compared with the base, prompt by prompt</h2><p>" + html.escape(multiplicity_note(paired[1])) + "</p>" + _html_table(*paired) if paired else ""}
{"<h2>Teacher vs student (distill)</h2>" + _html_table(*distilled) if distilled else ""}
{"<h2>Per-category safety (" + html.escape(primary) + " judge)</h2>" + _html_table(cat_header, cat_rows) if cat_rows else ""}
{"<h2>Judge agreement</h2>" + _html_table(["judges", "agreement"], agreement) if agreement else ""}
{"<h2>Where the models differ</h2>" + examples if examples else ""}</body></html>"""
    html_path = out_dir / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return md_path, html_path
