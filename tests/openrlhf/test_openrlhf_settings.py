"""Our OpenRLHF settings against OpenRLHF's own CLI parsers, and the settings object's contract.

OpenRLHF 0.11.2 builds its argument parsers inside `if __name__ == "__main__":`, so the test runs each
CLI module as `__main__` with `ArgumentParser.parse_args` replaced by a function that hands the parser
back: the parser is OpenRLHF's, field for field, with its defaults. An upgrade that adds a field our
settings lack, or drops one we set, fails here instead of drifting silently.
"""

from __future__ import annotations

import argparse
import runpy
from pathlib import Path

import openrlhf.cli
import pytest
from support import PKU, TINY_TRAINER, tiny_policy

from safealign.openrlhf.settings import Settings, build_settings, for_fit, settings_fields
from safealign.recipe import Recipe


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def openrlhf_fields(cli: str, monkeypatch) -> dict[str, object]:
    """Dotted dest -> default of OpenRLHF's `cli` (train_dpo, train_rm, train_sft) argument parser."""

    def hand_back(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", hand_back)
    with pytest.raises(_Parsed) as caught:
        runpy.run_path(str(Path(openrlhf.cli.__file__).parent / f"{cli}.py"), run_name="__main__")
    return {a.dest: a.default for a in caught.value.parser._actions if a.dest != "help"}


def recipe_for(tokenizer_dir: Path, **model) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "parity",
            "model": {**tiny_policy(tokenizer_dir), **model},
            "data": {"train": [{"path": str(PKU)}], "max_len": 128},
            "align": TINY_TRAINER,
            "logging": {"tensorboard": False},
        }
    )


@pytest.mark.parametrize("kind, cli", [("dpo", "train_dpo"), ("rm", "train_rm"), ("sft", "train_sft")])
def test_settings_carry_exactly_the_fields_of_openrlhfs_parser(kind, cli, tokenizer_dir, tmp_path, monkeypatch):
    fields = openrlhf_fields(cli, monkeypatch)
    assert len(fields) > 70  # the parser was really found (71 common fields in 0.11.2)
    recipe = recipe_for(tokenizer_dir)
    ours = build_settings(recipe, recipe.align, tmp_path, kind, model_dir=tokenizer_dir).flat()
    missing, unknown = sorted(set(fields) - set(ours)), sorted(set(ours) - set(fields))
    assert not missing, f"OpenRLHF's {cli} defines fields our settings lack: {missing}"
    assert not unknown, f"our settings set fields OpenRLHF's {cli} does not know: {unknown}"
    # Where the recipe has no say, OpenRLHF's own default (the fields we fill differently are named).
    ours_by_choice = {
        "adam.lr", "adam.betas", "adam.weight_decay", "max_norm", "lr_scheduler", "lr_warmup_ratio", "min_lr_ratio",
        "train.seed", "train.micro_batch_size", "train.batch_size", "train.max_epochs", "ds.zero_stage",
        "ds.param_dtype", "ds.attn_implementation", "ds.lora.rank", "ds.lora.alpha", "ds.lora.target_modules",
        "ds.lora.dropout", "ds.adam_offload", "model.model_name_or_path", "ref.model_name_or_path", "model.beta",
        "data.apply_chat_template", "data.input_template", "data.max_len", "data.prompt_key", "data.chosen_key",
        "data.rejected_key", "data.input_key", "data.output_key", "logger.tensorboard_dir", "logger.wandb.project",
        "logger.wandb.run_name", "ckpt.path", "ckpt.save_steps", "ckpt.max_num", "ckpt.max_mem", "ckpt.load_enable",
        "ckpt.output_dir", "ds.value_head_prefix", "muon.ns_steps", "muon.nesterov",
        "model.gradient_checkpointing_enable",
    }  # fmt: skip
    differing = {k for k in fields if k not in ours_by_choice and ours[k] != fields[k]}
    assert not differing, {k: (ours[k], fields[k]) for k in differing}


