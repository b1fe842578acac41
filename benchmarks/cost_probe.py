"""Which layer a pooled cost model should read, and how well it then sees (docs/rm.md).

    .venv/bin/python benchmarks/cost_probe.py [--recipe recipes/evidence.yaml] [--l2 1e-3 1e-2 1e-1]

The recipe's policy reads every response of its training pairs and of `eval.heldout_pairs` once, keeping
each decoder layer's mean over the response tokens (what `safealign.models.pooled_value` computes at that layer:
the hidden states after the model's final norm). For every layer and ridge penalty the head is solved on
the training pairs exactly as the rm stage solves it (`cost_loss.fit_linear_cost_head`, Safe RLHF's loss:
pairwise + safety-sign terms), then measured on the held-out pairs: safety-sign accuracy on the labelled
responses (PKU-SafeRLHF's `is_response_*_safe`) with its Wilson interval, and pairwise accuracy. Nothing
here is tuned on the held-out pairs by the stage: this script is how the default layer was chosen.

Results: benchmarks/results/cost_probe.json and a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVIDENCE = HERE.parent / "recipes" / "evidence.yaml"


def layer_features(model, dataset, strategy, batch_size: int):
    """`[N, 2, layers, hidden]`: every layer's response-mean state for both responses of each pair."""
    import torch

    from safealign.models.pooled_value import response_mask
    from safealign.openrlhf.scoring import score_pairs

    norm = model.norm

    def pooled(ids, mask, prompt_lens):
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        # hidden_states[l] is layer l's output before the final norm, except the last (already normed);
        # a backbone cut at layer l (pooled_value.truncated_backbone) applies the norm to it.
        normed = [norm(s) for s in states[1:-1]] + [states[-1]]
        keep = response_mask(mask, prompt_lens).unsqueeze(-1).float()
        return torch.stack([(s.float() * keep).sum(1) / keep.sum(1) for s in normed], dim=1)

    def forward(batch):
        ids_0, mask_0, ids_1, mask_1, extras = batch
        return pooled(ids_0, mask_0, extras.prompt_lens), pooled(ids_1, mask_1, extras.prompt_lens)

    return score_pairs(dataset, forward, strategy, batch_size, "reading responses")


