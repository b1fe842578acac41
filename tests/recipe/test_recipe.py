"""Recipe validation: every failure is one line naming the field; nothing is silently ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from support import PKU, ROOT

from safealign.core.errors import SafeAlignError
from safealign.recipe import AlignSection, load_recipe, validate_recipe


def base(**align) -> dict:
    model = {"policy": "some/dir", "cost_model": "some/cost-model"}
    return {"name": "t", "model": model, "data": {"train": [{"path": str(PKU)}]}, "align": align}


def error_of(data: dict) -> str:
    with pytest.raises(SafeAlignError) as info:
        validate_recipe(data, source="r.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name


def test_seed_defaults():
    align = validate_recipe(base()).align
    assert (align.loss, align.lambda_init, align.w, align.k, align.beta_ori) == ("safe_mm_dpo", 1.0, 0.5, 0.5, 0.1)
    assert (align.learning_rate, align.batch_size, align.lambda_lr, align.epochs) == (5e-7, 16, 0.01, 2)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({**base(), "typo": 1}, "r.yaml: typo: unknown key"),
        (base(lamda_init=2.0), "align.lamda_init: unknown key"),
        (base(lambda_init="high"), "align.lambda_init: Input should be a valid number (got 'high')"),
        (base(lambda_init=-1.0), "align.lambda_init: Input should be greater than or equal to 0.000001 (got -1.0)"),
        (base(lambda_max=None), "align.lambda_max: Input should be a valid number (got None)"),
        (base(cost_estimator="implicit"), "align.cost_estimator: Input should be 'sampled' (got 'implicit')"),
        (base(cost_sampling={"prompt": 8}), "align.cost_sampling.prompt: unknown key"),
        (base(cost_sampling={"prompts": 0}), "align.cost_sampling.prompts: Input should be greater than or equal to 1"),
        (base(cost_sampling={"prompts": 8, "sources": {PKU.name: 4}}), "align.cost_sampling: prompts (8) is not the sum of sources (4)"),
        (base(cost_sampling={"sources": {}}), "align.cost_sampling: sources: give {data.train file name: prompts}"),
        (base(cost_sampling={"sources": {PKU.name: 0}}), "align.cost_sampling.sources.pku_saferlhf"),
        (base(cost_sampling={"sources": {"nope.jsonl": 4}}), "align.cost_sampling.sources: 'nope.jsonl' is not a data.train file"),
        (base(loss="dpo", cost_sampling={"prompts": 8}), "align.cost_sampling: not used by loss 'dpo'"),
        (base(lambda_update_every=0), "align.lambda_update_every: Input should be greater than or equal to 1"),
        (base(lambda_step="exp"), "align.lambda_step: Input should be 'log' or 'linear' (got 'exp')"),
        (base(loss="dpo", lambda_step="linear"), "align.lambda_step: not used by loss 'dpo'"),
        (
            {**base(), "model": {"policy": "some/dir"}},
            "r.yaml: align.lambda_update: dual samples Ĵ_C with a cost model, and this recipe has none",
        ),
        (
            {**base(loss="dpo", ablations={"dual": {"loss": "safe_mm_dpo"}}), "model": {"policy": "some/dir"}},
            "align.ablations.dual.lambda_update: dual samples Ĵ_C with a cost model, and this recipe has none",
        ),
        (
            {**base(lambda_update="fixed", cost_sampling={"in_fixed_runs": True}), "model": {"policy": "some/dir"}},
            "r.yaml: align.cost_sampling.in_fixed_runs: true samples Ĵ_C with a cost model, and this recipe has none: "
            "add rm to stages, set model.cost_model to a trained cost model, or set align.cost_sampling.in_fixed_runs: false",
        ),
        (
            {**base(), "stages": ["distill"], "distill": {"ddpo": True}, "model": {"policy": "some/dir"}},
            "r.yaml: align.lambda_update: dual samples Ĵ_C with a cost model, and this recipe has none",
        ),
        (base(epochs=1.5), "align.epochs: Input should be a valid integer"),
        (base(batch_size=6, micro_batch_size=4), "batch_size (6) must be a multiple of micro_batch_size (4)"),
        (base(lambda_init=2.0, lambda_max=1.0), "lambda_max (1.0) is below lambda_init (2.0)"),
        (base(cost_threshold="base"), "align.cost_threshold: a number or 'initial' (the policy's own Ĵ_C before training), got 'base'"),
        (base(cost_threshold=-1.35, cost_threshold_margin=0.1), "align: cost_threshold_margin (0.1) moves an `initial`"),
        (base(cost_threshold="initial", cost_threshold_margin=float("nan")), "align.cost_threshold_margin: Input should be a finite number"),
        (base(loss="dpo", cost_threshold="initial", cost_threshold_margin=0.1), "align.cost_threshold_margin: not used by loss 'dpo'"),
        (base(loss="dpo", w=0.3), "align.w: not used by loss 'dpo'"),
        (base(loss="dpo", lambda_lr=0.1), "align.lambda_lr: not used by loss 'dpo'"),
        (base(loss="nope"), "align.loss: unknown loss 'nope'"),
        (base(kl_coeff=0.2, beta_ori=0.1), "kl_coeff (0.2) and beta_ori (0.1) name the same β"),
        (base(beta=0.2, beta_ori=0.1), "beta (0.2) and beta_ori (0.1) name the same β"),
        ({**base(), "data": {"train": [{"path": "missing.jsonl"}]}}, "data.train.0.path: file not found"),
        ({**base(), "data": {"train": []}}, "data.train: List should have at least 1 item"),
        ({**base(), "data": {"train": [{"path": str(PKU), "format": "pairs"}]}}, "format pairs needs `dimension"),
        (
            {**base(), "model": {"policy": {"random": {"tokenizer": "x", "layers": 2}}}},
            "model.policy.random.layers: unknown key",
        ),
        ({**base(), "model": {}}, "model.policy: Field required"),
        ({**base(), "deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage: Input should be 0, 1, 2 or 3"),
        ({**base(), "name": "Has Spaces"}, "name: String should match pattern"),
        ({**base(), "eval": {"judges": ["llm"]}}, "judges lists llm: give llm_judge"),
        ({**base(), "eval": {"judges": ["refusal", "refusal"]}}, "judges must list each judge once"),
        ({**base(), "eval": {"judges": ["vibes"]}}, "eval.judges.0: Input should be 'cost_model', 'refusal' or 'llm'"),
        ({**base(), "eval": {"beavertails": "nope.jsonl"}}, "eval.beavertails: file not found"),
        ({**base(), "eval": {"beavertails": 3}}, "eval.beavertails: must be a path string"),
        ({**base(), "data": {"train": [{"path": 3}]}}, "data.train.0.path: must be a path string"),
        (
            {**base(), "eval": {"beavertails_per_category": 51}},
            "eval.beavertails_per_category: Input should be less than or equal to 50",
        ),
        ({**base(), "eval": {"llm_judge": {"url": "http://x/v1"}}}, "eval.llm_judge.model: Field required"),
        (
            {**base(), "eval": {"llm_judge": {"url": "file:///etc/passwd", "model": "m"}}},
            "eval.llm_judge.url: must be an http:// or https:// URL with a host (got 'file:///etc/passwd')",
        ),
        (base(ablations={"x": {"lamda_init": 2.0}}), "align: ablations.x.lamda_init: unknown key (did you mean 'lambda_init'?"),
        (base(lamda_lr=0.1, bta_ori=0.2), "align.lamda_lr: unknown key (did you mean 'lambda_lr'? check the spelling"),
        (base(lamda_lr=0.1, bta_ori=0.2), "align.bta_ori: unknown key (did you mean 'beta_ori'?"),  # every one at once
        (base(max_pairs=0), "align.max_pairs: Input should be greater than or equal to 1"),
        ({**base(), "eval": {"heldout_pairs": [{"path": "gone.jsonl"}]}}, "eval.heldout_pairs.0.path: file not found"),
        ({**base(), "data": {"train": [{"path": str(PKU), "skip_rows": -1}]}}, "data.train.0.skip_rows: Input should be"),
        (base(ablations={"x": {"loss": "dpo", "w": 0.3}}), "align.ablations.x.w: not used by loss 'dpo'"),
        (base(ablations={"aligned": {"loss": "dpo"}}), "ablations.aligned: base, aligned, student name the run's"),
        (base(ablations={"Bad Name": {}}), "String should match pattern"),
        ({**base(), "eval": {"groups": {"g": ["aligned"]}}}, "eval: groups: measured on heldout_pairs, and none are given"),
        ({**base(ablations={"a2": {"seed": 2}}), "eval": {"heldout_pairs": [{"path": str(PKU)}],
          "groups": {"g": ["aligned", "a3"]}}}, "eval.groups.g: 'a3' is not a model this run produces"),
        ({**base(ablations={"a2": {"seed": 2}}), "eval": {"heldout_pairs": [{"path": str(PKU)}],
          "groups": {"g": ["aligned", "a2"], "h": ["base"]},
          "primary": {"treatment": "g", "controls": ["h"], "paired": True}}},
         "eval: primary: paired needs as many runs in 'h' (1) as in 'g' (2), listed pair by pair"),
        ({**base(), "eval": {"heldout_pairs": [{"path": str(PKU)}], "groups": {"g": ["aligned"]},
          "primary": {"treatment": "g", "controls": ["h"]}}}, "eval: primary: 'h' is not a group (groups: g)"),
        ({**base(), "eval": {"heldout_pairs": [{"path": str(PKU)}], "groups": {"g": ["aligned"], "h": ["aligned"]},
          "primary": {"treatment": "g", "controls": ["h"], "measure": "heldout_cost"}}},
         "eval: primary: measure heldout_cost needs eval.heldout_cost_prompts"),
        ({**base(), "eval": {"heldout_pairs": [{"path": str(PKU)}], "groups": {"g": ["aligned"], "h": ["aligned"]},
          "primary": {"treatment": "g", "controls": ["h"], "sources": ["hh.jsonl.gz"]}}},
         f"eval: primary: sources: 'hh.jsonl.gz' is not a heldout_pairs file (files: {PKU.name})"),
        (base(sources=["hh.jsonl"]), f"align.sources: 'hh.jsonl' is not a data.train file (files: {PKU.name})"),
        (base(ablations={"x": {"sources": ["hh.jsonl"]}}), "align.ablations.x.sources: 'hh.jsonl' is not a data.train"),
        (base(sources={"safe": ["hh.jsonl"]}), "align.sources.safe: 'hh.jsonl' is not a data.train file"),
        (base(sources={"harmless": [PKU.name]}), "align.sources: 'harmless' is not a dimension (helpful, safe)"),
        (base(sources={"helpful": []}), "align.sources: helpful: a non-empty list of data.train file names"),
        (base(sources=PKU.name), "align.sources: a list of data.train file names, or {helpful: [files], safe: [files]}"),
        (base(seed="two"), "align.seed: Input should be a valid integer"),
        ({**base(), "seed": 2**32}, "seed: Input should be less than or equal to 4294967295"),
        ({**base(), "data": {"train": [{"path": str(PKU)}], "max_len": 10**30}}, "data.max_len: Input should be less than"),
        (base(batch_size=10**12), "align.batch_size: Input should be less than or equal to 1048576"),
        (base(lambda_max=1e308), "align.lambda_max: Input should be less than or equal to 1000000"),
        ({**base(), "stages": ["distil"]}, "stages.0: Input should be 'rm', 'align', 'distill' or 'eval'"),
        ({**base(), "distill": {"temperature": 0.9}}, "temperature is used only with best_of_n > 1"),
        ({**base(), "distill": {"best_of_n": 0}}, "distill.best_of_n: Input should be greater than or equal to 1"),
        ({**base(), "distill": {"prompts": "none.jsonl"}}, "distill.prompts: file not found"),
        ({**base(), "distill": {"sft": {"lr": 1e-5}}}, "distill.sft.lr: unknown key"),
        ({**base(), "distill": {"ddpo": "yes"}}, "distill.ddpo: Input should be a valid boolean (got 'yes')"),
    ],
)
def test_errors_name_the_field(data, expected):
    assert expected in error_of(data)


def test_distill_defaults_are_zephyrs_dsft():
    distill = validate_recipe(base()).distill
    sft = distill.sft
    assert (sft.learning_rate, sft.epochs, sft.lr_scheduler, sft.warmup_ratio) == (2e-5, 1, "cosine", 0.1)
    assert (distill.best_of_n, distill.ddpo, distill.student, distill.teacher) == (1, False, None, None)


def test_an_ablation_inherits_align_and_changes_only_what_it_names():
    align = validate_recipe(
        base(w=0.3, learning_rate=1e-5, ablations={"dpo_safe": {"loss": "dpo", "dimension": "safe"}})
    ).align
    variant = align.ablation("dpo_safe")
    assert (variant.loss, variant.dimension, variant.learning_rate, variant.w) == ("dpo", "safe", 1e-5, 0.3)
    assert variant.ablations == {} and align.loss == "safe_mm_dpo"


def test_kl_coeff_is_beta_ori():
    assert validate_recipe(base(kl_coeff=0.05)).align.beta_ori == 0.05
    assert validate_recipe(base(kl_coeff=0.05, beta_ori=0.05)).align.beta_ori == 0.05
    recipe = validate_recipe(base(beta=0.05, ablations={"dpo": {"loss": "dpo", "beta": 0.2}}))  # TRL's / OpenRLHF's name
    assert recipe.align.beta_ori == 0.05 and recipe.align.ablation("dpo").beta_ori == 0.2


def test_relative_paths_resolve_against_the_recipe(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "rows.jsonl").write_text(PKU.read_text())
    (tmp_path / "r.yaml").write_text(
        "name: t\nmodel: {policy: models/m, cost_model: models/cost}\ndata: {train: [{path: d/rows.jsonl}]}\n"
        "align: {learning_rate: 5e-7}\n"
    )
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.data.train[0].path == tmp_path / "d" / "rows.jsonl"
    assert recipe.model.policy == str(tmp_path / "models" / "m")
    assert recipe.model.cost_model == str(tmp_path / "models" / "cost")
    assert recipe.align.learning_rate == 5e-7  # YAML 1.1 would read `5e-7` as a string


def test_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base()))
    recipe = load_recipe(path, ["align.lambda_init=2", "data.train.0.max_rows=8", "align.w=1.0e-1"])
    assert (recipe.align.lambda_init, recipe.data.train[0].max_rows, recipe.align.w) == (2.0, 8, 0.1)
    with pytest.raises(SafeAlignError, match="expected KEY=VALUE"):
        load_recipe(path, ["align.lambda_init"])
    with pytest.raises(SafeAlignError, match="data.train.3 is not an item of a 1-item list"):
        load_recipe(path, ["data.train.3.max_rows=1"])
    with pytest.raises(SafeAlignError, match="align.nonsense: unknown key"):
        load_recipe(path, ["align.nonsense=1"])
    with pytest.raises(SafeAlignError, match=r"--set 'model.policy=\{a: 1\}\}': the value is not valid YAML"):
        load_recipe(path, ["model.policy={a: 1}}"])


def test_an_override_changes_one_place_even_through_yaml_anchors(tmp_path):
    text = f"""name: t
