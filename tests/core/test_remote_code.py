"""A model folder that ships Python (config `auto_map`) runs it only with `model.trust_remote_code: true`.

OpenRLHF loads every model with `trust_remote_code=True`; the folder built here would write a marker
file the moment it is imported, so "not run" is observable, not assumed.
"""

from __future__ import annotations

import json
import shutil

import yaml
from support import assert_one_line_error, pku_rows, run_cli, tiny_policy, write_jsonl

CUSTOM_MODULE = '''
import os, pathlib
pathlib.Path(os.environ["MARKER"]).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "custom_llama"


class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig
'''


def remote_code_model(tmp_path, tokenizer_dir):
    """A tiny Llama re-labelled as `custom_llama`, whose classes come from its own `custom_llama.py`."""
    from safealign.models.resolve import build_random
    from safealign.recipe import RandomModel

    base = build_random(RandomModel(tokenizer=str(tokenizer_dir), config={"hidden_size": 32, "intermediate_size": 64}))
    folder = tmp_path / "custom-model"
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="custom_llama",
        auto_map={"AutoConfig": "custom_llama.CustomConfig", "AutoModelForCausalLM": "custom_llama.CustomModel"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom_llama.py").write_text(CUSTOM_MODULE)
    return folder


def write_recipe(tmp_path, policy, **model) -> str:
    recipe = {
        "name": "rc",
        "model": {"policy": str(policy), "dtype": "fp32", **model},
        "data": {"train": [{"path": str(write_jsonl(tmp_path / "d.jsonl", pku_rows(4)))}], "max_len": 64},
        "align": {"lambda_update": "fixed", "batch_size": 2, "micro_batch_size": 1, "epochs": 1},
        "logging": {"tensorboard": False},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return str(tmp_path / "r.yaml")


def test_a_folder_with_code_is_refused_before_anything_loads(tmp_path, tokenizer_dir):
    folder = remote_code_model(tmp_path, tokenizer_dir)
    recipe = write_recipe(tmp_path, folder)
    marker = tmp_path / "marker"
    env = {"MARKER": str(marker)}
    for command in ("validate", "run"):
        result = run_cli(command, recipe, cwd=tmp_path, extra_env=env)
        assert_one_line_error(result, "model.policy", "custom_llama.py", "model.trust_remote_code: true")
    assert not marker.exists()


def test_a_random_model_whose_tokenizer_folder_has_code_is_refused(tmp_path, tokenizer_dir):
    folder = remote_code_model(tmp_path, tokenizer_dir)
    policy = tiny_policy(tokenizer_dir)["policy"]
    policy["random"]["tokenizer"] = str(folder)
    recipe = write_recipe(tmp_path, "unused")
    data = yaml.safe_load(open(recipe))
    data["model"]["policy"] = policy
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    result = run_cli("validate", recipe, cwd=tmp_path, extra_env={"MARKER": str(tmp_path / "marker")})
    assert_one_line_error(result, "model.policy.random.tokenizer", "custom_llama.py")


def test_consent_names_the_files_and_the_model_trains(tmp_path, tokenizer_dir):
    folder = remote_code_model(tmp_path, tokenizer_dir)
    recipe = write_recipe(tmp_path, folder, trust_remote_code=True)
    marker = tmp_path / "marker"
    env = {"MARKER": str(marker)}
    validated = run_cli("validate", recipe, cwd=tmp_path, extra_env=env)
    assert validated.returncode == 0, validated.stderr
    assert "trust_remote_code" in validated.stderr and "custom_llama.py" in validated.stderr
    assert not marker.exists()  # validating names the code; only loading runs it

    ran = run_cli("run", recipe, cwd=tmp_path, extra_env=env)
    assert ran.returncode == 0, ran.stderr
    assert marker.read_text() == "ran"
    assert json.loads((tmp_path / "runs" / "rc" / "align" / "model" / "config.json").read_text())["model_type"] == (
        "custom_llama"
    )


def test_a_random_models_config_takes_only_llama_fields(tmp_path, tokenizer_dir):
    """`random.config: {auto_map: ...}` once passed validate; the model was saved with it, and OpenRLHF's
    trust_remote_code=True load imported the named module (a marker file was written)."""
    policy = tiny_policy(tokenizer_dir)["policy"]
    policy["random"]["config"]["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    recipe = write_recipe(tmp_path, "unused")
    data = yaml.safe_load(open(recipe))
    data["model"]["policy"] = policy
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    result = run_cli("validate", recipe, cwd=tmp_path)
    assert_one_line_error(result, "model.policy.random.config: 'auto_map' is not a LlamaConfig field", "hidden_size")


def test_a_folder_that_gains_code_after_validate_is_refused_where_it_loads(tmp_path, tokenizer_dir, monkeypatch):
    """Consent is checked where a stage resolves a model, not only at validate."""
    import pytest

    from safealign.core.errors import SafeAlignError
    from safealign.models.resolve import resolve_model

    folder = remote_code_model(tmp_path, tokenizer_dir)
    monkeypatch.setenv("MARKER", str(tmp_path / "marker"))
    with pytest.raises(SafeAlignError, match=r"model custom-model: .* ships its own Python \(custom_llama.py\)"):
        resolve_model(str(folder))
    assert resolve_model(str(folder), trust_remote_code=True) == folder  # consent given: resolved (and logged)
    assert not (tmp_path / "marker").exists()
