"""Secrets stay where the user put them: the W&B key is read by W&B from its variable and never enters
the settings OpenRLHF uploads as the W&B run's config (visible to everyone who sees the project)."""

from __future__ import annotations

import json
import os

from conftest import run_cli, tiny_recipe

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
