"""`safealign sweep`: the seed's selection rule on hand-made trials, grid validation, and a real Ray Tune
sweep of two tiny trials sharing one rm stage."""

from __future__ import annotations

import json

import pytest
import yaml
from support import PKU, TINY_ALIGN, TINY_TRAINER, pku_rows, run_cli, tiny_policy, write_jsonl

from safealign.core.errors import SafeAlignError
from safealign.orchestration.sweep import TrialResult, _trial_command, select_trial, trial_id
from safealign.recipe import trial_overrides, validate_recipe


def trial(name: str, safety: float | None, helpful: float | None, status: str = "ok") -> TrialResult:
    return TrialResult(name, {"align.w": name}, safety, helpful, status)


def test_one_qualifying_trial_wins_even_if_less_helpful():
    trials = [trial("a", 0.70, 0.9), trial("b", 0.85, 0.4), trial("c", 0.80, 0.8)]  # 0.80 is not > 0.80
    chosen = select_trial(trials, 0.8)
    assert chosen.trial.trial_id == "b" and chosen.qualified
    assert "1 of 3 trials have safety > 80%" in chosen.message


def test_among_several_qualifying_the_most_helpful_wins():
    trials = [trial("a", 0.95, 0.3), trial("b", 0.81, 0.7), trial("c", 0.90, 0.7), trial("d", 0.99, None)]
    chosen = select_trial(trials, 0.8)
    assert chosen.trial.trial_id == "c" and chosen.qualified  # b and c tie on helpfulness: the safer one


def test_when_none_qualifies_the_safest_is_picked_and_that_is_said():
    trials = [trial("a", 0.5, 0.9), trial("b", 0.7, 0.1), trial("c", None, None, "failed"), trial("d", 0.7, 0.2)]
    chosen = select_trial(trials, 0.8)
    assert chosen.trial.trial_id == "d" and not chosen.qualified  # b and d tie on safety: the more helpful
    assert chosen.message.startswith("no trial reached safety > 80%: picked the safest, d (70.0%)")


def test_failed_trials_never_win_and_all_failing_is_an_error():
    assert select_trial([trial("a", 1.0, 1.0, "failed"), trial("b", 0.9, 0.1)], 0.8).trial.trial_id == "b"
    with pytest.raises(SafeAlignError, match="no trial finished"):
        select_trial([trial("a", None, None, "failed")], 0.8)


def test_a_trial_drops_the_sweep_after_the_users_overrides_even_one_that_reshapes_the_grid(tmp_path):
    """`safealign sweep r.yaml --set sweep.grid=…` (a smaller grid, as tests/test_readme.py shrinks the
    README's sweep): the child run must not see a sweep section again, or `run` refuses the recipe."""
    command = _trial_command(tmp_path / "r.yaml", tmp_path / "t", ["align"], {"align.w": 0.5},
                             ["sweep.grid={align.w: [0.5]}", "align.k=1"], gpus=1)  # fmt: skip
    sets = [command[i + 1] for i, word in enumerate(command) if word == "--set"]
    assert sets == ["sweep.grid={align.w: [0.5]}", "align.k=1", "align.w=0.5", "sweep=null"]


def test_grid_expansion_and_trial_ids():
    grid = {"align.lambda_init": [0.5, 1.0, 2.0], "align.w": [0.3, 0.5, 1.0]}
    combos = trial_overrides(grid)
    assert len(combos) == 9 and combos[1] == {"align.lambda_init": 0.5, "align.w": 0.5}
    assert trial_id(combos[1]) == "lambda_init=0.5,w=0.5"
    assert len({trial_id(c) for c in combos}) == 9


def test_a_swept_rm_key_gives_every_trial_its_own_rm_stage(tmp_path):
    from safealign.orchestration.sweep import _prepare_trial_dir, shared_stages

    data = sweep_recipe({"align.w": [0.3, 1.0]})
    data["stages"] = ["rm", "align", "eval"]
    assert shared_stages(validate_recipe(data)) == ["rm"]
    data["sweep"]["grid"] = {"rm.cost.layer": [1, 2]}
    assert shared_stages(validate_recipe(data)) == []
    (tmp_path / "rm").mkdir()  # an rm stage from an earlier sweep in the same run directory
    _prepare_trial_dir(tmp_path, tmp_path / "trials" / "t", shared=[])
    assert not (tmp_path / "trials" / "t" / "rm").exists() and (tmp_path / "trials" / "t" / "cache").is_symlink()


def sweep_recipe(grid: dict, **extra) -> dict:
    return {"name": "s", "model": {"policy": "x", "cost_model": "c"}, "data": {"train": [{"path": str(PKU)}]},
            "stages": ["align", "eval"], "sweep": {"grid": grid, **extra}}  # fmt: skip


