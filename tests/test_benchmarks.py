"""The benchmarks' arithmetic (benchmarks/*.py), on hand-made inputs; the timings themselves are
measured by running the benchmarks, never in tests."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from support import pku_rows, tiny_recipe, write_jsonl

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (benchmarks/ is not a package: its scripts are run by path)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


dpo_step, throughput, stage_times, step_floor, learning_curve, heldout_cost_noise = (
    load_benchmark(n)
    for n in ("dpo_step", "throughput", "stage_times", "step_floor", "learning_curve", "heldout_cost_noise")
)


def run(variant: str, steps: list[float], peak: float, base: float = 1000.0) -> dict:
    return {
        "variant": variant,
        "step_seconds": steps,
        "peak_mb": peak,
        "base_mb": base,
        "tokens_per_step": 2000.0,
    }


def test_summary_takes_medians_over_rounds_and_ratios_to_openrlhf_dpo():
    runs = [
        run("openrlhf_dpo", [2.0, 2.2], 1400), run("safe_mm_dpo_ref", [2.0, 2.1], 1410),
        run("safe_mm_dpo_cached", [1.5, 1.6], 1300), run("openrlhf_dpo", [1.8, 9.0], 1450),
        run("safe_mm_dpo_ref", [2.1, 2.05], 1400), run("safe_mm_dpo_cached", [1.4, 1.5], 1250),
    ]  # fmt: skip
    table = dpo_step.summarise(runs)
    assert table["openrlhf_dpo"]["median_step_s"] == pytest.approx(
        2.1
    )  # median of 1.8, 2.0, 2.2, 9.0: an outlier is ignored
    assert table["safe_mm_dpo_cached"]["step_ratio"] == pytest.approx(1.5 / 2.1)
    assert table["safe_mm_dpo_ref"]["tokens_per_s"] == pytest.approx(2000.0 / 2.075)
    # memory: the worst round's peak above the RSS before loading; cached 300 MiB vs DPO's 450 MiB
    assert table["safe_mm_dpo_cached"]["memory_ratio"] == pytest.approx(300 / 450)
    assert table["openrlhf_dpo"]["step_ratio"] == 1.0 and table["openrlhf_dpo"]["memory_ratio"] == 1.0


def test_padding_share_counts_both_responses_padded_to_the_batch_longest():
    def item(a: int, b: int) -> tuple:
        return (torch.ones(1, a), None, torch.ones(1, b), None, {})

    items = [item(2, 4), item(8, 8), item(3, 1), item(7, 6)]
    # batches of 2 in the order [0, 2 | 3, 1]: 2*2*4 + 2*2*8 = 48 tokens forwarded, 39 real
    assert throughput.padding_share(items, [0, 2, 3, 1], 2) == pytest.approx(1 - 39 / 48)
    # file order pairs 0 with 1 (padded to 8) and 2 with 3 (to 7): 60 forwarded
    assert throughput.padding_share(items, [0, 1, 2, 3], 2) == pytest.approx(1 - 39 / 60)


def test_stage_times_reads_finished_stages_in_pipeline_order(tmp_path):
    for name, seconds in (("eval", 40.5), ("rm", 300.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "stage.json").write_text(f'{{"stage": "{name}", "seconds": {seconds}}}')
    (tmp_path / ".align.partial").mkdir()  # an unfinished stage has no time yet
    assert stage_times.stage_times(tmp_path) == {"rm": 300.0, "eval": 40.5}


def test_stage_times_of_a_run_with_no_finished_stage_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no finished stage"):
        stage_times.stage_times(tmp_path)


@pytest.mark.slow
def test_throughput_runs_the_stages_own_code_and_both_arms_do_the_same_work(tmp_path, tokenizer_dir):
    """A run on a tiny random model (not a measurement): it keeps the script working as the stages change,
    and checks what its comparison rests on: same rows, same answers, less padding when sorted."""
    data = write_jsonl(tmp_path / "train.jsonl", pku_rows(12))
    recipe = tiny_recipe(
        tmp_path, tokenizer_dir, data, rm={"score_batch_size": 4},
        eval={"beavertails_per_category": 1, "mt_bench_per_category": 1, "max_new_tokens": 6, "batch_size": 5},
    )  # fmt: skip
    settings = yaml.safe_load(recipe.read_text())
    settings["data"]["max_len"] = 512  # room for the responses' own lengths: sorting has something to sort
    recipe.write_text(yaml.safe_dump(settings))
    out = tmp_path / "throughput.json"
    script = str(BENCHMARKS / "throughput.py")
    command = [sys.executable, script, "--recipe", str(recipe), "--rounds", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    scoring, generation = result["scoring"]["table"], result["generation"]
    assert scoring["length-sorted"]["rows"] == scoring["file order"]["rows"] == 12
    assert scoring["length-sorted"]["padding_share"] < scoring["file order"]["padding_share"]
    assert [arm["answers"] for arm in generation["table"].values()] == [14, 14]  # one prompt per category
    assert generation["identical_answers"] == 14  # greedy batched decoding equals one by one
    assert "| length-sorted | 12 |" in done.stdout


def test_results_of_another_zero_stage_do_not_overwrite_the_default_ones():
    setting = dpo_step.Setting("smollm2", steps=3, batch=8, micro=2, max_len=160, zero_stage=2)
    assert dpo_step.results_path(setting).name == "smollm2.json"
    other = dpo_step.Setting("smollm2", steps=3, batch=8, micro=2, max_len=160, zero_stage=0)
    assert dpo_step.results_path(other).name == "smollm2-zero0.json"
    (child,) = other.child_args()  # a child process rebuilds the same setting
    assert dpo_step.Setting(**json.loads(child.removeprefix("--setting="))) == other


def test_floor_counts_every_linear_weight_of_a_llama_once():
    """linear_shapes against the parameters of a real (tiny, random) LlamaForCausalLM's linear layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=100)  # fmt: skip
    model = LlamaForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert sum(k * n * count for k, n, count in step_floor.linear_shapes(config)) == linear
    # forward 2 FLOPs per weight and token, attention 2 products of 2·d per key and layer; backward twice that
    tokens, context = 10, 4.0
    expected = 3 * tokens * (2 * linear + 2 * 2 * 48 * context * 3)
    assert step_floor.step_flops(config.to_dict(), tokens, context) == pytest.approx(expected)


