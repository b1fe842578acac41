"""The threat model's checkable rules (docs/security.md): secrets stay where the user put them, and the
plugin's own code never runs what it reads (no eval/exec, no pickle, no shell, no unsafe YAML, no
`torch.load` that unpickles, no hard-coded `trust_remote_code=True`)."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
from support import PKU, ROOT, run_cli, tiny_recipe

PLUGIN = ROOT / "plugin" / "safealign"

#: A stand-in for Weights & Biases (a paid service, not reachable here) that records what it is handed.
#: Like wandb, it finds its key in $WANDB_API_KEY by itself.
FAKE_WANDB = '''
import json, os

def _record(kind, payload):
    with open(os.environ["FAKE_WANDB_RECORD"], "a") as out:
        out.write(json.dumps({"kind": kind, "payload": payload}, default=repr) + "\\n")

class _Api:
    @property
    def api_key(self):
        return os.environ.get("WANDB_API_KEY")

api = _Api()
login = lambda key=None, **kwargs: _record("login", {"key": key})
init = lambda **kwargs: _record("init", kwargs)
define_metric = lambda *args, **kwargs: None
log = lambda data, **kwargs: _record("log", data)
finish = lambda: None
'''


def test_the_wandb_key_never_reaches_the_logged_config(tmp_path, tokenizer_dir, scored_rows):
    fake = tmp_path / "fake" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_WANDB)
    record = tmp_path / "wandb.jsonl"
    secret, judge_secret = "wandb-secret-9f2c41", "judge-secret-77ab0e"
    recipe = tiny_recipe(tmp_path, tokenizer_dir, scored_rows, logging={"tensorboard": False, "wandb_project": "p"})
    env = {
        "PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]),
        "FAKE_WANDB_RECORD": str(record),
        "WANDB_API_KEY": secret,
        "JUDGE_API_KEY": judge_secret,
    }
    result = run_cli("run", str(recipe), cwd=tmp_path, extra_env=env)
    assert result.returncode == 0, result.stderr

    calls = [json.loads(line) for line in record.read_text().splitlines()]
    kinds = [call["kind"] for call in calls]
    assert "init" in kinds and "log" in kinds  # W&B is on: the run and its metrics reach it
    assert "login" not in kinds  # W&B found the key itself
    logged = record.read_text()
    assert secret not in logged and judge_secret not in logged
    assert "WANDB_API_KEY" in logged  # the field that switches W&B on names where the key is


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _keyword(call: ast.Call, name: str):
    return next((ast.unparse(k.value) for k in call.keywords if k.arg == name), None)


@pytest.mark.parametrize("path", sorted(PLUGIN.rglob("*.py")), ids=lambda p: str(p.relative_to(PLUGIN)))
def test_the_plugin_never_runs_what_it_reads(path):
    for call, name in _calls(path):
        where = f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(call)[:80]}"
        assert name not in ("eval", "exec", "compile", "__import__", "os.system", "os.popen"), where
        assert not name.startswith(("pickle.", "marshal.", "shelve.")), where
        assert _keyword(call, "shell") in (None, "False"), where
        assert _keyword(call, "trust_remote_code") != "True", where  # the recipe's consent only
        if name == "torch.load":
            assert _keyword(call, "weights_only") == "True", where
        if name == "yaml.load":
            assert _keyword(call, "Loader") in ("RecipeLoader", "yaml.SafeLoader"), where


def test_wandb_is_checked_before_anything_loads(tmp_path, monkeypatch):
    """`logging.wandb_project` once failed with `No module named 'wandb'` after the models loaded: the
    package and a key (env, `wandb login`'s netrc entry, or offline mode) are checked at validate and run."""
    import safealign.recipe.checks as recipe_module
    from safealign.core.errors import SafeAlignError
    from safealign.recipe import check_wandb, validate_recipe

    recipe = validate_recipe({"name": "t", "model": {"policy": "x", "cost_model": "c"}, "data": {"train": [{"path": str(PKU)}]},
                              "logging": {"wandb_project": "p"}})  # fmt: skip
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(recipe_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SafeAlignError, match=r"the wandb package is not installed: pip install 'safealign\[wandb\]'"):
        check_wandb(recipe)
    monkeypatch.setattr(recipe_module.importlib.util, "find_spec", lambda name: object())  # installed
    (tmp_path / "netrc").write_text("machine example.com login u password p\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(SafeAlignError, match=r"no W&B key: run `wandb login`, export WANDB_API_KEY, or set WANDB_MODE=offline"):
        check_wandb(recipe)
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password k\n")  # what `wandb login` writes
    (tmp_path / "netrc").chmod(0o600)
    check_wandb(recipe)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_wandb(recipe)