@pytest.mark.parametrize(
    "grid, expected",
    [
        ({"align.lamda_init": [1.0]}, "sweep trial align.lamda_init=1.0: align.lamda_init: unknown key"),
        ({"align.lambda_init": [1.0, -2.0]}, "sweep trial align.lambda_init=-2.0: align.lambda_init: Input should be greater than or equal to 0.000001"),
        ({"align.lambda_init": []}, "sweep.grid.align.lambda_init: List should have at least 1 item"),
        ({}, "sweep.grid: give at least one key to sweep"),
        ({"stages": [["rm"]]}, "stages: name, stages and sweep cannot be swept"),
    ],
)  # fmt: skip
def test_every_trial_of_the_grid_is_validated_up_front(grid, expected):
    with pytest.raises(SafeAlignError) as info:
        validate_recipe(sweep_recipe(grid), source="r.yaml")
    assert expected in str(info.value)


@pytest.mark.slow
def test_a_ray_tune_sweep_shares_the_rm_stage_and_selects_a_trial(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "pku.jsonl", pku_rows(16))
    recipe = {
        "name": "sw",
        "stages": ["rm", "align", "eval"],
        "model": tiny_policy(tokenizer_dir),
        "data": {"train": [{"path": "pku.jsonl"}], "max_len": 256},
        "rm": {"helpful": TINY_TRAINER, "cost": {}, "eval_fraction": 0.0, "reference_logps": True},
        "align": TINY_ALIGN,
        "eval": {"beavertails_per_category": 1, "mt_bench_per_category": 1, "max_new_tokens": 4,
                 "judges": ["cost_model", "refusal"]},
        "logging": {"tensorboard": False},
        "sweep": {"grid": {"align.lambda_init": [0.5, 2.0], "align.w": [0.0]}, "select": {"judge": "cost_model"}},
    }  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(recipe))
    result = run_cli("sweep", "sweep.yaml", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    out = tmp_path / "runs" / "sw"
    summary = json.loads((out / "sweep" / "results.json").read_text())
    ids = [t["trial_id"] for t in summary["trials"]]
    assert ids == ["lambda_init=0.5,w=0.0", "lambda_init=2.0,w=0.0"]
    assert all(t["status"] == "ok" and 0.0 <= t["safety"] <= 1.0 for t in summary["trials"])
    assert summary["selected"] in ids and summary["message"] in result.stdout
    for tid in ids:  # each trial aligned with its own λ_init on the one shared rm stage
        trial_dir = out / "trials" / tid
        assert (trial_dir / "rm").is_symlink() and (trial_dir / "rm").resolve() == (out / "rm").resolve()
        run = yaml.safe_load((trial_dir / "recipe.yaml").read_text())
        assert run["align"]["lambda_init"] == float(tid.split(",")[0].split("=")[1]) and "sweep" not in run
        assert (trial_dir / "eval" / "results.json").is_file()
    assert not (out / "align").exists()  # only the shared stage ran in the sweep directory
    assert (out / "sweep" / "heatmap.png").read_bytes().startswith(b"\x89PNG")
    assert "| lambda_init=0.5,w=0.0 | 0.5 | 0.0 |" in (out / "sweep" / "table.md").read_text()
    # The same sweep in parts, as a Kubernetes Indexed Job runs it: one grid point per process, then the rule.
    (out / "trials" / ids[1] / "result.json").unlink()
    select = run_cli("sweep", "sweep.yaml", "--part", "select", cwd=tmp_path)
    assert select.returncode == 0 and "| failed |" in (out / "sweep" / "table.md").read_text()  # trial 1: not run
    trial = run_cli("sweep", "sweep.yaml", "--part", "trial", "--trial-index", "1", cwd=tmp_path, timeout=600)
    assert trial.returncode == 0, trial.stderr[-2000:]
    assert json.loads((out / "trials" / ids[1] / "result.json").read_text())["params"] == {
        "align.lambda_init": 2.0,
        "align.w": 0.0,
    }
    select = run_cli("sweep", "sweep.yaml", "--part", "select", cwd=tmp_path)
    assert json.loads((out / "sweep" / "results.json").read_text())["selected"] == summary["selected"]


@pytest.mark.slow
def test_sweep_parts_check_their_inputs(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "pku.jsonl", pku_rows(4))
    recipe = {
        "name": "sw", "stages": ["rm", "align", "eval"], "model": tiny_policy(tokenizer_dir),
        "data": {"train": [{"path": "pku.jsonl"}]},
        "sweep": {"grid": {"align.lambda_init": [0.5, 2.0]}, "select": {"judge": "cost_model"}},
    }  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(recipe))
    for args, message in [
        (["--part", "trial", "--trial-index", "2"], "--trial-index 2: the grid has trials 0..1"),
        (["--part", "trial", "--trial-index", "0"], "shared stage(s) rm not run yet"),
        (["--trial-index", "0"], "--trial-index goes with --part trial"),
    ]:
        result = run_cli("sweep", "sweep.yaml", *args, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-500:]
