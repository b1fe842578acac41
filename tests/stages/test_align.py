"""Training through SafeMMDPOTrainer + DeepspeedStrategy on CPU with tiny random Llamas.

Each run is a fresh `safealign run` process (DeepSpeed keeps one process group per process).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from support import (
    TINY_COST_SAMPLING,
    TINY_TRAINER,
    build_tokenizer,
    kill_when,
    run_cli,
    tiny_recipe,
    torchrun_cli,
    train_steps,
    write_jsonl,
)

pytestmark = pytest.mark.slow


def run_ok(tmp_path: Path, recipe: Path, *args: str, run_dir: str = "runs/tiny") -> dict:
    result = run_cli("run", str(recipe), "--run-dir", run_dir, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / run_dir / "align" / "stage.json").read_text())


def response_logps(model_dir: Path, tokenizer_dir: Path, rows: list[dict], max_len: int) -> torch.Tensor:
    """Σ log π(response tokens | prompt) for both responses of each row, computed independently of
    the trainer with plain transformers: shape [rows, 2]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = torch.zeros(len(rows), 2)
    for i, row in enumerate(rows):
        user = [{"role": "user", "content": row["prompt"]}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        for j in (0, 1):
            text = tokenizer.apply_chat_template(
                user + [{"role": "assistant", "content": row[f"response_{j}"]}], tokenize=False
            )
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:max_len]])
            with torch.no_grad():
                logps = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            out[i, j] = logps[prompt_len - 1 :].sum()
    return out


def test_safe_mm_dpo_learns_the_safer_response_and_lambda_follows_costs(tmp_path, tokenizer_dir, scored_rows):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, scored_rows, align={"epochs": 4, "lambda_lr": 0.5})
    summary = run_ok(tmp_path, recipe)
    assert summary["loss"] == "safe_mm_dpo" and summary["reference_logps"] == "model"
    steps = train_steps(tmp_path / "runs/tiny")
    assert len(steps) == summary["steps"] >= 16

    # The harmless loss falls.
    first, last = steps[:3], steps[-3:]
    assert sum(s["loss_s"] for s in last) / 3 < sum(s["loss_s"] for s in first) / 3 - 0.05

    # λ moves the way the cost estimate says, every step: up while Ĵ_C > threshold (0), down below it.
    for s in steps:
        assert math.copysign(1, s["lambda_next"] - s["lambda"]) == math.copysign(1, s["cost_estimate"]), s
    assert len({round(s["lambda"], 6) for s in steps}) > 1

    # Independently of the trainer: the safer response's log-ratio (policy vs reference) rises.
    rows = [json.loads(line) for line in scored_rows.read_text().splitlines()]
    base_dir = Path(json.loads((tmp_path / "runs/tiny/align/stage.json").read_text())["policy_dir"])
    before = response_logps(base_dir, tokenizer_dir, rows, 128)
    after = response_logps(tmp_path / "runs/tiny/align/model", tokenizer_dir, rows, 128)
    safer = torch.tensor([r["safer_response_id"] for r in rows])
    ratio = after - before  # log πθ − log πref per response
    safer_minus_other = ratio.gather(1, safer[:, None])[:, 0] - ratio.gather(1, 1 - safer[:, None])[:, 0]
    assert safer_minus_other.mean() > 0.5, safer_minus_other