def measure(recipe_path: Path, l2s: list[float]) -> dict:
    import torch
    from transformers import AutoModel

    from safealign.domain.cost_loss import cost_model_loss, cross_validated_l2, fit_linear_cost_head
    from safealign.domain.data import prompt_folds
    from safealign.eval.statistics import wilson_interval
    from safealign.models.pooled_value import TORCH_DTYPES
    from safealign.models.resolve import resolve_model
    from safealign.openrlhf import engine
    from safealign.openrlhf.pair_dataset import PreferencePairDataset
    from safealign.openrlhf.settings import build_settings
    from safealign.recipe import load_recipe
    from safealign.stages.rm import is_contradictory
    from safealign.workflows.heldout import heldout_rows, load_training_rows
    from safealign.workflows.pooled_cost import CV_FOLDS, default_layer, label_tensors

    recipe = load_recipe(recipe_path)
    train_rows = [r for r in load_training_rows(recipe) if r.safer_response_id >= 0 and not is_contradictory(r)]
    test_rows = [r for r in heldout_rows(recipe, load_training_rows(recipe)) if r.safer_response_id >= 0]
    base = resolve_model(recipe.model.policy)
    with tempfile.TemporaryDirectory() as scratch:
        args = build_settings(recipe, recipe.rm.cost, Path(scratch), "rm", model_dir=base)
        strategy = engine.make_strategy(args)
        model = AutoModel.from_pretrained(base, dtype=TORCH_DTYPES[args.ds.param_dtype]).eval().requires_grad_(False)
        tokenizer = engine.load_tokenizer(base, model, strategy, padding_side="left")
        data = {}
        started = time.perf_counter()
        for name, rows in (("train", train_rows), ("test", test_rows)):
            dataset = PreferencePairDataset(rows, tokenizer, recipe.data.max_len, strategy, recipe.data.input_template,
                                            for_reward_model=True)  # fmt: skip
            with torch.no_grad():
                data[name] = (layer_features(model, dataset, strategy, recipe.rm.score_batch_size), label_tensors(dataset))
            data[f"{name}_rows"] = [e["row_index"] for e in dataset.extras]
        read_seconds = time.perf_counter() - started

    results = []
    train_x, (safer, safe_0, safe_1) = data["train"]
    test_x, (t_safer, t_safe_0, t_safe_1) = data["test"]
    for layer in range(train_x.shape[2]):
        for l2 in l2s:
            w, b = fit_linear_cost_head(train_x[:, 0, layer], train_x[:, 1, layer], safer, safe_0, safe_1,
                                        recipe.rm.cost.regularization, l2)  # fmt: skip
            costs = test_x[:, :, layer].float() @ w + b
            _, stats = cost_model_loss(costs[:, 0], costs[:, 1], t_safer, t_safe_0, t_safe_1)
            n_sign = int(stats["n_sign"])
            right = round(stats["sign_acc"] * n_sign)
            results.append({"layer": layer + 1, "l2": l2, "sign_accuracy": round(stats["sign_acc"], 4),
                            "sign_interval": [round(x, 4) for x in wilson_interval(right, n_sign)],
                            "responses": n_sign, "pair_accuracy": round(stats["pair_acc"], 4),
                            "pairs": len(t_safer)})  # fmt: skip
    # What the rm stage does by default: the 2/3-depth layer, the penalty chosen by cross-validation on the
    # training pairs alone; then measured once on the held-out pairs.
    layer = default_layer(train_x.shape[2]) - 1
    item_rows = [train_rows[i] for i in data["train_rows"]]
    folds = torch.tensor(prompt_folds(item_rows, CV_FOLDS, recipe.seed))
    l2, cv = cross_validated_l2(train_x[:, 0, layer], train_x[:, 1, layer], safer, safe_0, safe_1, folds,
                                recipe.rm.cost.regularization)  # fmt: skip
    default = next(r for r in results if r["layer"] == layer + 1 and r["l2"] == l2) if l2 in l2s else None
    return {
        "default": {"layer": layer + 1, "l2": l2, "cv_loss": {str(k): round(v, 5) for k, v in cv.items()},
                    "held_out": default},
        "recipe": str(recipe_path.relative_to(HERE.parent)) if recipe_path.is_relative_to(HERE.parent) else str(recipe_path),
        "model": str(recipe.model.policy),
        "dtype": args.ds.param_dtype,
        "max_len": recipe.data.max_len,
        "train_pairs": len(train_x),
        "train_labelled_responses": int(((safe_0 >= 0).sum() + (safe_1 >= 0).sum()).item()),
        "read_seconds": round(read_seconds, 1),
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=EVIDENCE)
    parser.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cost_probe.json")
    options = parser.parse_args()
    result = measure(options.recipe.resolve(), options.l2)
    options.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['train_pairs']} training pairs ({result['train_labelled_responses']} labelled responses), "
          f"responses read in {result['read_seconds']} s")  # fmt: skip
    d = result["default"]
    print(f"default (layer {d['layer']} = 2/3 of the depth, l2 {d['l2']:g} by cross-validation on the training pairs): "
          f"{d['held_out']}")  # fmt: skip
    print("| layer | l2 | held-out sign accuracy (95 % CI) | responses | held-out pair accuracy | pairs |")
    print("|---|---|---|---|---|---|")
    for r in result["results"]:
        low, high = r["sign_interval"]
        print(f"| {r['layer']} | {r['l2']:g} | {r['sign_accuracy']:.3f} ({low:.3f}-{high:.3f}) | {r['responses']} | "
              f"{r['pair_accuracy']:.3f} | {r['pairs']} |")  # fmt: skip


if __name__ == "__main__":
    main()
