"""What one λ update costs: the policy answers the Ĵ_C prompt pool and the cost model scores the answers.

    .venv/bin/python benchmarks/cost_sampling.py RUN_DIR [--recipe recipes/quickstart.yaml] [--updates 3]

RUN_DIR must hold a finished rm stage (its `rm/cost/model` is the scorer). The policy, the data, the pool
and `align.cost_sampling` come from the recipe (default: the quickstart's: SmolLM2-135M, 8 prompts, 48
new tokens, batch 8). The align trainer's own objects run (`CostModel`, `PolicyCostSampler`), on the
untrained policy, in one fresh process. Measured:

- host memory the cost model adds, resident between updates: VmRSS before loading it and after it has
  scored once (its weights are mapped lazily), beside the size of its weights;
- per update (median of `--updates`): seconds generating, seconds scoring, new tokens and tokens/s.

Results: benchmarks/results/cost_sampling.json and a table (docs/algorithm.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "recipes" / "quickstart.yaml"


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident (or, with VmHWM, peak resident) memory in MiB, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(run_dir: Path, recipe_path: Path, updates: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from safealign.domain.data import hold_out_prompts
    from safealign.models.resolve import resolve_model
    from safealign.openrlhf import engine
    from safealign.openrlhf.settings import build_settings
    from safealign.recipe import load_recipe
    from safealign.stages import finished_stage
    from safealign.trainers.cost_sampling import CostModel, PolicyCostSampler
    from safealign.workflows.rows import training_rows

    recipe = load_recipe(recipe_path)
    settings = recipe.align.cost_sampling
    with tempfile.TemporaryDirectory() as scratch:
        policy_dir = resolve_model(recipe.model.policy)
        args = build_settings(recipe, recipe.align, Path(scratch), "dpo", model_dir=policy_dir)
        strategy = engine.make_strategy(args)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.ds.param_dtype]
        policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=dtype)
        tokenizer = engine.load_tokenizer(policy_dir, policy, strategy)
        rm = finished_stage(run_dir, "rm")
        # The pool as align draws it: from the rm stage's scored rows (those that fit data.max_len).
        pool, _ = hold_out_prompts(training_rows(recipe, rm.output("scored")), settings.prompts, recipe.seed)

        # Safetensors are mapped lazily: the weights count once a forward has touched them, so the cost
        # model is measured after loading it and scoring the pool once (weights + scoring activations).
        before = rss_mib()
        cost_dir = Path(recipe.model.cost_model) if recipe.model.cost_model else rm.output("cost_model")
        cost_model = CostModel(cost_dir, recipe, args, strategy)
        cost_model.score(pool, ["I cannot help with that."] * len(pool), settings.batch_size)
        cost_model_mib = rss_mib() - before
        weights_mib = sum(p.numel() * p.element_size() for p in cost_model.model.parameters()) / 2**20
        sampler = PolicyCostSampler(pool, cost_model, recipe, tokenizer, strategy, Path(scratch) / "samples.jsonl")
        unwrapped = SimpleNamespace(module=policy)  # the sampler takes an engine; a plain model has nothing to gather

        rounds = []
        for update in range(updates):
            started = time.perf_counter()
            answers, new_tokens = sampler.answer(unwrapped, update)
            generated = time.perf_counter()
            costs = cost_model.score(pool, answers, settings.batch_size)
            scored = time.perf_counter()
            rounds.append(
                {
                    "generate_seconds": generated - started,
                    "score_seconds": scored - generated,
                    "new_tokens": new_tokens,
                    "mean_cost": sum(costs) / len(costs),
                }
            )
    median = {key: statistics.median(r[key] for r in rounds) for key in ("generate_seconds", "score_seconds")}
    return {
        "recipe": str(recipe_path.relative_to(HERE.parent)) if recipe_path.is_relative_to(HERE.parent) else str(recipe_path),
        "dtype": args.ds.param_dtype,
        "threads": torch.get_num_threads(),
        "pool_prompts": len(pool),
        "max_new_tokens": settings.max_new_tokens,
        "batch_size": settings.batch_size,
        "cost_model_host_mib": round(cost_model_mib, 1),
        "cost_model_weights_mib": round(weights_mib, 1),
        "cost_model_parameters": sum(p.numel() for p in cost_model.model.parameters()),
        "peak_rss_mib": round(rss_mib("VmHWM"), 1),
        "median_generate_seconds": round(median["generate_seconds"], 2),
        "median_score_seconds": round(median["score_seconds"], 2),
        "median_update_seconds": round(median["generate_seconds"] + median["score_seconds"], 2),
        "new_tokens_per_s": round(
            statistics.median(r["new_tokens"] / r["generate_seconds"] for r in rounds), 1
        ),
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory with a finished rm stage")
    parser.add_argument("--recipe", type=Path, default=QUICKSTART)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cost_sampling.json")
    options = parser.parse_args()
    result = measure(options.run_dir, options.recipe.resolve(), options.updates)
    options.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| pool | new tokens | cost model in host memory (weights) | generate s | score s | update s | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {result['pool_prompts']} prompts | ≤ {result['max_new_tokens']} | {result['cost_model_host_mib']} MiB "
        f"({result['cost_model_weights_mib']} MiB) "
        f"| {result['median_generate_seconds']} | {result['median_score_seconds']} "
        f"| {result['median_update_seconds']} | {result['new_tokens_per_s']} |"
    )


if __name__ == "__main__":
    main()