@pytest.mark.parametrize("threshold, direction", [(-2.0, +1), (2.0, -1)])
def test_lambda_follows_the_policys_sampled_cost_against_the_threshold(
    tmp_path, tokenizer_dir, scored_rows, threshold, direction
):
    """A real trajectory: every step the policy answers the held-out pool, the cost model scores the
    answers, and λ moves by their mean against the threshold (the random cost model's costs lie in
    (−1, 1): a threshold of −2 is always violated, +2 never)."""
    recipe = tiny_recipe(
        tmp_path, tokenizer_dir, scored_rows, align={"cost_threshold": threshold, "lambda_lr": 0.03, "epochs": 2}
    )
    summary = run_ok(tmp_path, recipe)
    assert summary["cost_estimator"] == "sampled" and summary["cost_pool_prompts"] == 4
    steps = train_steps(tmp_path / "runs/tiny")
    lambdas = [s["lambda_next"] for s in steps]
    assert all((b - a) * direction > 0 for a, b in zip([1.0] + lambdas, lambdas))
    assert summary["final_lambda"] == pytest.approx(lambdas[-1])
    # The harmless term's share of the objective, λ/(1+λ), moves with λ: the constraint acts on the loss.
    shares = [s["lambda"] / (1 + s["lambda"]) for s in steps]
    assert (shares[-1] - shares[0]) * direction > 0
    for s in steps:
        assert -1 < s["cost_sampled"] < 1 and s["cost_estimate"] == s["cost_sampled"]  # window 1
        assert s["cost_above_threshold"] == (1.0 if direction > 0 else 0.0)
        # logged loss = the formula on the logged terms (dual-labelled PKU rows: both terms present)
        assert s["loss"] == pytest.approx(
            s["loss_h"] / (1 + s["lambda"]) + s["lambda"] * s["loss_s"] / (1 + s["lambda"]), abs=1e-6
        )

    # What λ reacted to is on disk: per update, the same first prompts' answers and their costs.
    samples = [json.loads(line) for line in (tmp_path / "runs/tiny/align/lambda_samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [s["step"] for s in steps]
    assert [r["cost_mean"] for r in samples] == pytest.approx([s["cost_sampled"] for s in steps])
    assert all(len(r["answers"]) == 2 and r["new_tokens"] > 0 for r in samples)
    assert len({r["answers"][0]["prompt"] for r in samples}) == 1  # a fixed pool
    # The pool's prompts were held out: no training row uses them.
    pool = {a["prompt"] for a in samples[0]["answers"]}
    prompts = [json.loads(line)["prompt"] for line in scored_rows.read_text().splitlines()]
    assert pool <= set(prompts) and len(set(prompts)) == len(prompts)
    assert summary["train_pairs"] + summary["dropped_pairs"] == len(prompts) - 4


def test_an_initial_threshold_is_the_policys_own_cost_before_training(tmp_path, tokenizer_dir, scored_rows):
    """align.cost_threshold: initial: the pool is answered and scored once before the first step (step 0
    of lambda_samples.jsonl), that Ĵ_C less `cost_threshold_margin` becomes d, and every dual step moves λ
    by Ĵ_C − d; stage.json records d (the checkpoint carries it in λ's state, tests/domain/test_lagrange.py:
    a resumed run must not re-measure it on a trained policy)."""
    lr, margin = 0.5, 0.3
    align = {"cost_threshold": "initial", "cost_threshold_margin": margin, "lambda_lr": lr}
    summary = run_ok(tmp_path, tiny_recipe(tmp_path, tokenizer_dir, scored_rows, align=align))
    samples = [json.loads(line) for line in (tmp_path / "runs/tiny/align/lambda_samples.jsonl").read_text().splitlines()]
    steps = train_steps(tmp_path / "runs/tiny")
    assert [r["step"] for r in samples] == [0] + [s["step"] for s in steps]
    threshold = samples[0]["cost_mean"] - margin
    assert summary["cost_threshold"] == pytest.approx(threshold)
    log_lambda = 0.0  # λ_init 1
    for s in steps:
        assert s["cost_threshold"] == pytest.approx(threshold)  # every update row names the run's own d
        log_lambda += lr * (s["cost_sampled"] - threshold) * math.exp(log_lambda)
        assert s["lambda_next"] == pytest.approx(math.exp(log_lambda), rel=1e-6)
    assert len({round(s["cost_sampled"] - threshold, 9) for s in steps}) > 1  # d is not the later estimates'


@pytest.mark.parametrize("lr, warned", [(1e-3, True), (5.0, False)])
def test_a_lambda_lr_too_small_for_the_cost_models_scale_is_named(tmp_path, tokenizer_dir, scored_rows, lr, warned):
    """Before λ's first step the run says whether λ_lr lets λ move at all on the cost model's scale: a
    violation of one standard deviation σ of the pool's answer costs, held for every update, must move λ by
    a quarter. At λ_lr 1e-3 it does not — named, with the λ_lr that doubles λ per update at that violation
    (ln 2 / (σ·λ_init)) —; at 5 it does, and nothing is said. Every pool cost is logged, so σ is checked by hand."""
    sampling = {**TINY_COST_SAMPLING, "logged_answers": TINY_COST_SAMPLING["prompts"]}
    align = {"lambda_lr": lr, "epochs": 2, "cost_sampling": sampling}
    result = run_cli("run", str(tiny_recipe(tmp_path, tokenizer_dir, scored_rows, align=align)), "--run-dir",
                     "runs/tiny", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads((tmp_path / "runs/tiny/align/lambda_samples.jsonl").read_text().splitlines()[0])
    costs = [a["cost"] for a in first["answers"]]
    sigma, updates = statistics.pstdev(costs), len(train_steps(tmp_path / "runs/tiny"))  # an update per step
    assert len(costs) == 4 and sigma > 0.01  # the random cost model spreads its costs
    said = f"standard deviation of the pool's answer costs ({sigma:.3g}), held for all {updates} updates, moves λ by ×"
    assert result.stderr.count(said) == int(warned) and result.stderr.count("λ barely moves") == int(warned)
    if warned:
        assert f"×{math.exp(updates * lr * sigma):.3g}; align.lambda_lr ≈ {math.log(2) / sigma:.2g} would double" in result.stderr


def test_a_fixed_lambda_run_can_watch_its_pool_without_moving_lambda(tmp_path, tokenizer_dir, scored_rows):
    """`cost_sampling.in_fixed_runs`: a fixed-λ run samples and logs Ĵ_C against its own d like a dual run
    (so a report can say whether fixed λ reached d), and λ stays at lambda_init through violations of
    either sign; without it a fixed run samples nothing (λ's update is then never computed)."""
    align = {"lambda_update": "fixed", "lambda_init": 2.0, "lambda_lr": 5.0, "cost_threshold": "initial",
             "cost_threshold_margin": 0.3, "cost_sampling": {**TINY_COST_SAMPLING, "in_fixed_runs": True}}  # fmt: skip
    summary = run_ok(tmp_path, tiny_recipe(tmp_path, tokenizer_dir, scored_rows, align=align))
    samples = [json.loads(line) for line in (tmp_path / "runs/tiny/align/lambda_samples.jsonl").read_text().splitlines()]
    steps = train_steps(tmp_path / "runs/tiny")
    assert [r["step"] for r in samples] == [0] + [s["step"] for s in steps] and len(steps) >= 2
    threshold = samples[0]["cost_mean"] - 0.3
    assert summary["cost_threshold"] == pytest.approx(threshold) and summary["final_lambda"] == 2.0
    for s in steps:  # Ĵ_C ≠ d at every update: a dual step at lr 5 would have moved λ each time
        assert abs(s["cost_sampled"] - threshold) > 1e-6 and s["lambda"] == s["lambda_next"] == 2.0
        assert s["cost_threshold"] == pytest.approx(threshold)

    unwatched = {**align, "cost_sampling": {**TINY_COST_SAMPLING, "in_fixed_runs": False}}
    run_ok(tmp_path, tiny_recipe(tmp_path, tokenizer_dir, scored_rows, align=unwatched), run_dir="runs/plain")
    assert not (tmp_path / "runs/plain/align/lambda_samples.jsonl").exists()
    assert all("cost_sampled" not in s for s in train_steps(tmp_path / "runs/plain"))


@pytest.mark.parametrize("common", [True, False])
def test_common_random_numbers_make_an_unchanged_policys_estimates_equal_its_threshold(
    tmp_path, tokenizer_dir, scored_rows, common
):
    """With a learning rate too small to change an fp32 weight, the policy is the same at every update:
    on the common random stream it answers exactly as at the calibration (Ĵ_C − d = 0, λ stays put);
    drawn afresh per update, the same policy's estimates scatter around d."""
    sampling = {**TINY_COST_SAMPLING, "common_random_numbers": common, "prompts": 4, "max_new_tokens": 12}
    align = {"cost_threshold": "initial", "lambda_lr": 0.5, "learning_rate": 1e-12, "cost_sampling": sampling}
    run_ok(tmp_path, tiny_recipe(tmp_path, tokenizer_dir, scored_rows, align=align))
    samples = [json.loads(line) for line in (tmp_path / "runs/tiny/align/lambda_samples.jsonl").read_text().splitlines()]
    calibration, updates = samples[0], samples[1:]
    assert calibration["step"] == 0 and len(updates) >= 3
    same = [u["answers"] == calibration["answers"] and u["cost_mean"] == calibration["cost_mean"] for u in updates]
    if common:
        assert all(same) and all(u["lambda_next"] == 1.0 for u in updates)
    else:
        assert not any(same)


#: name -> (align overrides, the statistic the loss must equal; None: the fixed-λ mix)
ABLATIONS = {
    "dpo_helpful": ({"loss": "dpo", "dimension": "helpful"}, "loss_h"),
    "mm_dpo_safe": ({"loss": "mm_dpo", "dimension": "safe"}, "loss_s"),
    "fixed_lambda": ({"lambda_update": "fixed", "lambda_init": 2.0}, None),
}


def test_ablations_train_beside_the_policy_through_the_same_trainer_and_are_evaluated(
    tmp_path, tokenizer_dir, scored_rows
):
    recipe = tiny_recipe(
        tmp_path, tokenizer_dir, scored_rows, stages=["align", "eval"],
        align={"ablations": {name: overrides for name, (overrides, _) in ABLATIONS.items()}},
        eval={"beavertails_per_category": 1, "mt_bench_per_category": 1, "max_new_tokens": 4, "judges": ["refusal"]},
    )  # fmt: skip
    result = run_cli("run", str(recipe), "--run-dir", "runs/tiny", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/tiny/align/stage.json").read_text())
    assert summary["loss"] == "safe_mm_dpo"
    # the log names what each variant trains: λ only where its loss has one
    assert "align: ablation dpo_helpful (loss dpo, labels given, seed 42)" in result.stderr
    assert "align: ablation fixed_lambda (loss safe_mm_dpo, λ fixed, labels given, seed 42)" in result.stderr
    align_dir = tmp_path / "runs/tiny/align"
    for name, (overrides, trained) in ABLATIONS.items():
        assert summary["ablations"][name]["loss"] == overrides.get("loss", "safe_mm_dpo")
        lines = (align_dir / "ablations" / name / "metrics.jsonl").read_text().splitlines()
        steps = [m for m in map(json.loads, lines) if "loss" in m]
        assert len(steps) == summary["ablations"][name]["steps"] == summary["steps"]
        for step in steps:
            if trained:
                assert step["loss"] == pytest.approx(step[trained], abs=1e-6)
            else:  # fixed λ = 2: L = L_H/3 + 2·L_S/3, and λ never moves
                assert step["lambda"] == step["lambda_next"] == 2.0
                assert step["loss"] == pytest.approx(step["loss_h"] / 3 + 2 * step["loss_s"] / 3, abs=1e-5)
            assert "cost_estimate" not in step  # nothing samples where λ is not updated
        # Every variant trains on the same pairs as the method: the Ĵ_C pool is held out for all.
        assert summary["ablations"][name]["train_pairs"] == summary["train_pairs"]
    assert all(math.isfinite(s["cost_estimate"]) for s in train_steps(tmp_path / "runs/tiny"))
    results = json.loads((tmp_path / "runs/tiny/eval/results.json").read_text())
    assert set(results["models"]) == {"base", "aligned", *ABLATIONS}
    assert results["models"]["fixed_lambda"]["path"].endswith("align/ablations/fixed_lambda/model")
    assert "<td>mm_dpo_safe</td>" in (tmp_path / "runs/tiny/eval/report.html").read_text()


def test_a_dual_ablation_of_a_plain_dpo_recipe_samples_on_a_pool_held_out_for_both(tmp_path, tokenizer_dir, scored_rows):
    """Once validated and then failed at run time ("no prompt pool"): the pool follows whichever variant
    samples Ĵ_C, and both variants train on the same pairs."""
    recipe = tiny_recipe(tmp_path, tokenizer_dir, scored_rows)
    data = yaml.safe_load(recipe.read_text())
    dual = {"loss": "safe_mm_dpo", "lambda_update_every": 1, "lambda_lr": 0.5, "cost_sampling": TINY_COST_SAMPLING}
    data["align"] = {**TINY_TRAINER, "loss": "dpo", "ablations": {"dual": dual}}
    recipe.write_text(yaml.safe_dump(data))
    summary = run_ok(tmp_path, recipe)
    assert summary["ablations"]["dual"]["train_pairs"] == summary["train_pairs"]
    dual_steps = [json.loads(line) for line in (tmp_path / "runs/tiny/align/ablations/dual/metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(s["cost_estimate"]) for s in dual_steps if "loss" in s)
    assert "cost_estimate" not in train_steps(tmp_path / "runs/tiny")[0]  # the dpo policy samples nothing


def test_lora_run_leaves_the_adapter_and_a_merged_full_checkpoint(tmp_path, tokenizer_dir, scored_rows):
    from safetensors.torch import load_file

    recipe = tiny_recipe(tmp_path, tokenizer_dir, scored_rows, model={"lora": {"rank": 4, "alpha": 8}})
    summary = run_ok(tmp_path, recipe)
    align = tmp_path / "runs/tiny/align"
    assert summary["outputs"]["adapter"] == "adapter" and (align / "adapter" / "adapter_config.json").exists()
    merged = load_file(align / "model" / "model.safetensors")
    base = load_file(Path(summary["policy_dir"]) / "model.safetensors")
    assert not any("lora" in key for key in merged)  # a plain checkpoint: no PEFT needed to load it
    changed = [k for k in base if "proj" in k and not torch.equal(base[k], merged[k])]
    assert changed, "the trained adapter was not merged into the weights"


def test_rerun_is_skipped_and_data_change_reruns(tmp_path, tokenizer_dir, scored_rows):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, scored_rows)
    first = run_ok(tmp_path, recipe)
    again = run_cli("run", str(recipe), "--run-dir", "runs/tiny", cwd=tmp_path)
    assert again.returncode == 0 and "up to date" in again.stderr
    assert json.loads((tmp_path / "runs/tiny/align/stage.json").read_text()) == first
    with scored_rows.open("a") as handle:  # the data changed: the stage runs again
        handle.write(scored_rows.read_text().splitlines()[0] + "\n")
    changed = run_cli("run", str(recipe), "--run-dir", "runs/tiny", cwd=tmp_path)
    assert changed.returncode == 0 and "changed since the last run" in changed.stderr
    assert json.loads((tmp_path / "runs/tiny/align/stage.json").read_text())["fingerprint"] != first["fingerprint"]


@pytest.mark.parametrize("threshold, emptied_latest", [(0.0, True), ("initial", False)])
def test_crash_mid_stage_resumes_from_the_checkpoint(tmp_path, tokenizer_dir, scored_rows, threshold, emptied_latest):
    """SIGKILL the stage after a few checkpointed steps; the rerun continues where it stopped and ends
    exactly where an uninterrupted run ends (same steps, same λ, same final loss). A calibrated threshold
    (`initial`) comes back from the checkpoint: it is not measured again on the half-trained policy. A
    kill while DeepSpeed rewrote `latest` leaves it empty (seen in CI): the newest checkpoint is used."""
    align = {"epochs": 6, "checkpoint_steps": 1, "lambda_lr": 0.3, "cost_threshold": threshold}
    recipe = tiny_recipe(tmp_path, tokenizer_dir, scored_rows, align=align)
    reference = run_ok(tmp_path, recipe, run_dir="runs/straight")
    expected = train_steps(tmp_path / "runs/straight")

    partial = tmp_path / "runs/crashed/.align.partial"

    def checkpointed() -> bool:
        metrics = partial / "metrics.jsonl"
        return (
            metrics.exists()
            and len(metrics.read_text().splitlines()) >= 8
            and (partial / "checkpoints" / "latest").exists()
        )

    kill_when(["run", str(recipe), "--run-dir", "runs/crashed"], tmp_path, checkpointed)
    assert not (tmp_path / "runs/crashed/align").exists()  # nothing half-finished is published
    if emptied_latest:
        (partial / "checkpoints" / "latest").write_text("")

    result = run_cli("run", str(recipe), "--run-dir", "runs/crashed", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming the unfinished run" in result.stderr and "resumed from" in result.stderr
    assert ("names nothing, which is not a checkpoint" in result.stderr) is emptied_latest
    resumed = train_steps(tmp_path / "runs/crashed")
    assert [s["step"] for s in resumed] == [s["step"] for s in expected]
    assert resumed[-1]["lambda_next"] == pytest.approx(expected[-1]["lambda_next"], rel=1e-5)
    assert resumed[-1]["loss"] == pytest.approx(expected[-1]["loss"], rel=1e-4)
    summary = json.loads((tmp_path / "runs/crashed/align/stage.json").read_text())
    assert summary["final_lambda"] == pytest.approx(reference["final_lambda"], rel=1e-5)
    assert summary["cost_threshold"] == pytest.approx(reference["cost_threshold"])
    samples = (tmp_path / "runs/crashed/align/lambda_samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in samples].count(0) == (threshold == "initial")
    # the steps after the resume are judged against the same d as before it
    assert [s["cost_above_threshold"] for s in resumed] == [s["cost_above_threshold"] for s in expected]
    assert "Logging error" not in result.stderr
    assert not (tmp_path / "runs/crashed/align/checkpoints").exists()


def test_a_kill_before_the_first_checkpoint_restarts_with_clean_logs(tmp_path, tokenizer_dir, scored_rows):
    """Killed after the step-0 calibration but before any checkpoint, the rerun trains the policy afresh
    in the same partial dir: its lambda_samples.jsonl must then hold one calibration, not the killed
    attempt's plus its own (seen in a real run: two step-0 rows)."""
    align = {"epochs": 3, "checkpoint_steps": 1000, "cost_threshold": "initial", "lambda_lr": 0.3}
    recipe = tiny_recipe(tmp_path, tokenizer_dir, scored_rows, align=align)
    samples = tmp_path / "runs/tiny/.align.partial/lambda_samples.jsonl"
    kill_when(["run", str(recipe), "--run-dir", "runs/tiny"], tmp_path, lambda: samples.exists() and samples.read_text())
    assert not (tmp_path / "runs/tiny/.align.partial/checkpoints/latest").exists()

    run_ok(tmp_path, recipe)
    logged = (tmp_path / "runs/tiny/align/lambda_samples.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in logged]
    assert steps == [0] + [s["step"] for s in train_steps(tmp_path / "runs/tiny")]


def test_a_reference_that_tokenizes_differently_is_refused(tmp_path, tokenizer_dir, scored_rows):
    other = build_tokenizer(tmp_path / "other-tokenizer", vocab_size=300)
    reference = {"random": {"tokenizer": str(other), "config": {"hidden_size": 32, "intermediate_size": 64}}}
    recipe = tiny_recipe(tmp_path, tokenizer_dir, scored_rows, model={"reference": reference})
    result = run_cli("run", str(recipe), "--run-dir", "runs/tiny", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "tokenizes differently from model.policy" in result.stderr


def test_a_stale_partial_dir_is_wiped_once_under_two_ranks(tmp_path, tokenizer_dir, scored_rows):
    """A stale `.align.partial` that looks finished (model/config.json, summary.json): with --force rank 0
    wipes it and every rank trains. Before the process group existed ahead of the runner, the wipe was
    not fenced and rank 1 could find the stale model, skip training and leave rank 0 alone in a collective.
    (Whether that race strikes depends on timing; the mechanism that closes it — the group up before the
    runner, rank 0's decisions broadcast — is checked directly in test_runner.py.)"""
    recipe = tiny_recipe(tmp_path, tokenizer_dir, scored_rows, deepspeed={"zero_stage": 2})
    stale = tmp_path / "runs/ddp/.align.partial"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "config.json").write_text("{}")
    (stale / "summary.json").write_text(json.dumps({"loss": "stale", "steps": 0}))
    (stale / "fingerprint").write_text("stale")
    result = torchrun_cli("run", str(recipe), "--run-dir", "runs/ddp", "--force", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/ddp/align/stage.json").read_text())
    assert summary["processes"] == 2 and summary["loss"] == "safe_mm_dpo" and summary["steps"] > 0
    assert len(train_steps(tmp_path / "runs/ddp")) == summary["steps"]


@pytest.fixture
def mixed_rows(tmp_path, scored_rows) -> Path:
    """The scored rows with every third row harmless-only (as the seed recipe's HH-RLHF rows are), so
    per-micro-batch normalisation would weight the two terms differently from the global batch's."""
    rows = [json.loads(line) for line in scored_rows.read_text().splitlines()]
    for i, row in enumerate(rows):
        if i % 3 == 0:
            row["better_response_id"], row["delta_h"] = -1, 0.0
    return write_jsonl(tmp_path / "mixed.jsonl", rows)


def test_micro_batching_changes_nothing_but_float_noise(tmp_path, tokenizer_dir, mixed_rows):
    """The same global batches split as micro-batch 1, 2 and 4, with and without sorting each step's
    pairs by length, train the same model: same loss, λ and gradient norm at every step, same weights
    at the end; sorting only lowers the padding the forwards compute."""
    from safetensors.torch import load_file

    runs = {}
    for micro, grouped in ((1, True), (2, True), (4, True), (2, False)):
        name = f"m{micro}{'' if grouped else '-unsorted'}"
        (tmp_path / name).mkdir()
        align = {"micro_batch_size": micro, "group_by_length": grouped}
        # max_len 512: at the default 128 nearly every pair is cut to one length and nothing is padded
        recipe = tiny_recipe(tmp_path / name, tokenizer_dir, mixed_rows, align=align, data={"max_len": 512})
        run_ok(tmp_path / name, recipe)
        runs[micro, grouped] = tmp_path / name / "runs/tiny"
    reference = train_steps(runs[4, True])
    assert len(reference) >= 4 and all(0 < s["n_h"] < 4 or s["n_s"] == 4 for s in reference)
    helpful_rows = [s["n_h"] for s in reference]  # group_by_labels: 2/3 of each step's 4, to within one
    assert max(helpful_rows) - min(helpful_rows) <= 1 and min(helpful_rows) >= 2, helpful_rows
    for key in ((1, True), (2, True), (2, False)):
        steps = train_steps(runs[key])
        for a, b in zip(steps, reference, strict=True):
            for stat in ("loss", "loss_h", "loss_s", "lambda_next", "grad_norm", "cost_sampled"):
                assert a[stat] == pytest.approx(b[stat], rel=1e-4, abs=1e-6), (key, stat, a["step"])
        weights, expected = load_file(runs[key] / "align/model/model.safetensors"), load_file(
            runs[4, True] / "align/model/model.safetensors"
        )
        assert all(torch.allclose(weights[k], expected[k], atol=1e-5) for k in expected), key
    padding = {key: sum(s["padding"] for s in train_steps(runs[key])) for key in runs}
    assert padding[1, True] < padding[2, True] < 0.95 * padding[2, False]  # 0.91 on these steps


def test_zero3_samples_from_the_partitioned_policy_like_zero2(tmp_path, tokenizer_dir, scored_rows):
    """Under ZeRO-3 the policy's weights are partitioned: generating Ĵ_C's answers gathers them through
    DeepSpeed's hooks. Same answers' costs and the same λ as ZeRO-2."""
    runs = {}
    for stage in (2, 3):
        (tmp_path / f"z{stage}").mkdir()
        recipe = tiny_recipe(tmp_path / f"z{stage}", tokenizer_dir, scored_rows, deepspeed={"zero_stage": stage})
        run_ok(tmp_path / f"z{stage}", recipe)
        runs[stage] = train_steps(tmp_path / f"z{stage}/runs/tiny")
    for a, b in zip(runs[3], runs[2], strict=True):
        for key in ("cost_sampled", "lambda_next", "loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a["step"])


def test_trainer_feeds_summed_logps_and_each_dimension_its_own_margin(tmp_path, tokenizer_dir, scored_rows):
    """At the call into the loss: summed (not mean) response log-probs of the policy, the cached
    reference log-probs as given, δ_H with the helpful labels and δ_S with the harmless ones (distinct
    margins per dimension, so a swap would show in β)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from safealign.domain.data import load_rows
    from safealign.losses import LossSettings, get_loss, mm_dpo_beta
    from safealign.models.resolve import resolve_model
    from safealign.openrlhf import Actor, patches
    from safealign.openrlhf.pair_dataset import PreferencePairDataset
    from safealign.openrlhf.pair_forward import PairLogProbs
    from safealign.recipe import load_recipe
    from safealign.trainers.safe_mm_dpo import SafeMMDPOTrainer

    patches.enable_fp32()
    raw = [json.loads(line) for line in scored_rows.read_text().splitlines()][:3]
    for i, row in enumerate(raw):
        row.update(delta_h=0.1 * (i + 1), delta_s=3.0 + i, ref_logps_0=-50.0 - i, ref_logps_1=-60.0 + i)
    rows = load_rows(write_jsonl(tmp_path / "three.jsonl", raw), "pku_saferlhf")
    policy_dir = resolve_model(load_recipe(tiny_recipe(tmp_path, tokenizer_dir, scored_rows)).model.policy)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    strategy = SimpleNamespace(
        args=SimpleNamespace(data=SimpleNamespace(apply_chat_template=True)), ring_attn_group=None
    )
    dataset = PreferencePairDataset(rows, tokenizer, 128, strategy)
    batch = dataset.collate_fn([dataset[i] for i in range(len(dataset))])

    trainer = SafeMMDPOTrainer.__new__(SafeMMDPOTrainer)  # only what batch_inputs reads
    trainer.model = Actor(str(policy_dir), attn_implementation="sdpa", param_dtype="fp32").eval()
    trainer.ref_model, trainer.global_counts, trainer.device = None, None, torch.device("cpu")
    trainer.pair_logps = PairLogProbs(tokenizer, strategy, trainer.device)
    with torch.no_grad():
        inputs = trainer.batch_inputs(batch)

    # Sums over ~100 response tokens (a mean would be ~100x smaller); padding and SDPA differ, so 1e-3.
    expected = response_logps(policy_dir, tokenizer_dir, raw, 128)
    assert inputs.policy_logps_0.tolist() == pytest.approx(expected[:, 0].tolist(), rel=1e-3)
    assert inputs.policy_logps_1.tolist() == pytest.approx(expected[:, 1].tolist(), rel=1e-3)
    assert inputs.ref_logps_0.tolist() == [-50.0, -51.0, -52.0] and inputs.ref_logps_1.tolist() == [-60.0, -59.0, -58.0]
    assert inputs.delta_h.tolist() == pytest.approx([0.1, 0.2, 0.3]) and inputs.delta_s.tolist() == [3.0, 4.0, 5.0]
    _, stats = get_loss("safe_mm_dpo")(LossSettings())(inputs, 1.0)
    assert stats["beta_h_mean"] == pytest.approx(mm_dpo_beta(torch.tensor([0.1, 0.2, 0.3]), 0.1, 0.5, 0.5).mean().item())
    assert stats["beta_s_mean"] == pytest.approx(mm_dpo_beta(torch.tensor([3.0, 4.0, 5.0]), 0.1, 0.5, 0.5).mean().item())


@pytest.mark.parametrize("threshold, update", [(0.0, "dual"), ("initial", "dual"), ("initial", "fixed")])
def test_two_processes_train_like_one(tmp_path, tokenizer_dir, mixed_rows, threshold, update):
    """torchrun with 2 ranks (ZeRO-2, gloo): the global batch is split over ranks (each step's pairs
    sorted by length on each rank), the Ĵ_C pool too (answers gathered, scoring sharded and all-reduced;
    with `initial`, the calibration as well), and the run follows one process's trajectory: same loss
    and λ at every step — a fixed λ that watches its pool (`in_fixed_runs`) included. Greedy sampling, so
    answers do not depend on how the pool is split."""
    sampling = {**TINY_COST_SAMPLING, "temperature": 0.0, "in_fixed_runs": update == "fixed"}
    recipe = tiny_recipe(
        tmp_path, tokenizer_dir, mixed_rows, deepspeed={"zero_stage": 2},
        align={"epochs": 2, "lambda_lr": 0.5, "cost_threshold": threshold, "lambda_update": update,
               "cost_sampling": sampling},
    )  # fmt: skip
    run_ok(tmp_path, recipe, run_dir="runs/one")
    result = torchrun_cli("run", str(recipe), "--run-dir", "runs/ddp", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/ddp/align/stage.json").read_text())
    assert summary["processes"] == 2
    one = json.loads((tmp_path / "runs/one/align/stage.json").read_text())
    assert summary["cost_threshold"] == pytest.approx(one["cost_threshold"], rel=1e-5)
    steps, single = train_steps(tmp_path / "runs/ddp"), train_steps(tmp_path / "runs/one")
    assert len(steps) == summary["steps"] == len(single)
    for a, b in zip(steps, single):
        for key in ("loss", "loss_h", "loss_s", "n_h", "n_s", "cost_sampled", "lambda_next"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a["step"])
    if threshold == 0.0:  # (greedy answers of a barely trained tiny policy cost what they did at d: λ stays)
        assert len({round(s["lambda_next"], 6) for s in steps}) > 1
    if update == "fixed":
        assert {s["lambda_next"] for s in steps} == {1.0} and summary["final_lambda"] == 1.0
    assert (tmp_path / "runs/ddp/align/model/model.safetensors").exists()


def test_adam_offload_steps_torchs_adamw_without_building_an_op(tmp_path, tokenizer_dir, scored_rows):
    """`deepspeed.adam_offload` keeps the optimizer states on the CPU. DeepSpeed's own choice there is
    DeepSpeedCPUAdam, built with g++ and ninja at first use (the GPU image has no g++): every tool such a
    build runs is replaced on PATH by one that fails and leaves a mark (DeepSpeed's import-time probes
    with `cc`, which fail soft, keep the real one), and the run must still train — by torch's fused AdamW
    on the offloaded states, the same steps as without offload."""
    shims = tmp_path / "no-compilers"
    shims.mkdir()
    for name in ("c++", "g++", "nvcc", "ninja"):
        (shims / name).write_text(f"#!/bin/sh\ntouch {shims}/called-{name}\nexit 1\n")
        (shims / name).chmod(0o755)
    env = {"PATH": f"{shims}:{os.environ['PATH']}", "CXX": str(shims / "c++")}
    runs = {}
    for offload in (False, True):
        work = tmp_path / f"offload-{offload}"
        work.mkdir()
        recipe = tiny_recipe(work, tokenizer_dir, scored_rows, deepspeed={"zero_stage": 2, "adam_offload": offload})
        result = run_cli("run", str(recipe), "--run-dir", "runs/tiny", "--stage", "align", cwd=work, extra_env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[offload] = train_steps(work / "runs/tiny")
    assert not list(shims.glob("called-*"))
    assert len(runs[True]) == len(runs[False]) > 1
    for a, b in zip(runs[True], runs[False], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), a["step"]


def test_zero3_under_two_ranks_gathers_the_weights_once_per_estimate(tmp_path, tokenizer_dir, mixed_rows):
    """torchrun, 2 ranks, ZeRO-3 (each rank holds half of every weight, gloo): Ĵ_C's answers generated
    with the weights gathered once per estimate (`cost_sampling.gather_weights`, the default: DeepSpeed's
    hooks lifted while it answers) are the ones generated in lockstep with a gather per module per token
    (`synced_gpus`), and training after each estimate goes on identically (the hooks are back). Greedy,
    so answers do not depend on the split. The seconds per estimate of both are printed."""
    runs = {}
    for gather in (True, False):
        work = tmp_path / f"gather-{gather}"
        work.mkdir()
        recipe = tiny_recipe(
            work, tokenizer_dir, mixed_rows, deepspeed={"zero_stage": 3},
            align={"lambda_lr": 0.5, "cost_sampling": {**TINY_COST_SAMPLING, "temperature": 0.0,
                                                        "max_new_tokens": 24, "gather_weights": gather}},
        )  # fmt: skip
        result = torchrun_cli("run", str(recipe), "--run-dir", "runs/z3", cwd=work, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[gather] = train_steps(work / "runs/z3")
        samples = (work / "runs/z3/align/lambda_samples.jsonl").read_text().splitlines()
        seconds = [json.loads(line)["seconds"] for line in samples]
        print(f"gather_weights={gather}: {len(seconds)} estimates, median {sorted(seconds)[len(seconds) // 2]:.3f} s")
    assert len(runs[True]) == len(runs[False]) > 1
    for a, b in zip(runs[True], runs[False], strict=True):
        for key in ("loss", "cost_sampled", "lambda_next"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a["step"])


def test_label_controls_train_the_same_pairs_toward_the_other_response_or_toward_none(
    tmp_path, tokenizer_dir, scored_rows
):
    """`align.labels` controls: DPO on the harmlessness labels as given moves the policy toward the safer
    response; flipped, away from it by the same kind of step; shuffled (a seeded coin per pair) trains the
    same pairs and steps with no preference left, so its move lies between the two. `align.seed` retrains
    a variant on the same pairs in another order (a second seed of `given`)."""
    controls = {name: {"loss": "dpo", "dimension": "safe", "labels": name} for name in ("given", "flipped", "shuffled")}
    controls["given_seed2"] = {**controls["given"], "seed": 2}
    recipe = tiny_recipe(tmp_path, tokenizer_dir, scored_rows, align={"epochs": 4, "ablations": controls})
    summary = run_ok(tmp_path, recipe)
    assert {summary["ablations"][name]["train_pairs"] for name in controls} == {summary["train_pairs"]}
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / f"runs/tiny/align/ablations/{name}/metrics.jsonl")
                     .read_text().splitlines() if '"loss"' in line] for name in ("given", "given_seed2")}  # fmt: skip
    assert losses["given"] != losses["given_seed2"]  # another order of the same pairs
    rows = [json.loads(line) for line in scored_rows.read_text().splitlines()]
    base_dir = Path(summary["policy_dir"])
    before = response_logps(base_dir, tokenizer_dir, rows, 128)
    safer = torch.tensor([r["safer_response_id"] for r in rows])

    def toward_safer(name: str) -> float:
        ratio = response_logps(tmp_path / f"runs/tiny/align/ablations/{name}/model", tokenizer_dir, rows, 128) - before
        return (ratio.gather(1, safer[:, None])[:, 0] - ratio.gather(1, 1 - safer[:, None])[:, 0]).mean().item()

    moved = {name: toward_safer(name) for name in controls}
    assert moved["given"] > 0.5 and moved["given_seed2"] > 0.5 and moved["flipped"] < -0.5, moved
    assert moved["flipped"] < moved["shuffled"] < moved["given"], moved
