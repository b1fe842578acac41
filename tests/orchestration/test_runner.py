"""The runner's contract, with a stand-in stage (no training): atomic outputs, skip, resume, force."""

from __future__ import annotations

import json

import pytest
from support import PKU

from safealign.core.errors import SafeAlignError
from safealign.core.pipeline import StageSpec
from safealign.orchestration.runner import run_stage
from safealign.recipe import validate_recipe
from safealign.stages import Stage


def recipe(**align):
    return validate_recipe(
        {"name": "t", "model": {"policy": "x", "cost_model": "c"}, "data": {"train": [{"path": str(PKU)}]}, "align": align}
    )


class FlakyStage:
    """Writes a file, then fails the first `failures` times it runs; records what it saw."""

    def __init__(self, failures: int = 0) -> None:
        self.failures, self.calls, self.seen_previous_work = failures, 0, []

    def __call__(self, ctx) -> dict:
        self.calls += 1
        self.seen_previous_work.append((ctx.work_dir / "progress.txt").exists())
        (ctx.work_dir / "progress.txt").write_text(f"call {self.calls}")
        if self.calls <= self.failures:
            raise RuntimeError("pre-empted")
        return {"outputs": {"progress": "progress.txt"}, "calls": self.calls}


def stage(fn) -> Stage:
    return Stage(spec=StageSpec("align", sections=("align",)), run=fn, description="stand-in")


def test_failure_publishes_nothing_and_the_rerun_resumes_the_partial_work(tmp_path, caplog):
    fn = FlakyStage(failures=1)
    with pytest.raises(RuntimeError):
        run_stage(recipe(), tmp_path, stage(fn))
    assert not (tmp_path / "align").exists()
    assert (tmp_path / ".align.partial" / "fingerprint").exists()

    caplog.set_level("INFO")
    summary = run_stage(recipe(), tmp_path, stage(fn))
    assert fn.seen_previous_work == [False, True]  # the second run found the first one's work
    assert "resuming the unfinished run" in caplog.text
    assert summary["calls"] == 2 and not (tmp_path / ".align.partial").exists()
    assert json.loads((tmp_path / "align" / "stage.json").read_text()) == summary
    assert (tmp_path / "align" / "progress.txt").read_text() == "call 2"


def test_up_to_date_stage_is_skipped_and_a_changed_recipe_starts_clean(tmp_path, caplog):
    fn = FlakyStage()
    first = run_stage(recipe(), tmp_path, stage(fn))
    assert run_stage(recipe(), tmp_path, stage(fn)) == {**first, "up_to_date": True} and fn.calls == 1
    assert run_stage(recipe(), tmp_path, stage(fn), force=True)["calls"] == 2

    failing = FlakyStage(failures=1)
    with pytest.raises(RuntimeError):
        run_stage(recipe(lambda_init=2.0), tmp_path, stage(failing))
    assert (tmp_path / "align" / "stage.json").exists()  # the old finished outputs are untouched
    other = FlakyStage()
    run_stage(recipe(lambda_init=3.0), tmp_path, stage(other))  # yet another recipe: the partial is discarded ...
    assert other.seen_previous_work == [False]
    assert "align: discarding the unfinished work in" in caplog.text  # ... and the log says so, and why
    assert "the recipe, data or SafeAlign version changed since it started; 0 MiB)" in caplog.text


def test_an_operational_change_after_a_crash_resumes_instead_of_discarding(tmp_path, caplog):
    """Checkpointing more often after a kill (or asking the judge more patiently) changes how the stage
    runs, not what it produces: the partial work is resumed, not thrown away without a word."""
    failing = FlakyStage(failures=1)
    with pytest.raises(RuntimeError):
        run_stage(recipe(checkpoint_steps=50), tmp_path, stage(failing))
    caplog.set_level("INFO")
    run_stage(recipe(checkpoint_steps=5), tmp_path, stage(failing))
    assert failing.seen_previous_work == [False, True] and "discarding" not in caplog.text
    assert run_stage(recipe(checkpoint_steps=0), tmp_path, stage(failing))["up_to_date"]  # 0: never checkpoint