def test_settings_follow_the_recipe(tokenizer_dir, tmp_path):
    recipe = recipe_for(tokenizer_dir, lora={"rank": 4, "alpha": 8})
    dpo = build_settings(recipe, recipe.align, tmp_path, "dpo", model_dir=tokenizer_dir)
    assert dpo.train.batch_size == TINY_TRAINER["batch_size"] and dpo.adam.lr == TINY_TRAINER["learning_rate"]
    assert dpo.ds.param_dtype == "fp32" and dpo.data.apply_chat_template is True  # the tokenizer has a template
    assert dpo.ds.lora.rank == 4 and dpo.model.beta == recipe.align.beta_ori
    # LoRA is the policy's: value models and the student are fully fine-tuned.
    assert build_settings(recipe, recipe.align, tmp_path, "rm", model_dir=tokenizer_dir).ds.lora.rank == 0
    assert build_settings(recipe, recipe.align, tmp_path, "sft", model_dir=tokenizer_dir).ds.lora.rank == 0


def test_the_fields_are_assembled_purely_from_what_build_settings_decided(tokenizer_dir, tmp_path):
    """build_settings decides what needs the machine or files (dtype, attention, the chat template, W&B);
    settings_fields only assembles: the same decisions give the same fields, and other decisions show."""
    recipe = recipe_for(tokenizer_dir)
    built = build_settings(recipe, recipe.align, tmp_path, "dpo", model_dir=tokenizer_dir).flat()
    decided = {"dtype": "fp32", "attention": "sdpa", "chat_template": True, "wandb_key": None}
    fields = settings_fields(recipe, recipe.align, tmp_path, "dpo", model_dir=tokenizer_dir, reference_dir=None, **decided)
    assert fields == built
    other = settings_fields(recipe, recipe.align, tmp_path, "dpo", model_dir=tokenizer_dir, reference_dir=None,
                            **{**decided, "dtype": "bf16", "chat_template": False})  # fmt: skip
    assert {k for k in fields if fields[k] != other[k]} == {"ds.param_dtype", "data.apply_chat_template"}


def test_settings_are_frozen_and_derived_by_copy(tokenizer_dir, tmp_path):
    recipe = recipe_for(tokenizer_dir)
    settings = build_settings(recipe, recipe.align, tmp_path, "dpo", model_dir=tokenizer_dir)
    with pytest.raises(AttributeError, match="frozen"):
        settings.eval.steps = 3
    with pytest.raises(AttributeError, match="frozen"):
        settings.max_norm = 0.0
    fitted = for_fit(settings, steps_per_epoch=7)
    assert (fitted.eval.steps, settings.eval.steps) == (7, -1)  # the original is untouched
    assert isinstance(fitted, Settings) and fitted.train.batch_size == settings.train.batch_size
    with pytest.raises(KeyError, match="no OpenRLHF setting 'eval.stpes'"):
        settings.replace(**{"eval.stpes": 1})


def test_the_engine_loads_the_policy_as_the_settings_say(tokenizer_dir, tmp_path):
    """Gradient checkpointing and LoRA reach OpenRLHF's Actor from the frozen settings (no other route)."""
    from types import SimpleNamespace as NS

    from safealign.models.resolve import resolve_model
    from safealign.openrlhf.engine import load_actor

    recipe = recipe_for(tokenizer_dir, gradient_checkpointing=True, lora={"rank": 4, "alpha": 8})
    policy = resolve_model(recipe.model.policy)
    settings = build_settings(recipe, recipe.align, tmp_path, "dpo", model_dir=policy)
    strategy = NS(get_ds_train_config=lambda: None, get_ds_eval_config=lambda offload=False: None)
    actor = load_actor(policy, settings, strategy, trainable=True)
    assert actor.model.is_gradient_checkpointing
    assert any("lora_A" in name for name, _ in actor.model.named_parameters())
    reference = load_actor(policy, settings, strategy, trainable=False)
    assert not reference.model.is_gradient_checkpointing and reference._offload is False
