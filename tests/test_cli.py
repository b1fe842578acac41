"""The `safealign` command: bad input exits non-zero with one line and no traceback."""

from __future__ import annotations

import pytest
import yaml

from conftest import assert_one_line_error, pku_rows, run_cli, write_jsonl


def write_recipe(tmp_path, data_path, **align) -> str:
    recipe = {
        "name": "t",
        "model": {"policy": "unused/dir", "cost_model": "unused/cost-model"},
        "data": {"train": [{"path": str(data_path)}]},
        "align": align,
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return str(tmp_path / "r.yaml")


def test_help_explains_commands(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for word in ("run", "validate", "losses", "torchrun"):
        assert word in result.stdout
    run_help = run_cli("run", "--help", cwd=tmp_path).stdout
    assert "--stage" in run_help and "--set" in run_help and "resume" in run_help


def test_losses_lists_builtins(tmp_path):
    result = run_cli("losses", cwd=tmp_path)
    assert result.returncode == 0
    assert {line.split()[0] for line in result.stdout.splitlines()} >= {"dpo", "mm_dpo", "safe_mm_dpo"}


def test_validate_ok(tmp_path):
    result = run_cli("validate", write_recipe(tmp_path, write_jsonl(tmp_path / "d.jsonl", pku_rows(5))), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and "5 training pairs" in result.stdout


def test_malformed_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("name: t\nmodel: {policy: x\n")
    assert_one_line_error(run_cli("validate", "r.yaml", cwd=tmp_path), "r.yaml:", "not valid YAML")


def test_unknown_key(tmp_path):
    path = write_recipe(tmp_path, write_jsonl(tmp_path / "d.jsonl", pku_rows(2)), lambda_intt=2)
    assert_one_line_error(run_cli("validate", path, cwd=tmp_path), "align.lambda_intt: unknown key")


def test_missing_recipe_and_bad_override(tmp_path):
    assert_one_line_error(run_cli("run", "nope.yaml", cwd=tmp_path), "recipe file not found")
    path = write_recipe(tmp_path, write_jsonl(tmp_path / "d.jsonl", pku_rows(2)))
    assert_one_line_error(run_cli("run", path, "--set", "align.epochs=two", cwd=tmp_path), "align.epochs")


@pytest.mark.parametrize(
    "rows, fragments",
    [
        ([], ("no usable rows",)),
        ([{**pku_rows(1)[0], "safer_response_id": 3}], ("d.jsonl:1", "safer_response_id must be 0, 1 or -1")),
        ([{**pku_rows(1)[0], "delta_h": float("nan")}], ("d.jsonl:1", "delta_h is nan")),
    ],
    ids=["empty-dataset", "bad-id", "nan-margin"],
)
def test_bad_data_stops_run_with_one_line(tmp_path, rows, fragments):
    path = write_recipe(tmp_path, write_jsonl(tmp_path / "d.jsonl", rows))
    assert_one_line_error(run_cli("run", path, cwd=tmp_path), *fragments)
    assert not (tmp_path / "runs" / "t" / "align").exists()


def test_validate_checks_the_batches_split_over_a_world_size():
    """The seed recipe on one 8-GPU node validates; on two nodes (16 ranks) its batch of 16 at micro-batch
    2 cannot split, and the error says which sizes would."""
    from conftest import ROOT

    seed = str(ROOT / "recipes" / "mistral-7b-beavertails.yaml")
    ok = run_cli("validate", seed, "--world-size", "8", cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert_one_line_error(
        run_cli("validate", seed, "--world-size", "16", cwd=ROOT),
        "rm.helpful.batch_size=16 does not split over 16 processes × micro_batch_size 2: use a multiple of 32 "
        "(e.g. 32), or micro_batch_size 1",
    )
    fixed = run_cli("validate", seed, "--world-size", "16", "--set", "rm.helpful.micro_batch_size=1",
                    "--set", "rm.cost.micro_batch_size=1", "--set", "align.micro_batch_size=1",
                    "--set", "distill.sft.micro_batch_size=1", cwd=ROOT)  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    assert_one_line_error(run_cli("validate", seed, "--world-size", "0", cwd=ROOT), "--world-size 0: must be at least 1")


def test_a_job_that_asks_for_gpus_refuses_to_train_without_one(tmp_path):
    """The charts set SAFEALIGN_REQUIRE_GPU=1 on GPU Jobs: no visible GPU is a one-line error, exit 2."""
    path = write_recipe(tmp_path, write_jsonl(tmp_path / "d.jsonl", pku_rows(5)))
    result = run_cli("run", path, cwd=tmp_path, extra_env={"SAFEALIGN_REQUIRE_GPU": "1"})
    assert_one_line_error(result, "SAFEALIGN_REQUIRE_GPU=1 (this Job asks for GPUs) but no GPU is visible")
    assert not (tmp_path / "runs").exists()  # refused before anything was written
