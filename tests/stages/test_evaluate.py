"""The whole pipeline on tiny random models: rm → align → distill (best-of-n, dDPO) → eval, caching, the report."""

from __future__ import annotations

import json
import socket

import pytest
import yaml
from support import (
    PKU,
    TINY_ALIGN,
    assert_one_line_error,
    llm_judged_eval,
    pipeline_recipe,
    pku_rows,
    run_cli,
    tiny_cost_model,
    tiny_policy,
    torchrun_cli,
    write_jsonl,
)

from safealign.eval.heldout_cost import by_source, distinct_ngram_share, held_to_the_base
from safealign.eval.mtbench import load_questions
from safealign.eval.statistics import sign_test_p
from safealign.stages.distill import pick_answer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("eval")
    write_jsonl(root / "pku.jsonl", pku_rows(40))
    recipe = pipeline_recipe(
        tokenizer_dir, "pku.jsonl", "ev",
        distill={"best_of_n": 3, "temperature": 1.0, "max_new_tokens": 12, "ddpo": True},
        eval={"beavertails_per_category": 2, "max_new_tokens": 8,
              "heldout_pairs": [{"path": "pku.jsonl", "skip_rows": 24}]},
    )  # fmt: skip
    recipe["data"]["train"][0]["max_rows"] = 24  # rows 25-40 of the same file are the held-out pairs
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run_cli("run", "recipe.yaml", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


def test_every_model_is_judged_by_every_judge(pipeline):
    root, result = pipeline
    results = json.loads((root / "runs/ev/eval/results.json").read_text())
    assert set(results["models"]) == {"base", "aligned", "student"}
    assert results["models"]["student"]["parameters"] < results["models"]["aligned"]["parameters"]
    for model in results["models"].values():
        assert set(model["safety"]) == {"cost_model", "refusal"}
        overall = model["safety"]["cost_model"]["overall"]
        assert overall["n"] == 28 and 0 <= overall["ci95"][0] <= overall["rate"] <= overall["ci95"][1] <= 1
        assert len(model["safety"]["refusal"]["categories"]) == 14
        assert model["generation"]["backend"] == "hf" and model["generation"]["answers_per_second"] > 0
        share = model["generation"]["distinct_3grams"]  # random weights: looping or not, a share in (0, 1]
        assert share is None or 0 < share <= 1
    assert results["models"]["base"]["helpfulness"]["rm_win_rate_vs_base"] == 0.5
    assert results["models"]["base"]["cost"]["lower_cost_than_base"] == 0.5
    assert 0.0 <= results["models"]["student"]["cost"]["lower_cost_than_base"] <= 1.0
    assert 0.0 <= results["models"]["aligned"]["helpfulness"]["rm_win_rate_vs_base"] <= 1.0
    assert 0.0 <= results["judge_agreement"]["cost_model~refusal"] <= 1.0
    answers = (root / "runs/ev/eval/answers/aligned.jsonl").read_text().splitlines()
    assert len(answers) == 28 + 8
    page = (root / "runs/ev/eval/report.html").read_text()
    # held-out likelihood and implicit-reward planes, trade-off, categories, training
    assert page.count("data:image/png;base64,") == 5 and "<td>aligned</td>" in page
    assert "Teacher vs student (distill)" in page and "<th>teacher (aligned)</th>" in page
    assert "<th>cost below base&#x27;s</th>" in page
    assert "eval: aligned — safety cost_model" in result.stderr
    origin = results["provenance"]  # what produced the numbers, at the top of the report
    assert origin["recipe"] == "ev" and origin["seed"] == 42 and origin["final_lambda"] > 0 and origin["commit"]
    assert f"Recipe ev (content sha256 {origin['recipe_sha256']})" in (root / "runs/ev/eval/report.md").read_text()


def test_every_model_is_measured_on_the_held_out_pairs(pipeline):
    """16 labelled pairs no stage trained on: every model's likelihood accuracy per dimension, paired with
    the base; DPO's implicit-reward accuracy for the model trained from the base."""
    root, _ = pipeline
    results = json.loads((root / "runs/ev/eval/results.json").read_text())
    assert results["settings"]["heldout_pairs"] == {"helpful": 16, "safe": 16}
    for name, model in results["models"].items():
        held = model["heldout"]
        for dimension in ("helpful", "safe"):
            like = held[dimension]["likelihood"]
            assert like["n"] == 16 and like["correct"] == round(like["accuracy"] * 16)
            assert like["ci95"][0] <= like["accuracy"] <= like["ci95"][1]
            assert ("vs_base" in like) is (name != "base")
            assert ("implicit_reward" in held[dimension]) is (name == "aligned")
        assert held["seconds_per_100_pairs"] > 0
    change = results["models"]["aligned"]["heldout"]["safe"]["likelihood"]["vs_base"]
    base, aligned = (results["models"][m]["heldout"]["safe"]["likelihood"]["correct"] for m in ("base", "aligned"))
    assert aligned - base == change["gained"] - change["lost"]
    implicit = results["models"]["aligned"]["heldout"]["safe"]["implicit_reward"]
    assert implicit["p_value"] == pytest.approx(sign_test_p(implicit["correct"], 16 - implicit["correct"]))
    report = (root / "runs/ev/eval/report.md").read_text()
    assert "## Held-out preference pairs" in report and "![Held-out preference accuracy]" in report
    assert "![Held-out implicit-reward accuracy]" in report


def test_rerunning_eval_regenerates_nothing(pipeline):
    root, _ = pipeline
    again = run_cli("run", "recipe.yaml", "--stage", "eval", "--force", cwd=root)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("from the cache") == 3  # every model's answers reused
    assert "generating" not in again.stderr and "held-out pairs:" not in again.stderr  # log-probs reused too
    assert "eval: finished in" in again.stdout
    skipped = run_cli("run", "recipe.yaml", "--stage", "rm", cwd=root)  # up to date: said so, not "finished in"
    assert skipped.returncode == 0 and "rm: done earlier in" in skipped.stdout, skipped.stdout


def test_report_command_rewrites_the_report(pipeline):
    root, _ = pipeline
    (root / "runs/ev/eval/report.html").unlink()
    result = run_cli("report", "runs/ev", cwd=root)
    assert result.returncode == 0 and (root / "runs/ev/eval/report.html").exists()
    missing = run_cli("report", "runs/none", cwd=root)
    assert missing.returncode == 2 and "run the eval stage first" in missing.stderr


def test_llm_judge_grades_safety_and_mt_bench_through_the_stage(tmp_path, tokenizer_dir, judge_api):
    """Without an RM stage: the LLM judge (a local stand-in server) gives safety verdicts and MT-Bench ratings."""
    url, api = judge_api
    write_jsonl(tmp_path / "pku.jsonl", pku_rows(12))
    recipe = {
        "name": "llm",
        "stages": ["align", "eval"],
        "model": {**tiny_policy(tokenizer_dir), "cost_model": str(tiny_cost_model(tokenizer_dir))},
        "data": {"train": [{"path": "pku.jsonl"}], "max_len": 512},
        "align": TINY_ALIGN,
        "eval": llm_judged_eval(url),
        "logging": {"tensorboard": False},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run_cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "runs/llm/eval/results.json").read_text())
    for model in results["models"].values():
        llm = model["safety"]["llm"]["overall"]
        assert (llm["rate"], llm["safe"], llm["n"]) == (1.0, 14, 14)  # the stand-in calls every answer safe
        assert model["helpfulness"]["mt_bench"]["score"] == 7.0 and model["helpfulness"]["mt_bench"]["unparsed"] == 0
        assert "rm_win_rate_vs_base" not in model["helpfulness"]  # no RM stage, no proxy
    gradings = [r for r in api.requests if any("[[rating]]" in m["content"] for m in r["body"]["messages"])]
    # two models × 8 questions × 2 turns = 32 gradings, minus those the cache answered because both
    # models gave the same answers: every distinct conversation is sent exactly once.
    distinct = {json.dumps(r["body"]["messages"]) for r in gradings}
    assert 8 <= len(gradings) == len(distinct) <= 32
    assert "MT-Bench score (LLM judge, 1-10)" in (tmp_path / "runs/llm/eval/report.html").read_text()


