"""RM-stage scoring (length-sorted vs file order) and eval generation (batched vs one by one) throughput.

    .venv/bin/python benchmarks/throughput.py                         # both parts, quickstart's settings
    .venv/bin/python benchmarks/throughput.py --part generation --rounds 1

Both run the stage's own code on a recipe's model, data and batch sizes (default: the quickstart's,
SmolLM2-135M on its 64 training pairs and its BeaverTails eval prompts), alternating the two arms round
by round so drift in the machine's speed hits both alike:

- scoring: `score_with_value_model` (how the rm stage scores every pair) with the policy as the value
  model (an untrained head: values do not change the cost), once with `scoring.length_order` and once
  with it swapped for file order. Timed: the `score_pairs` call (model loading left out). Also reported:
  the share of padding tokens in the forwards, which is what sorting removes.
- generation: `HFGenerator` (the eval stage's HF backend) greedy on the eval's BeaverTails prompts with
  `eval.batch_size` and with batch 1, the same loaded model. Reported: answers/s, new tokens/s, and how
  many answers the two arms agree on (greedy batched decoding equals one by one up to float rounding).

Results: benchmarks/results/throughput.json and the tables printed (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "recipes" / "quickstart.yaml"


def padding_share(items: list[tuple], order: list[int], batch_size: int) -> float:
    """The share of padding in the forwards' tokens: each batch pads both responses of every row to its
    longest sequence."""
    lengths = [(item[0].shape[-1], item[2].shape[-1]) for item in items]
    real = sum(a + b for a, b in lengths)
    padded = 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        padded += 2 * len(batch) * max(max(lengths[i]) for i in batch)
    return 1 - real / padded


def rates(runs: list[dict], *counts: str) -> dict:
    """The median seconds of an arm's rounds, and each count (the same every round) per median second."""
    seconds = statistics.median(r["seconds"] for r in runs)
    return {"median_seconds": seconds, **{f"{count}_per_s": runs[0][count] / seconds for count in counts}}


def measure_scoring(recipe, policy: Path, rows: list, scratch: Path, order) -> dict:
    """One pass of the rm stage's scoring with `order` in place of `scoring.length_order`: seconds in
    `score_pairs`, rows scored, padding share."""
    import safealign.openrlhf.scoring as scoring_module
    from safealign.workflows import inference

    sorted_order, score_pairs = scoring_module.length_order, inference.score_pairs
    measured: dict = {}

    def timed(dataset, forward, strategy, batch_size, description="scoring"):
        items = [dataset[i] for i in range(len(dataset))]
        measured["padding"] = padding_share(items, order(items), batch_size)
        started = time.perf_counter()
        out = score_pairs(dataset, forward, strategy, batch_size, description)
        measured["seconds"] = time.perf_counter() - started
        measured["rows"] = len(dataset)
        return out

    scoring_module.length_order, inference.score_pairs = order, timed
    try:
        inference.score_with_value_model(recipe, policy, rows, scratch)
    finally:
        scoring_module.length_order, inference.score_pairs = sorted_order, score_pairs
    return measured


def scoring(recipe, rounds: int) -> dict:
    """Rows/s of the rm stage's scoring, length-sorted vs file order."""
    from safealign.models.resolve import resolve_model
    from safealign.openrlhf.scoring import length_order
    from safealign.workflows.heldout import load_training_rows

    rows = load_training_rows(recipe)
    policy = resolve_model(recipe.model.policy)
    arms = {"length-sorted": length_order, "file order": lambda items: list(range(len(items)))}
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="bench-scoring-") as tmp:
        for round_ in range(rounds):
            for arm, order in arms.items():
                measured = measure_scoring(recipe, policy, rows, Path(tmp), order)
                results[arm].append(measured)
                rate = measured["rows"] / measured["seconds"]
                print(f"round {round_ + 1}: scoring {arm}: {rate:.2f} rows/s", flush=True)

    table = {arm: {"rows": runs[0]["rows"], **rates(runs, "rows"), "padding_share": runs[0]["padding"]}
             for arm, runs in results.items()}  # fmt: skip
    return {"batch_size": recipe.rm.score_batch_size, "max_len": recipe.data.max_len, "table": table, "runs": results}


def generation(recipe, rounds: int) -> dict:
    """Answers/s of the eval stage's HF generation, batched (eval.batch_size) vs one by one."""
    from safealign.domain.generation import GenerationRequest, GenerationStats, HFGenerator
    from safealign.models.resolve import resolve_model
    from safealign.openrlhf.settings import resolve_dtype
    from safealign.stages.evaluate import eval_prompts

    ev = recipe.eval
    prompts, _ = eval_prompts(recipe)
    requests = [GenerationRequest.single_turn(p.prompt, max_new_tokens=ev.max_new_tokens) for p in prompts]
    generator = HFGenerator.from_pretrained(
        resolve_model(recipe.model.policy),
        dtype=resolve_dtype(recipe.model.dtype),
        seed=recipe.seed,
        input_template=recipe.data.input_template,
    )
    arms = {f"batched ({ev.batch_size})": ev.batch_size, "one by one": 1}
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    answers: dict[str, list[str]] = {}
    for round_ in range(rounds):
        for arm, batch_size in arms.items():
            generator.batch_size, generator.stats = batch_size, GenerationStats(backend="hf")
            answers[arm] = generator.generate(requests)
            stats = generator.stats
            results[arm].append({"seconds": stats.seconds, "answers": stats.answers, "new_tokens": stats.new_tokens})
            print(f"round {round_ + 1}: generation {arm}: {stats.answers_per_second:.3f} answers/s", flush=True)

    table = {
        arm: {"answers": runs[0]["answers"], **rates(runs, "answers", "new_tokens")} for arm, runs in results.items()
    }
    batched, single = answers.values()
    return {
        "batch_size": ev.batch_size,
        "max_new_tokens": ev.max_new_tokens,
        "identical_answers": sum(a == b for a, b in zip(batched, single)),
        "table": table,
        "runs": results,
    }


def print_tables(result: dict) -> None:
    if "scoring" in result:
        s = result["scoring"]
        print(f"\nscoring: batch {s['batch_size']}, max_len {s['max_len']}")
        print("| order | rows | s (median) | rows/s | padding share |\n|---|---|---|---|---|")
        for arm, r in s["table"].items():
            print(
                f"| {arm} | {r['rows']} | {r['median_seconds']:.1f} | {r['rows_per_s']:.2f} | {r['padding_share']:.0%} |"
            )
    if "generation" in result:
        g = result["generation"]
        print(f"\ngeneration: greedy, {g['max_new_tokens']} new tokens at most; "
              f"identical answers {g['identical_answers']} of {next(iter(g['table'].values()))['answers']}")  # fmt: skip
        print("| arm | answers | s (median) | answers/s | new tokens/s |\n|---|---|---|---|---|")
        for arm, r in g["table"].items():
            print(f"| {arm} | {r['answers']} | {r['median_seconds']:.1f} | {r['answers_per_s']:.3f} | "
                  f"{r['new_tokens_per_s']:.1f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=QUICKSTART, help="model, data and batch sizes to measure on")
    parser.add_argument("--part", choices=("all", "scoring", "generation"), default="all")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two arms")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "throughput.json", help="results JSON")
    args = parser.parse_args()

    from safealign.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    result: dict = {"recipe": str(args.recipe), "rounds": args.rounds}
    if args.part in ("all", "scoring"):
        result["scoring"] = scoring(recipe, args.rounds)
    if args.part in ("all", "generation"):
        result["generation"] = generation(recipe, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)


if __name__ == "__main__":
    main()