def test_operational_fields_are_left_out_of_the_fingerprint_in_every_section():
    from safealign.recipe import results_dump

    dumped = results_dump(validate_recipe({
        "name": "t", "stages": ["rm", "align"], "model": {"policy": "x"}, "data": {"train": [{"path": str(PKU)}]},
        "rm": {"helpful": {"learning_rate": 1e-5, "checkpoint_steps": 7}},
        "eval": {"llm_judge": {"url": "https://j/v1", "model": "m", "retries": 9}},
    }))  # fmt: skip
    assert "checkpoint_steps" not in dumped["align"] and "checkpoint_steps" not in dumped["rm"]["helpful"]
    assert dumped["rm"]["helpful"]["learning_rate"] == 1e-5
    assert "retries" not in dumped["eval"]["llm_judge"] and dumped["eval"]["llm_judge"]["model"] == "m"
    assert "checkpoint_steps" not in dumped["distill"]["sft"]
    with pytest.raises(SafeAlignError, match=r"align\.checkpoint_steps: use 0 for never \(null removes an inherited key\)"):
        recipe(checkpoint_steps=None)


def test_a_setting_added_off_changes_the_fingerprint_only_when_set():
    """A setting added after runs existed (`ADDED_OFF`) whose default reproduces what ran before: at that
    default it is not in the fingerprint — upgrading SafeAlign then resumes a half-run stage instead of
    discarding it (a 50-step pilot was one upgrade from losing its work) — and set, it counts."""
    from safealign.recipe import results_dump

    def sampling(**keys) -> dict:
        return results_dump(recipe(lambda_update="fixed", cost_sampling=keys).align)["cost_sampling"]

    assert "in_fixed_runs" not in sampling(prompts=8) and "in_fixed_runs" not in sampling(in_fixed_runs=False)
    assert sampling(in_fixed_runs=True)["in_fixed_runs"] is True and sampling(prompts=8)["prompts"] == 8


def test_logging_changes_do_not_invalidate_a_stage(tmp_path):
    fn = FlakyStage()
    run_stage(recipe(), tmp_path, stage(fn))
    quieter = recipe()
    quieter.logging.tensorboard = False
    run_stage(quieter, tmp_path, stage(fn))
    assert fn.calls == 1


AGREE_SCRIPT = """
import os, sys, torch.distributed as dist
from safealign.core.process import agree, barrier, init_process_group, leave_process_group
init_process_group()
rank = dist.get_rank()
decided = agree({"seen_by": rank})          # each rank sees something else; rank 0's view wins
barrier()
with open(f"rank{rank}.txt", "w") as out:  # one file per rank: two processes' prints interleave on one pipe
    out.write(f"{rank} {decided['seen_by']} {dist.get_backend()}")
leave_process_group()
"""


def test_under_a_launcher_the_group_exists_before_any_stage_and_rank_0_decides(tmp_path):
    """What the runner relies on under torchrun: `init_process_group` (called by `safealign run` before the
    runner) makes `barrier` real from the first line, and `agree` hands every rank rank 0's decision."""
    from support import torchrun

    script = tmp_path / "agree.py"
    script.write_text(AGREE_SCRIPT)
    result = torchrun(str(script), cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["0 0 gloo", "1 0 gloo"]


class Killed(BaseException):
    """A SIGKILL at a chosen instruction (BaseException: nothing on the way may swallow it)."""


@pytest.mark.parametrize("kill_at", [("rename", 1), ("rename", 2), ("unlink", 1)], ids=["set-aside", "move-in", "marker"])
def test_a_kill_while_publishing_loses_neither_the_old_outputs_nor_the_new(tmp_path, monkeypatch, kill_at):
    """--force over finished outputs, killed at each step of publishing the new ones: the run dir always
    holds a finished stage, and the next run publishes the new one without training it again."""
    run_stage(recipe(), tmp_path, stage(FlakyStage()))
    new = FlakyStage()
    new.calls = 10
    operation, nth = kill_at
    original, count = getattr(type(tmp_path), operation), {"n": 0}

    def dying(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] == nth:
            raise Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), operation, dying)
    with pytest.raises(Killed):
        run_stage(recipe(), tmp_path, stage(new), force=True)
    monkeypatch.undo()
    old_kept = (tmp_path / "align" / "stage.json").is_file() or (tmp_path / ".align.stale" / "stage.json").is_file()
    assert old_kept or (tmp_path / "align" / "progress.txt").read_text() == "call 11"

    summary = run_stage(recipe(), tmp_path, stage(new))
    assert new.calls == 11 and summary["calls"] == 11  # published, not trained again
    assert (tmp_path / "align" / "progress.txt").read_text() == "call 11"
    assert not (tmp_path / ".align.partial").exists() and not (tmp_path / "align" / "fingerprint").exists()