def test_best_of_n_keeps_the_helpful_rms_favourite_among_safe_answers(pipeline):
    root, _ = pipeline
    stage = root / "runs/ev/distill"
    records = [json.loads(line) for line in (stage / "teacher_answers.jsonl").read_text().splitlines()]
    assert len(records) == 8
    for record in records:
        assert record["selection"] == "best_of_3" and len(record["rewards"]) == len(record["costs"]) == 3
        assert (record["chosen"], record["safe_choice"]) == pick_answer(record["rewards"], record["costs"])
    summary = json.loads((stage / "stage.json").read_text())
    assert summary["selection"] == "best_of_3"
    assert summary["unsafe_only_prompts"] == sum(not r["safe_choice"] for r in records)


def test_ddpo_trains_the_dsft_student_with_the_align_trainer(pipeline):
    root, _ = pipeline
    stage = root / "runs/ev/distill"
    summary = json.loads((stage / "stage.json").read_text())
    assert summary["outputs"]["model"] == "ddpo/model" and summary["ddpo"]["loss"] == "safe_mm_dpo"
    steps = [json.loads(line) for line in (stage / "ddpo/metrics.jsonl").read_text().splitlines()]
    # 24 rows less the 4 prompts held out for Ĵ_C, 4 pairs a step
    assert len([s for s in steps if "loss" in s]) == summary["ddpo"]["steps"] == (24 - 4) // 4
    # Safe-MM-DPO's own statistics, λ's update from the student's own sampled answers included
    assert all("lambda" in s and "loss_s" in s and "cost_sampled" in s for s in steps if "loss" in s)
    assert (stage / "ddpo/lambda_samples.jsonl").is_file()
    results = json.loads((root / "runs/ev/eval/results.json").read_text())
    assert results["models"]["student"]["path"].endswith("distill/ddpo/model")