def test_floor_summary_ratios():
    runs = [
        {"name": "before", "step_seconds": [10.0, 12.0], "padding": 0.3, "tokens_per_step": 1000.0},
        {"name": "grouped", "step_seconds": [8.0, 8.0], "padding": 0.1, "tokens_per_step": 1000.0},
    ]
    config = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "vocab_size": 10}  # fmt: skip
    flops = step_floor.step_flops(config, 1000.0, 5.0)
    table = step_floor.summarise(runs, floor_flops_per_s=flops / 2.0, config=config, context=5.0, pairs=16)
    assert table["before"]["floor_step_s"] == pytest.approx(2.0)
    assert table["before"]["x_floor"] == pytest.approx(11.0 / 2.0) and table["grouped"]["x_floor"] == pytest.approx(4.0)
    assert table["grouped"]["speedup"] == pytest.approx(11.0 / 8.0) and table["grouped"]["s_per_pair"] == 0.5


def test_significant_gain_is_the_exact_mcnemar_threshold():
    # 20 of 100 pairs change: 17 gained / 3 lost has p = 2·(1140+190+20+1)/2^20 = 0.0026 < 0.01,
    # 16 / 4 has p = 0.012: the smallest significant net gain is (17 - 3)/100
    assert learning_curve.significant_gain(100, 0.2, 0.01) == pytest.approx(0.14)
    assert learning_curve.significant_gain(100, 0.03, 0.01) is None  # 3 changes can never be significant
    n = learning_curve.heldout_pairs_needed(0.14, 0.2, 0.01)
    assert n <= 100 and learning_curve.significant_gain(n, 0.2, 0.01) <= 0.14 + 1 / n


def test_projection_solves_the_log_fit_for_the_significant_gain():
    def point(model, pairs, accuracy, gained=0, lost=0):
        return {"model": model, "pairs": pairs, "accuracy": accuracy, "n": 100,
                "vs_base": {"gained": gained, "lost": lost}}  # fmt: skip

    # gain = 0.01·ln(pairs / 50) exactly; the largest model changes 20 of 100 pairs -> 0.14 needed
    points = [point("base", 0, 0.5)] + [
        point(f"m{p}", p, 0.5 + 0.01 * math.log(p / 50), 11, 9) for p in (100, 200, 400, 1000)
    ]
    projection = learning_curve.project(points, 0.01)
    assert projection["fit"]["b_per_ln_pairs"] == pytest.approx(0.01)
    assert projection["gain_needed"] == pytest.approx(0.14)
    assert projection["training_pairs_needed"] == pytest.approx(50 * math.exp(14), rel=1e-6)