model: {{policy: x, cost_model: c}}
data: {{train: [{{path: {PKU}}}]}}
rm:
  helpful: &trainer {{learning_rate: 1.0e-5, batch_size: 8}}
distill:
  sft: *trainer
"""
    (tmp_path / "r.yaml").write_text(text)
    recipe = load_recipe(tmp_path / "r.yaml", ["distill.sft.learning_rate=3e-5"])
    assert (recipe.rm.helpful.learning_rate, recipe.distill.sft.learning_rate) == (1e-5, 3e-5)


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    (tmp_path / "base.yaml").write_text(
        f"name: base\nstages: [rm, align]\nmodel: {{policy: x, dtype: fp32}}\ndata: {{train: [{{path: {PKU}}}]}}\n"
        "align: {lambda_init: 2.0, w: 0.3}\n"
    )
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\nstages: [rm, align]\nalign: {w: 1.0}\n")
    recipe = load_recipe(tmp_path / "child.yaml", ["align.k=0.7"])
    assert (recipe.name, recipe.stages, recipe.model.dtype) == ("child", ["rm", "align"], "fp32")
    assert (recipe.align.lambda_init, recipe.align.w, recipe.align.k) == (2.0, 1.0, 0.7)
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\nname: loop\n")
    with pytest.raises(SafeAlignError, match="extends itself"):
        load_recipe(tmp_path / "loop.yaml")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "far.yaml").write_text("extends: ../base.yaml\nname: far\n")
    with pytest.raises(SafeAlignError, match="must be in the same directory"):
        load_recipe(tmp_path / "sub" / "far.yaml")


def test_an_extending_recipe_can_switch_loss_and_drop_inherited_keys(tmp_path, caplog):
    """docs/extending.md's case: a recipe extending the quickstart switches `align.loss`; λ's inherited
    keys are a warning (they go with the loss), keys it sets itself that the loss does not read are an
    error naming every one, and `null` (in the file or `--set`) removes an inherited key."""
    (tmp_path / "base.yaml").write_text(
        f"name: base\nstages: [rm, align]\nmodel: {{policy: x, dtype: fp32}}\ndata: {{train: [{{path: {PKU}}}]}}\n"
        "align: {lambda_init: 2.0, lambda_lr: 0.3, w: 0.3, epochs: 3}\n"
    )
    (tmp_path / "dpo.yaml").write_text("extends: base.yaml\nname: dpo\nalign: {loss: dpo, epochs: null}\n")
    with caplog.at_level("WARNING", logger="safealign"):
        recipe = load_recipe(tmp_path / "dpo.yaml")
    assert recipe.align.loss == "dpo" and recipe.align.epochs == AlignSection().epochs  # null: back to the default
    assert "align: lambda_init, lambda_lr, w inherited but not used by loss 'dpo'" in caplog.text
    with pytest.raises(SafeAlignError, match=r"align\.k, .*align\.lambda_lr: not used by loss 'dpo' .*remove them"):
        load_recipe(tmp_path / "dpo.yaml", ["align.lambda_lr=0.5", "align.k=0.7"])
    caplog.clear()
    with caplog.at_level("WARNING", logger="safealign"):
        quiet = load_recipe(tmp_path / "dpo.yaml", ["align.lambda_init=null", "align.lambda_lr=null", "align.w=null"])
    assert "lambda_init" not in quiet.align.model_fields_set and "inherited" not in caplog.text
    # without extends every key is the recipe's own: still an error
    (tmp_path / "flat.yaml").write_text(
        f"name: flat\nstages: [rm, align]\nmodel: {{policy: x}}\ndata: {{train: [{{path: {PKU}}}]}}\n"
        "align: {loss: dpo, w: 0.3}\n"
    )
    with pytest.raises(SafeAlignError, match=r"align\.w: not used by loss 'dpo'"):
        load_recipe(tmp_path / "flat.yaml")


def test_ablation_and_sweep_recipes_extend_the_quickstart():
    quick, ablations = load_recipe(ROOT / "recipes/quickstart.yaml"), load_recipe(ROOT / "recipes/ablations.yaml")
    assert ablations.data == quick.data and ablations.rm == quick.rm
    assert ablations.align.model_dump(exclude={"ablations"}) == quick.align.model_dump(exclude={"ablations"})
    assert set(ablations.align.ablations) == {"dpo_helpful", "dpo_safe", "fixed_lambda"}
    sweep = load_recipe(ROOT / "recipes/sweep-lambda-w.yaml")
    assert sweep.sweep.grid == {"align.lambda_init": [0.5, 1.0, 2.0], "align.w": [0.3, 0.5, 1.0]}
    assert (sweep.align.k, sweep.align.epochs, sweep.sweep.select.min_safety) == (0.5, 1, 0.8)


def test_the_mistral_recipe_carries_the_seed_settings():
    recipe = load_recipe(ROOT / "recipes/mistral-7b-beavertails.yaml")
    a = recipe.align
    assert (a.lambda_init, a.w, a.k, a.beta_ori, a.learning_rate, a.batch_size, a.lambda_lr, a.epochs) == (
        1.0, 0.5, 0.5, 0.1, 5e-7, 16, 0.01, 2
    )  # fmt: skip
    assert recipe.model.policy.endswith("Mistral-7B-v0.1") and recipe.distill.student.endswith("TinyLlama-1.1B")
    assert recipe.stages == ["rm", "align", "distill", "eval"] and "llm" in recipe.eval.judges


def test_unreadable_recipes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nalign: [unclosed\n")
    with pytest.raises(SafeAlignError, match=r"bad.yaml:\d+: not valid YAML"):
        load_recipe(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(SafeAlignError, match="must be a YAML mapping"):
        load_recipe(bad)
    with pytest.raises(SafeAlignError, match="recipe file not found"):
        load_recipe(Path(tmp_path / "none.yaml"))


def _schema_keys(model) -> set[str]:
    """Every field name of a pydantic model and of the models nested in it."""
    from typing import get_args

    from pydantic import BaseModel

    keys = set()
    for name, field in model.model_fields.items():
        keys.add(name)
        stack = [field.annotation]
        while stack:
            annotation = stack.pop()
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                keys |= _schema_keys(annotation)
            else:
                stack.extend(get_args(annotation))
    return keys


def test_docs_describe_every_recipe_key():
    from safealign.recipe import Recipe

    documented = (ROOT / "docs" / "recipes.md").read_text()
    missing = sorted(key for key in _schema_keys(Recipe) if f"{key}:" not in documented)
    assert not missing, f"docs/recipes.md does not describe: {missing}"


def test_divisors_without_a_linear_scan():
    """`validate --world-size` names the micro-batch sizes that split a batch: divisors by trial up to √n
    (a batch of 10**12 once made it count to 10**12; sizes are now bounded too)."""
    from safealign.recipe import divisors

    assert divisors(36) == [1, 2, 3, 4, 6, 9, 12, 18, 36] and divisors(1) == [1] and divisors(17) == [1, 17]
    assert len(divisors(2**20)) == 21
