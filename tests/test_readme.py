"""The README's "Use it" commands, executed as written from a directory laid out like a fresh clone.

Each line that needs no GPU or cluster runs with exactly its words, shrunk by `--set` overrides
appended after them (`conftest.shrink_overrides`: a tiny random model and a few rows, the recipe's
structure kept); then what the line promises is checked in what it wrote. The GPU line (torchrun on 8
GPUs) is validated for its 8 ranks instead, and `validate my-recipe.yaml` (the user's own recipe) on the
quickstart's. A README pointing at a renamed recipe, a key that no longer exists or a wrong flag fails here.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from support import ROOT, run_cli, shrink_overrides


def use_it_commands() -> list[list[str]]:
    """The commands of the README's first code block under "## Use it", comments stripped."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.split("#")[0].strip()]


COMMANDS = use_it_commands()
TRAINING = [words for words in COMMANDS if words[:2] in (["safealign", "run"], ["safealign", "sweep"])]


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A working directory laid out as the repository's root (recipes/, data/), so relative paths in the
    README and in the recipes resolve as they do for a user, and runs/ lands in the test's directory."""
    for name in ("recipes", "data"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def test_the_block_starts_in_the_venv_make_quickstart_made():
    assert COMMANDS[0] == ["source", ".venv/bin/activate"]
    assert "VENV ?= .venv" in (ROOT / "Makefile").read_text()


def test_every_line_is_executed_or_validated_below():
    """A new README line needs a check here; a dropped one should be a decision, not an accident."""
    others = [w for w in COMMANDS[1:] if w not in TRAINING]
    assert [w[1] for w in others if w[0] == "safealign"] == ["validate", "losses"]
    assert [w[0] for w in others if w[0] != "safealign"] == ["torchrun"]
    assert sorted(Path(w[2]).stem for w in TRAINING) == sorted(CHECKS)


def test_validate_and_losses_as_written(clone):
    validate = next(w for w in COMMANDS if w[1:2] == ["validate"])
    assert validate[2] == "my-recipe.yaml"  # the user's own recipe: a placeholder, the quickstart's stands in
    result = run_cli("validate", "recipes/quickstart.yaml", *validate[3:], cwd=clone)
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_cli("losses", cwd=clone)
    assert result.returncode == 0 and {"dpo", "mm_dpo", "safe_mm_dpo"} <= {line.split()[0] for line in result.stdout.splitlines()}


def test_the_gpu_line_validates_for_its_eight_ranks(clone):
    words = next(w for w in COMMANDS if w[0] == "torchrun")
    assert words[:3] == ["torchrun", "--nproc_per_node", "8"]
    args = words[words.index("safealign.cli") + 1 :]
    assert args[0] == "run"
    result = run_cli("validate", *args[1:], "--world-size", "8", cwd=clone)
    assert result.returncode == 0, result.stderr[-2000:]


def check_quickstart(run: Path, words: list[str]) -> None:
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    for override in [words[i + 1] for i, word in enumerate(words) if word == "--set"]:  # the line's own
        key, value = override.split("=", 1)
        section, name = key.split(".")
        assert recipe[section][name] == yaml.safe_load(value), override
    for stage in ("rm", "align", "distill", "eval"):
        assert (run / stage / "stage.json").is_file(), stage
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"base", "aligned", "student"}
    assert results["settings"]["judges"] == ["cost_model", "refusal"]
    held = results["reward_models"]["heldout_pairs"]["cost"]  # the pooled cost model, measured where it counts
    assert held["responses"] > 0 and held["sign_interval"][0] <= held["sign_accuracy"] <= held["sign_interval"][1]
    for model in results["models"].values():  # the held-out measure, on rows after the training ones
        assert {"helpful", "safe"} <= set(model["heldout"])
        assert 0 < model["heldout"]["helpful"]["likelihood"]["n"] <= 6  # PKU rows only
        assert model["heldout"]["helpful"]["likelihood"]["n"] < model["heldout"]["safe"]["likelihood"]["n"] <= 12
    page = (run / "eval" / "report.html").read_text()
    assert "Teacher vs student (distill)" in page and "Held-out preference pairs" in page
    assert page.count("data:image/png;base64,") == 5  # 2 held-out planes, trade-off, categories, training


def check_ablations(run: Path, words: list[str]) -> None:
    align = json.loads((run / "align" / "stage.json").read_text())
    assert {name: a["loss"] for name, a in align["ablations"].items()} == {
        "dpo_helpful": "dpo", "dpo_safe": "dpo", "fixed_lambda": "safe_mm_dpo"}  # fmt: skip
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"base", "aligned", "dpo_helpful", "dpo_safe", "fixed_lambda"}
    page = (run / "eval" / "report.html").read_text()
    assert all(name in page for name in results["models"])


def check_evidence(run: Path, words: list[str]) -> None:
    """Its data split, its 12 runs (4 variants × 3 seeds), groups, primary test and held-out Ĵ_C."""
    results = json.loads((run / "eval" / "results.json").read_text())
    align = json.loads((run / "align" / "stage.json").read_text())
    runs = {"aligned", *align["ablations"]}
    assert len(runs) == 12 and set(results["models"]) == {"base", *runs}
    # every run trains on one common subset of at most 8 pairs (fewer if a prompt fills max_len)
    assert {s["train_pairs"] for s in align["ablations"].values()} == {align["train_pairs"]} and align["train_pairs"] <= 8
    assert all(0 < m["heldout_cost"]["n"] <= 4 for m in results["models"].values())
    tests = results["group_tests"]
    assert set(tests["groups"]) == {"safe_mm_dpo", "flipped", "shuffled", "fixed_lambda"}
    assert tests["primary"]["tests"] == 4  # 2 controls × 2 held-out sources (HH-RLHF, PKU-SafeRLHF)
    assert all(len(g["safe · harmless-base-test.jsonl.gz"]["runs"]) == 3 for g in tests["groups"].values())
    page = (run / "eval" / "report.html").read_text()
    assert "The pre-registered test" in page and "Held-out Ĵ_C" in page


def check_sweep(run: Path, words: list[str]) -> None:
    summary = json.loads((run / "sweep" / "results.json").read_text())
    ids = [t["trial_id"] for t in summary["trials"]]
    assert ids == ["lambda_init=0.5,w=0.3", "lambda_init=2.0,w=0.3"]  # the shrunk grid: λ_init's corners
    assert all(t["status"] == "ok" for t in summary["trials"]) and summary["selected"] in ids
    assert (run / "sweep" / "heatmap.png").read_bytes().startswith(b"\x89PNG")


CHECKS = {"quickstart": check_quickstart, "ablations": check_ablations, "evidence": check_evidence,
          "sweep-lambda-w": check_sweep}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("words", TRAINING, ids=lambda words: Path(words[2]).stem)
def test_a_training_line_runs_as_written(words, clone, tokenizer_dir):
    """The line's own words first, the shrinking overrides after them (a later --set wins only for keys
    the line does not set itself: the shrink never touches λ or w)."""
    recipe = clone / words[2]
    result = run_cli(*words[1:], *shrink_overrides(recipe, tokenizer_dir), cwd=clone, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    name = yaml.safe_load(recipe.read_text())["name"]
    CHECKS[Path(words[2]).stem](clone / "runs" / name, words)