def test_implicit_reward_projection_needs_the_sign_test_share():
    # 100 pairs: 63 toward / 37 away has p = 0.012, 64 / 36 has p = 0.0066 -> 0.64, a gain of 0.14 over 50 %
    assert learning_curve.significant_share(100, 0.01) == pytest.approx(0.64)
    points = [{"model": "base", "pairs": 0, "accuracy": 0.5, "n": 100}] + [
        {"model": f"m{p}", "pairs": p, "accuracy": 0.5 + 0.02 * math.log(p / 50), "n": 100} for p in (100, 400)
    ]
    projection = learning_curve.project(points, 0.01, "implicit_reward")
    assert projection["gain_needed"] == pytest.approx(0.14)
    assert projection["training_pairs_needed"] == pytest.approx(50 * math.exp(7), rel=1e-6)


def test_the_cost_probe_reads_every_layer_as_the_pooled_cost_model_does(tmp_path, tokenizer_dir):
    """benchmarks/cost_probe.py reads all layers in one forward; at each layer its features must be what
    the rm stage's model — the backbone cut at that layer — computes, or its table would choose the layer
    for a model the stage does not build."""
    from transformers import AutoModel

    from safealign.models.pooled_value import PooledValueModel, truncated_backbone
    from safealign.models.resolve import build_random
    from safealign.openrlhf import engine
    from safealign.openrlhf.pair_dataset import PreferencePairDataset
    from safealign.openrlhf.settings import build_settings
    from safealign.recipe import RandomModel, load_recipe

    probe = load_benchmark("cost_probe")
    recipe = load_recipe(tiny_recipe(tmp_path, tokenizer_dir, write_jsonl(tmp_path / "pku.jsonl", pku_rows(6))))
    base = build_random(RandomModel(tokenizer=str(tokenizer_dir), config={"hidden_size": 32, "intermediate_size": 64,
                                                                          "num_hidden_layers": 3}))  # fmt: skip
    args = build_settings(recipe, recipe.rm.cost, tmp_path, "rm", model_dir=base)
    strategy = engine.make_strategy(args)
    full = AutoModel.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = engine.load_tokenizer(base, full, strategy, padding_side="left")
    from safealign.domain.data import load_sources

    dataset = PreferencePairDataset(load_sources(recipe.data.train), tokenizer, 128, strategy, None, for_reward_model=True)
    with torch.no_grad():
        every = probe.layer_features(full, dataset, strategy, 4)  # [N, 2, layers, hidden]
        for layer in (1, 2, 3):
            cut = PooledValueModel(truncated_backbone(base, layer, torch.float32), torch.nn.Linear(32, 1))
            batch = dataset.collate_fn([dataset[i] for i in range(len(dataset))])
            ids, mask, extras = batch[0], batch[1], batch[-1]
            assert torch.allclose(every[:, 0, layer - 1].float(), cut.features(ids, mask, extras.prompt_lens), atol=1e-4)


def test_pku_conflict_splits_by_label_agreement_and_averages_the_safety_shift_by_hand():
    """benchmarks/pku_conflict.py: pairs with both labels split by whether the safer response is the more
    helpful; a harmless-only pair is in neither; the shift it averages is the safety margin's move from the
    base (the group tests' `mean_margin_shift`)."""
    from safealign.domain.data import PreferenceRow
    from safealign.eval.pairs import mean_margin_shift

    conflict = load_benchmark("pku_conflict")
    ids = [(0, 0), (1, 0), (1, 1), (-1, 1)]  # (better, safer): agree, disagree, agree, harmless-only
    rows = [PreferenceRow(prompt=[{"role": "user", "content": f"q{i}"}], response_0="a", response_1="b",
                          better_response_id=b, safer_response_id=s, source=f"/d/p.jsonl:{i + 1}")
            for i, (b, s) in enumerate(ids)]  # fmt: skip
    assert conflict.subsets(rows) == {"agree": [0, 2], "disagree": [1]}
    base = dict.fromkeys(range(4), (-9.0, -9.0, -1.0, -1.0))
    model = {0: (-9.0, -9.0, -0.5, -1.0), 1: (-9.0, -9.0, -0.8, -1.0), 2: (-9.0, -9.0, -1.0, -1.2), 3: base[3]}
    # by hand (margin = safer mean − other mean, minus the base's 0): pair 0 (safer 0) −0.5 − (−1.0) = +0.5;
    # pair 2 (safer 1) −1.2 − (−1.0) = −0.2; pair 1 (safer 0) −0.8 − (−1.0) = +0.2
    assert mean_margin_shift(rows, model, base, [0, 2], "safe") == pytest.approx((0.5 - 0.2) / 2)
    assert mean_margin_shift(rows, model, base, [1], "safe") == pytest.approx(0.2)


