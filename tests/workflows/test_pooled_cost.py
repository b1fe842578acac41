"""The pooled cost model (safealign.models.pooled_value, workflows.pooled_cost): its pooling, its solved head, and
the rm stage, Ĵ_C and eval reading it. Tiny random models; the real model's numbers are
benchmarks/cost_probe.py's (docs/rm.md)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from support import HH, TINY_ALIGN, TINY_TRAINER, pku_rows, run_cli, tiny_policy, write_jsonl

from safealign.core.errors import SafeAlignError
from safealign.domain.cost_loss import (
    L2_GRID,
    SAFE,
    UNKNOWN,
    UNSAFE,
    cost_model_loss,
    cross_validated_l2,
    fit_linear_cost_head,
)
from safealign.models.pooled_value import PooledValueModel, read_spec, response_mask, truncated_backbone
from safealign.recipe import load_recipe


def test_the_response_mask_covers_the_real_tokens_after_the_prompt():
    attention = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    mask = response_mask(attention, [2, 3, 5])  # the last row's response was cut away: its last token stands in
    assert mask.int().tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]]


def test_the_solved_head_is_the_losss_minimum_and_applies_to_raw_features():
    """On features whose first coordinate says "unsafe" (+ noise, on another scale than the rest), the
    solved head classifies every labelled response, and its (w, b) — folded back from standardised
    features — sit at a stationary point of the objective on the raw features."""
    generator = torch.Generator().manual_seed(0)
    n, hidden = 64, 6
    unsafe_0 = torch.rand(n, generator=generator) < 0.5
    unsafe_1 = ~unsafe_0
    x0 = torch.randn(n, hidden, generator=generator) * 5 + 3
    x1 = torch.randn(n, hidden, generator=generator) * 5 + 3
    x0[:, 0] = torch.where(unsafe_0, 40.0, 10.0) + torch.randn(n, generator=generator)
    x1[:, 0] = torch.where(unsafe_1, 40.0, 10.0) + torch.randn(n, generator=generator)
    safer = torch.where(unsafe_0, 1, 0)
    safe_0 = torch.where(unsafe_0, UNSAFE, SAFE)
    safe_1 = torch.where(unsafe_1, UNSAFE, SAFE)
    safe_1[:8] = UNKNOWN  # some responses carry no sign: pairwise term only
    w, b = fit_linear_cost_head(x0, x1, safer, safe_0, safe_1, regularization=1e-3, l2=1e-3)
    c0, c1 = x0 @ w + b, x1 @ w + b
    _, stats = cost_model_loss(c0, c1, safer, safe_0, safe_1)
    assert stats["sign_acc"] == 1.0 and stats["pair_acc"] == 1.0 and stats["n_sign"] == 2 * n - 8
    # Stationary on raw features: the gradient of the same objective in standardised coordinates is 0.
    both = torch.cat([x0, x1]).double()
    mean, std = both.mean(0), both.std(0)
    ws = (w.double() * std).requires_grad_(True)
    bs = (b.double() + (mean * w.double()).sum()).requires_grad_(True)
    z0, z1 = (x0.double() - mean) / std, (x1.double() - mean) / std
    loss, _ = cost_model_loss(z0 @ ws + bs, z1 @ ws + bs, safer, safe_0, safe_1, 1e-3)
    (loss + 1e-3 * ws.square().sum()).backward()
    assert ws.grad.abs().max() < 1e-5 and bs.grad.abs() < 1e-5


def _synthetic(n: int, hidden: int, signal: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    unsafe_0 = torch.rand(n, generator=generator) < 0.5
    x0, x1 = torch.randn(n, hidden, generator=generator), torch.randn(n, hidden, generator=generator)
    x0[:, 0] += signal * torch.where(unsafe_0, 1.0, -1.0)
    x1[:, 0] += signal * torch.where(unsafe_0, -1.0, 1.0)
    return x0, x1, torch.where(unsafe_0, 1, 0), torch.where(unsafe_0, UNSAFE, SAFE), torch.where(unsafe_0, SAFE, UNSAFE)


def test_cross_validation_picks_a_strong_penalty_for_noise_and_a_weak_one_for_signal():
    """`l2: auto`: on features that carry nothing (40 pairs, 30 dimensions) every fit is overfitting and the
    largest penalty wins; on a strong signal in one coordinate (400 pairs) the smallest one does."""
    folds = torch.arange(40) % 5
    noise = _synthetic(40, 30, signal=0.0, seed=1)
    chosen, scores = cross_validated_l2(*noise, folds=folds)
    assert set(scores) == set(L2_GRID) and chosen == max(L2_GRID) == min(scores, key=scores.get)
    folds = torch.arange(400) % 5
    chosen, scores = cross_validated_l2(*_synthetic(400, 30, signal=3.0, seed=2), folds=folds)
    assert chosen == min(L2_GRID)


def test_a_backbone_cut_at_a_layer_pools_that_layers_normed_states(tmp_path, tokenizer_dir):
    """What the pooled model averages is layer L's output after the final norm, over the response only —
    the same as the full model's hidden_states[L] normed by hand."""
    from transformers import AutoModel

    from safealign.models.resolve import build_random
    from safealign.recipe import RandomModel

    base = build_random(RandomModel(tokenizer=str(tokenizer_dir), config={"hidden_size": 32, "intermediate_size": 64,
                                                                          "num_hidden_layers": 3}))  # fmt: skip
    full = AutoModel.from_pretrained(base, dtype=torch.float32).eval()
    cut = truncated_backbone(base, 2, torch.float32)
    assert cut.config.num_hidden_layers == 2 and len(cut.layers) == 2
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    model = PooledValueModel(cut, torch.nn.Linear(32, 1))
    with torch.no_grad():
        pooled = model.features(ids, mask, [2, 4])
        states = full.norm(full(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2])
    expected = torch.stack([states[0, 4:].mean(0), states[1, 4:].mean(0)])
    assert torch.allclose(pooled, expected, atol=1e-5)


