"""The shipped quickstart recipe end to end, shrunk by --set overrides to a tiny random model and a
handful of rows (the real one takes SmolLM2 ~20 minutes; docs/results.md has its numbers)."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

TINY_TRAINING = {"batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-3}


def test_quickstart_shrunk_to_a_tiny_model_runs_every_stage_and_reports(tmp_path, tokenizer_dir):
    policy = (
        f"{{random: {{tokenizer: {tokenizer_dir}, config: {{hidden_size: 32, intermediate_size: 64, "
        "num_hidden_layers: 2, tie_word_embeddings: false}}}"
    )
    overrides = [f"model.policy={policy}", "model.dtype=fp32", "data.train.0.max_rows=12", "data.train.1.max_rows=4",
                 "data.max_len=256", "distill.max_prompts=4", "distill.max_new_tokens=8", "eval.max_new_tokens=4",
                 "eval.beavertails_per_category=1", "eval.mt_bench_per_category=1", "logging.tensorboard=false",
                 "align.cost_sampling.prompts=4", "align.cost_sampling.max_new_tokens=4",
                 "eval.heldout_pairs.0.max_rows=6", "eval.heldout_pairs.1.max_rows=6"]  # fmt: skip
    for section in ("rm.helpful", "align", "distill.sft"):  # rm.cost is pooled: solved, no training keys
        overrides += [f"{section}.{key}={value}" for key, value in TINY_TRAINING.items()]
    overrides += ["rm.helpful.trainable_layers=1"]  # the tiny model has 2 layers
    args = ["run", str(ROOT / "recipes" / "quickstart.yaml"), "--run-dir", "runs/q"]
    result = run_cli(*args, *(item for o in overrides for item in ("--set", o)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "q"
    for stage in ("rm", "align", "distill", "eval"):
        assert (run / stage / "stage.json").is_file(), stage
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"base", "aligned", "student"}
    assert results["settings"]["judges"] == ["cost_model", "refusal"]
    held = results["reward_models"]["heldout_pairs"]["cost"]  # the pooled cost model, measured where it counts
    assert held["responses"] > 0 and held["sign_interval"][0] <= held["sign_accuracy"] <= held["sign_interval"][1]
    for model in results["models"].values():  # the held-out measure, on rows after the training ones
        assert {"helpful", "safe"} <= set(model["heldout"])
        assert 0 < model["heldout"]["helpful"]["likelihood"]["n"] <= 6  # PKU rows only
        assert model["heldout"]["helpful"]["likelihood"]["n"] < model["heldout"]["safe"]["likelihood"]["n"] <= 12
    page = (run / "eval" / "report.html").read_text()
    assert "Teacher vs student (distill)" in page and "Held-out preference pairs" in page
    assert page.count("data:image/png;base64,") == 5  # 2 held-out planes, trade-off, categories, training


def test_evidence_recipe_shrunk_to_a_tiny_model_runs_its_pre_registered_test(tmp_path, tokenizer_dir):
    """recipes/evidence.yaml as shipped (its data split, its 12 runs — 4 variants × 3 seeds — its groups,
    primary test and held-out Ĵ_C), with a tiny random model and a few rows on each side of every split:
    the structure CI can afford."""
    policy = (
        f"{{random: {{tokenizer: {tokenizer_dir}, config: {{hidden_size: 32, intermediate_size: 64, "
        "num_hidden_layers: 2, tie_word_embeddings: false}}}"
    )
    overrides = [f"model.policy={policy}", "model.dtype=fp32", "data.train.0.max_rows=12", "data.train.1.max_rows=12",
                 "data.max_len=256", "eval.max_new_tokens=4", "eval.beavertails_per_category=1",
                 "eval.mt_bench_per_category=1", "eval.heldout_pairs.0.skip_rows=200",
                 "eval.heldout_pairs.1.skip_rows=1500", "eval.heldout_pairs.1.max_rows=12", "eval.heldout_cost_prompts=4",
                 "align.cost_sampling.prompts=4", "align.cost_sampling.max_new_tokens=4", "align.lambda_update_every=1",
                 "align.max_pairs=8", "rm.helpful.trainable_layers=1", "rm.eval_fraction=0.0"]  # fmt: skip
    for section in ("rm.helpful", "align"):  # rm.cost is pooled: solved, no training keys
        overrides += [f"{section}.{key}={value}" for key, value in TINY_TRAINING.items()]
    args = ["run", str(ROOT / "recipes" / "evidence.yaml"), "--run-dir", "runs/e"]
    result = run_cli(*args, *(item for o in overrides for item in ("--set", o)), cwd=tmp_path, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "runs" / "e" / "eval" / "results.json").read_text())
    align = json.loads((tmp_path / "runs/e/align/stage.json").read_text())
    runs = {"aligned", *align["ablations"]}
    assert len(runs) == 12 and set(results["models"]) == {"base", *runs}
    # every run trains on one common subset of at most 8 pairs (fewer if a prompt fills max_len)
    assert {s["train_pairs"] for s in align["ablations"].values()} == {align["train_pairs"]} and align["train_pairs"] <= 8
    assert all(0 < m["heldout_cost"]["n"] <= 4 for m in results["models"].values())
    tests = results["group_tests"]
    assert set(tests["groups"]) == {"safe_mm_dpo", "flipped", "shuffled", "fixed_lambda"}
    assert tests["primary"]["tests"] == 4  # 2 controls × 2 held-out sources (HH-RLHF, PKU-SafeRLHF)
    assert all(len(g["safe · harmless-base-test.jsonl.gz"]["runs"]) == 3 for g in tests["groups"].values())
    page = (tmp_path / "runs" / "e" / "eval" / "report.html").read_text()
    assert "The pre-registered test" in page and "Held-out Ĵ_C" in page