def test_heldout_cost_noise_splits_the_spread_within_and_between_prompts_by_hand():
    # costs[answer][prompt]: prompt 0 answered 0 then 2, prompt 1 answered 2 then 4
    m = heldout_cost_noise.within_between([[0.0, 2.0], [2.0, 4.0]])
    assert m["mean"] == 2.0 and m["per_seed_means"] == [1.0, 3.0]
    assert m["sigma_within"] == pytest.approx(math.sqrt(2.0))  # each prompt's two answers: variance 2
    assert m["sigma_between"] == pytest.approx(1.0)  # the prompt means 1 and 3 vary by 2, of which 2/2 is sampling
    assert m["seed_sd_if_independent"] == pytest.approx(1.0)  # sqrt(σ_w² / 2 prompts)
    assert m["seed_sd"] == pytest.approx(math.sqrt(2.0))  # the per-seed means 1 and 3


def test_heldout_cost_noise_paired_sd_with_and_without_common_random_numbers_by_hand():
    first, second = [[0.0, 2.0], [2.0, 4.0]], [[1.0, 1.0], [3.0, 5.0]]
    crn, shifted = (heldout_cost_noise.within_between(heldout_cost_noise.differences(first, second, k)) for k in (0, 1))
    # common random numbers: prompt 0's differences −1, −1 (variance 0), prompt 1's 1, −1 (variance 2): sqrt(2 / 2 / 2)
    assert crn["seed_sd_if_independent"] == pytest.approx(math.sqrt(0.5))
    # answer j against answer j + 1: prompt 0's −3, 1 (variance 8), prompt 1's −3, 3 (variance 18): sqrt(26 / 4)
    assert shifted["seed_sd_if_independent"] == pytest.approx(math.sqrt(6.5))
    # measured over seeds instead: seed 0's mean difference (−1 + 1) / 2 = 0, seed 1's (−1 − 1) / 2 = −1
    assert crn["per_seed_means"] == [0.0, -1.0]
    assert shifted["per_seed_means"] == [-3.0, 2.0]  # (0 − 3 + 2 − 5) / 2, (2 − 1 + 4 − 1) / 2


def test_heldout_cost_noise_leaves_the_training_sd_and_sizes_the_seeds_by_it():
    costs = {"a": [[0.0, 2.0], [2.0, 4.0]], "b": [[1.0, 1.0], [3.0, 5.0]]}
    result = heldout_cost_noise.analyse(costs, observed_sd=1.0, observed_pairs=7, effect=0.5)
    pair = result["pair"]
    assert pair["sampling_sd"] == pytest.approx(math.sqrt(0.5))  # the per-seed differences 0 and −1
    assert pair["training_sd"] == pytest.approx(math.sqrt(0.5))  # 1 − 0.5
    # answers shrink only the sampling part: sd² = 0.5 + 0.5 / k
    for k, n in pair["pairs_needed_by_answers"].items():
        assert n == heldout_cost_noise.pairs_needed(0.5, math.sqrt(0.5 + 0.5 / k))
    assert result["models"]["a"]["design_effect"] == pytest.approx(2.0)  # (√2 / 1)²


def test_heldout_cost_noise_pairs_needed_agrees_with_statsmodels_power():
    from statsmodels.stats.power import TTestPower

    for effect, sd in ((0.072, 0.099), (1.0, 1.0), (0.05, 0.03)):
        n = heldout_cost_noise.pairs_needed(effect, sd)
        exact = TTestPower().solve_power(effect_size=effect / sd, alpha=0.05, power=0.8, alternative="larger")
        assert n == max(2, math.ceil(exact))
    assert heldout_cost_noise.pairs_needed(0.072, 0.05) < heldout_cost_noise.pairs_needed(0.072, 0.099)
    low, high = heldout_cost_noise.sd_interval(0.099, 7)
    assert low == pytest.approx(0.0638, abs=1e-4) and high == pytest.approx(0.2180, abs=1e-4)