def test_a_stage_reads_upstream_outputs_only_through_their_recorded_summary(tmp_path):
    """The stage contract: the recorded `outputs` of a stage the recipe runs; None for one it does not;
    one-line errors for an unfinished stage, a missing or escaping output, a damaged summary."""
    from safealign.core.errors import SafeAlignError
    from safealign.stages import StageContext

    run = tmp_path / "run"
    with_rm = validate_recipe(
        {"name": "t", "stages": ["rm", "align"], "model": {"policy": "x"}, "data": {"train": [{"path": str(PKU)}]}}
    )
    ctx = StageContext(recipe=with_rm, run_dir=run, work_dir=run / ".align.partial")
    assert StageContext(recipe=recipe(), run_dir=run, work_dir=run).upstream_output("rm", "scored") is None
    with pytest.raises(SafeAlignError, match="rm is not finished: run the rm stage first"):
        ctx.upstream("rm")
    (run / "rm").mkdir(parents=True)
    (run / "rm" / "stage.json").write_text(json.dumps({"outputs": {"scored": "scored.jsonl", "evil": "../../x"}}))
    assert ctx.upstream_output("rm", "scored") == run / "rm" / "scored.jsonl"
    with pytest.raises(SafeAlignError, match="records no output 'cost_model'"):
        ctx.upstream_output("rm", "cost_model")
    with pytest.raises(SafeAlignError, match="points outside the stage directory"):
        ctx.upstream_output("rm", "evil")
    (run / "rm" / "stage.json").write_text("[]")
    with pytest.raises(SafeAlignError, match="damaged"):
        ctx.upstream("rm")


def test_a_folder_that_is_not_a_run_is_refused_untouched(tmp_path):
    """`safealign run recipe.yaml --run-dir .` in a project holding an `align/` folder once deleted it and
    overwrote the user's commented recipe.yaml. Only a directory SafeAlign made is ever written."""
    from safealign.core.errors import SafeAlignError
    from safealign.orchestration.runner import RUN_MARKER, claim_run_dir, run_recipe

    project = tmp_path / "project"
    (project / "align").mkdir(parents=True)
    (project / "align" / "notes.md").write_text("mine")
    (project / "recipe.yaml").write_text("# my comments\nname: t\n")
    with pytest.raises(SafeAlignError, match=r"project: holds files that are not a SafeAlign run \(align, recipe.yaml\); "
                       r"a run writes recipe.yaml and replaces <stage>/ folders there: give --run-dir a new or empty"):
        run_recipe(recipe(), project, ["align"])
    assert (project / "recipe.yaml").read_text() == "# my comments\nname: t\n" and (project / "align" / "notes.md").is_file()
    assert sorted(p.name for p in project.iterdir()) == ["align", "recipe.yaml"]  # not even a lock file left

    for fresh in (tmp_path / "new" / "run", tmp_path / "empty"):  # new or empty: claimed
        (tmp_path / "empty").mkdir(exist_ok=True)
        claim_run_dir(fresh)
        assert (fresh / RUN_MARKER).is_file()
    legacy = tmp_path / "legacy"  # a run dir from before the marker: a finished stage in it
    (legacy / "rm").mkdir(parents=True)
    (legacy / "rm" / "stage.json").write_text("{}")
    claim_run_dir(legacy)
    assert (legacy / RUN_MARKER).is_file()


@pytest.mark.parametrize("name", ["evidence.yaml", "quickstart.yaml", "confirm-hh.yaml"])
def test_the_recipe_a_run_writes_runs_again_as_the_same_recipe(name):
    """runs/<name>/recipe.yaml is a recipe: it used to dump every default, and the validator refused the
    ones the other settings do not use (rm.cost.batch_size under the pooled head, distill.temperature with
    one greedy answer), so `safealign run runs/x/recipe.yaml` failed on every shipped recipe."""
    import yaml
    from support import ROOT

    from safealign.orchestration.runner import recipe_as_run
    from safealign.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / name)
    text = recipe_as_run(recipe)
    assert text.startswith("# as run by SafeAlign ")
    dumped = yaml.safe_load(text)
    assert "batch_size" not in dumped.get("rm", {}).get("cost", {})  # a default the pooled head does not use
    assert validate_recipe(dumped, source="recipe.yaml") == recipe