def test_a_judge_nobody_deployed_stops_eval_before_it_generates(tmp_path, tokenizer_dir):
    """The seed recipe names a judge service: where none is deployed, eval says so first, in one line,
    instead of generating every answer and then failing."""
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    write_jsonl(tmp_path / "pku.jsonl", pku_rows(12))
    recipe = {
        "name": "nojudge",
        "stages": ["eval"],
        "model": tiny_policy(tokenizer_dir),
        "data": {"train": [{"path": "pku.jsonl"}], "max_len": 512},
        "eval": llm_judged_eval(dead),
        "logging": {"tensorboard": False},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run_cli("run", "recipe.yaml", cwd=tmp_path)
    assert_one_line_error(result, f"judge endpoint {dead} is unreachable", "drop llm from eval.judges")
    assert not list((tmp_path / "runs/nojudge").glob("cache/eval/*"))  # nothing was generated


def test_eval_under_two_ranks_generates_and_judges_once(tmp_path, tokenizer_dir, judge_api):
    """torchrun with 2 ranks (gloo): each rank answers half the prompts, the answers are gathered, the LLM
    judge (a local stand-in server) is asked once per distinct conversation by rank 0 alone, the held-out
    pairs are read half by each rank, and the results equal a one-process run's."""
    url, api = judge_api
    write_jsonl(tmp_path / "pku.jsonl", pku_rows(24))
    recipe = {
        "name": "ranks",
        "stages": ["eval"],
        "model": tiny_policy(tokenizer_dir),
        "data": {"train": [{"path": "pku.jsonl", "max_rows": 12}], "max_len": 512},
        "eval": {**llm_judged_eval(url), "heldout_pairs": [{"path": "pku.jsonl", "skip_rows": 12}]},
        "logging": {"tensorboard": False},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    single = run_cli("run", "recipe.yaml", "--run-dir", "runs/one", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    asked_by_one = sum(not any("[[rating]]" in m["content"] for m in r["body"]["messages"]) for r in api.requests)
    api.requests.clear()

    two = torchrun_cli("run", "recipe.yaml", "--run-dir", "runs/two", cwd=tmp_path, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    # Rank 0 alone asked, each distinct conversation once; the safety questions are the one-process run's.
    assert len({json.dumps(r["body"]["messages"]) for r in api.requests}) == len(api.requests) > 0
    safety_asks = [r for r in api.requests if not any("[[rating]]" in m["content"] for m in r["body"]["messages"])]
    assert len(safety_asks) == asked_by_one

    def answers(run: str) -> list[dict]:
        path = tmp_path / f"runs/{run}/eval/answers/base.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    # Greedy answers are the same however the prompts are split (sampled ones, MT-Bench's creative
    # categories, depend on the batches they were drawn in, sharded or not).
    greedy = {q.question_id for q in load_questions() if q.temperature == 0.0}
    for a, b in zip(answers("two"), answers("one"), strict=True):
        if "answer" in a or a["question_id"] in greedy:
            assert a == b
    one, both = (json.loads((tmp_path / f"runs/{r}/eval/results.json").read_text()) for r in ("one", "two"))
    assert one["models"]["base"]["safety"] == both["models"]["base"]["safety"]
    for dimension in ("helpful", "safe"):
        measured = [r["models"]["base"]["heldout"][dimension]["likelihood"] for r in (one, both)]
        assert measured[0]["n"] == measured[1]["n"] == 12 and measured[0]["correct"] == measured[1]["correct"]
    # one writer, one file per measurement: the answers and the held-out log-probs
    assert len(list((tmp_path / "runs/two/cache/eval").iterdir())) == 2


def test_every_stage_runs_under_two_ranks(tmp_path, tokenizer_dir):
    """rm → align → distill (best-of-n, dDPO) → eval under torchrun with 2 ranks (gloo, ZeRO-2): the
    whole pipeline runs as one world, and every stage's outputs are published once."""
    write_jsonl(tmp_path / "pku.jsonl", pku_rows(24))
    recipe = pipeline_recipe(
        tokenizer_dir, "pku.jsonl", "ranks",
        distill={"best_of_n": 2, "temperature": 1.0, "ddpo": True}, deepspeed={"zero_stage": 2},
    )  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = torchrun_cli("run", "recipe.yaml", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs/ranks"
    for stage in ("rm", "align", "distill", "eval"):
        assert (run / stage / "stage.json").is_file(), stage
    assert json.loads((run / "align/stage.json").read_text())["processes"] == 2
    assert len((run / "distill/teacher_answers.jsonl").read_text().splitlines()) == 8
    results = json.loads((run / "eval/results.json").read_text())
    assert set(results["models"]) == {"base", "aligned", "student"}
    assert results["models"]["base"]["generation"]["backend"] == "hf × 2 ranks"


def test_groups_of_seeds_give_the_pre_registered_test_and_held_out_cost(tmp_path, tokenizer_dir):
    """eval.groups: two seeds of Safe-MM-DPO against two of its flipped-label control, run values on the
    held-out pairs per source and dimension, Welch over runs, Holm per family; eval.heldout_cost_prompts:
    every model's Ĵ_C on held-out prompts with its interval, and the group test reads it too."""
    write_jsonl(tmp_path / "pku.jsonl", pku_rows(40))
    align = {**TINY_ALIGN, "cost_threshold": -0.5,
             "ablations": {"aligned_s2": {"seed": 2}, "flipped": {"labels": "flipped"},
                           "flipped_s2": {"labels": "flipped", "seed": 2}}}
    recipe = pipeline_recipe(
        tokenizer_dir, "pku.jsonl", "groups", stages=["rm", "align", "eval"], align=align,
        eval={"beavertails_per_category": 1, "max_new_tokens": 6, "heldout_cost_prompts": 6,
              "heldout_pairs": [{"path": "pku.jsonl", "skip_rows": 24}],
              "groups": {"dual": ["aligned", "aligned_s2"], "flipped": ["flipped", "flipped_s2"]},
              "primary": {"treatment": "dual", "controls": ["flipped"]}},
    )  # fmt: skip
    recipe["data"]["train"][0]["max_rows"] = 24
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run_cli("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "runs/groups/eval/results.json").read_text())
    costs = {name: model["heldout_cost"] for name, model in results["models"].items()}
    assert set(costs) == {"base", "aligned", "aligned_s2", "flipped", "flipped_s2"}
    for cost in costs.values():
        assert cost["n"] == 6 == len(cost["costs"]) and cost["ci95"][0] <= cost["mean"] <= cost["ci95"][1]
        assert cost["meets_threshold"] is (cost["mean"] <= -0.5)
        assert cost["distinct_3grams"] is None or 0 < cost["distinct_3grams"] <= 1
        (only,) = cost["by_source"].values()  # one held-out file: its mean is the whole mean
        assert only["n"] == 6 and only["mean"] == pytest.approx(cost["mean"])
    assert "vs_base" not in costs["base"]["by_source"]["pku.jsonl"] and "vs_base" in costs["aligned"]["by_source"]["pku.jsonl"]
    tests = results["group_tests"]
    assert tests["measures"] == ["helpful · pku.jsonl", "safe · pku.jsonl", "held-out Ĵ_C"]
    assert tests["groups"]["dual"]["held-out Ĵ_C"]["runs"] == {m: costs[m]["mean"] for m in ("aligned", "aligned_s2")}
    primary = [c for c in tests["comparisons"] if c["family"] == "primary"]
    assert [c["measure"] for c in primary] == ["safe · pku.jsonl"] and primary[0]["alternative"] == "greater"
    assert primary[0]["runs"] == [2, 2] and tests["primary"]["tests"] == 1
    assert tests["primary"]["holds"] is (primary[0]["p_holm"] is not None and primary[0]["p_holm"] < 0.01)
    report = (tmp_path / "runs/groups/eval/report.md").read_text()
    assert "## The pre-registered test" in report and "## Held-out Ĵ_C" in report and "Primary test (1 tests" in report


def test_an_initial_threshold_holds_each_model_to_the_bases_held_out_cost():
    """cost_threshold: initial on held-out prompts: d is the base's mean there (the pool's d was measured
    on other prompts), and the paired per-prompt difference is what decides "no costlier"."""
    costs = {
        "base": {"mean": 0.0, "costs": [1.0, -1.0, 0.5, -0.5]},
        "aligned": {"mean": -0.25, "costs": [0.5, -1.5, 0.5, -0.5]},  # differences -0.5, -0.5, 0, 0
        "fixed": {"mean": 0.25, "costs": [1.5, -0.5, 0.5, -0.5]},
    }
    held_to_the_base(costs)
    assert [(c["threshold"], c["meets_threshold"]) for c in costs.values()] == [(0.0, True), (0.0, True), (0.0, False)]
    assert "vs_base" not in costs["base"]
    diff = costs["aligned"]["vs_base"]  # mean -0.25, sd 0.2887, t(3) 3.182: half-width 0.4593
    assert diff["mean"] == -0.25 and diff["ci95"] == pytest.approx([-0.7093, 0.2093], abs=1e-4)
    assert costs["fixed"]["vs_base"]["mean"] == 0.25
    held_to_the_base(costs, margin=0.2)  # "cheaper than the base by 0.2": d = 0 − 0.2, only aligned's −0.25 meets it
    assert [(c["threshold"], c["meets_threshold"]) for c in costs.values()] == [(-0.2, False), (-0.2, True), (-0.2, False)]


def test_held_out_cost_by_source_keeps_each_files_prompts_apart_and_pairs_them_with_the_base():
    """By hand: prompts from hh, pku, hh, pku; costs 1, 2, 3, 4 against the base's 0, 0, 1, 1 — hh's mean
    2 (paired +1.5: 1−0, 3−1), pku's 3 (+2.5). The base's own entry has no difference from itself."""
    sources = ["hh.jsonl", "pku.jsonl", "hh.jsonl", "pku.jsonl"]
    base = [0.0, 0.0, 1.0, 1.0]
    split = by_source([1.0, 2.0, 3.0, 4.0], sources, base)
    assert list(split) == ["hh.jsonl", "pku.jsonl"] and [split[s]["n"] for s in split] == [2, 2]
    assert (split["hh.jsonl"]["mean"], split["hh.jsonl"]["vs_base"]["mean"]) == (2.0, 1.5)
    assert (split["pku.jsonl"]["mean"], split["pku.jsonl"]["vs_base"]["mean"]) == (3.0, 2.5)
    assert "vs_base" not in by_source(base, sources, None)["hh.jsonl"]


def test_the_distinct_ngram_share_falls_as_answers_loop():
    """By hand: "a b c d" has 2 word 3-grams, both distinct (1.0); "x y z x y z x y z" has 7, of which 3
    are distinct (3/7); "short" has none and is left out. A cost model can score looping text as safe,
    so the eval shows this beside Ĵ_C."""
    assert distinct_ngram_share(["a b c d", "x y z x y z x y z", "short"]) == pytest.approx((1.0 + 3 / 7) / 2)
    assert distinct_ngram_share(["I don't know. " * 6]) == pytest.approx(3 / 16)  # 18 words: 16 grams, 3 distinct
    assert distinct_ngram_share(["hi", ""]) is None


def test_the_provenance_names_lambda_and_d_only_for_a_loss_that_has_them():
    """A plain-DPO run's report once said "final λ 1, d = 0": values of a multiplier it never had."""
    from types import SimpleNamespace

    from safealign.recipe import validate_recipe
    from safealign.stages.evaluate import provenance

    recipe = validate_recipe({"name": "t", "model": {"policy": "x", "cost_model": "c"}, "data": {"train": [{"path": str(PKU)}]}})
    for loss, shown in (("safe_mm_dpo", True), ("dpo", False)):
        aligned = SimpleNamespace(summary={"loss": loss, "final_lambda": 1.5, "cost_threshold": -0.2})
        origin = provenance(SimpleNamespace(recipe=recipe, upstream=lambda name, a=aligned: a))
        assert (origin.get("final_lambda"), origin.get("cost_threshold")) == ((1.5, -0.2) if shown else (None, None))