@pytest.mark.parametrize(
    "cost, message",
    [
        ({"learning_rate": 1e-4}, "rm.cost: learning_rate: not used by head 'pooled'"),
        ({"trainable_layers": 2}, "rm.cost: trainable_layers: not used by head 'pooled'"),
        ({"head": "last_token", "layer": 3}, "rm.cost: layer: not used by head 'last_token'"),
    ],
)
def test_keys_of_the_other_head_are_refused(tmp_path, tokenizer_dir, cost, message):
    write_jsonl(tmp_path / "pku.jsonl", pku_rows(8))
    recipe = {"name": "x", "stages": ["rm"], "model": tiny_policy(tokenizer_dir), "data": {"train": [{"path": "pku.jsonl"}]},
              "rm": {"cost": cost}}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(SafeAlignError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_recipe(tmp_path / "recipe.yaml")


@pytest.mark.slow
def test_the_rm_stage_fits_a_pooled_cost_model_that_every_scorer_reads_alike(tmp_path, tokenizer_dir):
    """The rm stage (default `head: pooled`) fits the cost model on 24 PKU + 8 HH pairs, measures it on
    the held-out pairs of `eval.heldout_pairs` with intervals, and align's Ĵ_C and a reload score with it:
    the saved model gives back the stage's own costs."""
    rows = pku_rows(40)
    write_jsonl(tmp_path / "pku.jsonl", rows)
    write_jsonl(tmp_path / "hh.jsonl", [json.loads(line) for line in HH.read_text().splitlines()[:8]])
    recipe = {
        "name": "pooled",
        "stages": ["rm", "align"],
        "model": tiny_policy(tokenizer_dir),
        "data": {"train": [{"path": "pku.jsonl", "max_rows": 24}, {"path": "hh.jsonl", "format": "hh_rlhf",
                                                                    "dimension": "safe"}], "max_len": 512},
        "rm": {"helpful": TINY_TRAINER, "cost": {"layer": 1}, "eval_fraction": 0.0, "score_batch_size": 8},
        "align": TINY_ALIGN,
        "eval": {"heldout_pairs": [{"path": "pku.jsonl", "skip_rows": 24}]},
        "logging": {"tensorboard": False},
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run_cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rm_dir = tmp_path / "runs/pooled/rm"
    spec = read_spec(rm_dir / "cost/model")
    summary = json.loads((rm_dir / "stage.json").read_text())  # pairs too long for max_len are dropped
    fitted = 32 - summary["contradictory_safety_rows"] - summary["dropped_rows"]
    assert spec["layer"] == 1 and spec["max_len"] == 512 and spec["fit"]["pairs"] == fitted > 24
    metrics = json.loads((rm_dir / "metrics.json").read_text())
    held = metrics["heldout_pairs"]
    assert held["held_out_rows"] == 16 and held["cost"]["responses"] == 32 and held["cost"]["pairs"] == 16
    low, high = held["cost"]["sign_interval"]
    assert low <= held["cost"]["sign_accuracy"] <= high
    assert "on eval.heldout_pairs (16 pairs)" in result.stderr
    # A reload scores the training rows as the stage did (scored.jsonl holds the stage's costs).
    scored = [json.loads(line) for line in (rm_dir / "scored.jsonl").read_text().splitlines()]
    script = (
        "import json, sys\nfrom pathlib import Path\nfrom safealign.domain.data import load_sources\n"
        "from safealign.recipe import load_recipe\nfrom safealign.workflows.inference import score_with_value_model\n"
        "recipe = load_recipe('recipe.yaml')\nrows = load_sources(recipe.data.train)\n"
        "costs = score_with_value_model(recipe, Path('runs/pooled/rm/cost/model'), rows, Path('scratch'))\n"
        "print(json.dumps([costs[i] for i in sorted(costs)]))\n"
    )
    reload = run_cli_python(tmp_path, script)
    for row, (c0, c1) in zip(scored, reload, strict=True):
        assert (row["cost_0"], row["cost_1"]) == pytest.approx((c0, c1), abs=1e-5)
    # Ĵ_C was sampled with it (a pooled model under the align trainer's CostModel).
    samples = (tmp_path / "runs/pooled/align/lambda_samples.jsonl").read_text().splitlines()
    assert samples and all(json.loads(line)["new_tokens"] > 0 for line in samples)


def run_cli_python(cwd, script: str) -> list:
    import subprocess
    import sys

    from support import clean_env

    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("text", ["{not json", "[]", '{"max_len": "192", "dtype": "bf16"}', '{"max_len": 192, "dtype": "fp16"}'])
def test_a_damaged_pooled_model_spec_is_one_line(tmp_path, text):
    """`model.cost_model` may name any folder: its spec is checked, not trusted."""
    (tmp_path / "safealign_value_model.json").write_text(text)
    with pytest.raises(SafeAlignError, match=r"safealign_value_model\.json: .*(spec|readable)") as caught:
        read_spec(tmp_path)
    assert "\n" not in str(caught.value)
