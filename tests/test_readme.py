"""The README's "Use it" commands, as written: each `safealign` line either runs (when it is quick and
needs no GPU or cluster) or has its recipe and `--set` overrides validated exactly as the line gives
them, so a README pointing at a renamed recipe, a key that no longer exists or a wrong flag fails here.

Shrunk, not run: training lines (`run`, `sweep`, the torchrun line) take minutes to hours on a CPU; the
quickstart itself runs end to end in tests/test_quickstart.py.
"""

from __future__ import annotations

import re
import shlex

from conftest import ROOT, run_cli


def use_it_commands() -> list[list[str]]:
    """The commands of the README's first code block under "## Use it", comments stripped."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.split("#")[0].strip()]


def test_every_use_it_command_works_as_written(tmp_path):
    commands = use_it_commands()
    assert commands[0] == ["source", ".venv/bin/activate"]
    assert "VENV ?= .venv" in (ROOT / "Makefile").read_text()  # the venv `make quickstart` creates
    checked = []
    for words in commands[1:]:
        if words[:3] == ["torchrun", "--nproc_per_node", "8"]:  # a GPU node: validated for its 8 ranks
            words = ["safealign", *words[words.index("safealign.cli") + 1 :], "--world-size", "8"]
        assert words[0] == "safealign", words
        command, args = words[1], words[2:]
        if command == "losses":
            result = run_cli("losses", cwd=ROOT)
            assert result.returncode == 0 and {"dpo", "mm_dpo", "safe_mm_dpo"} <= {
                line.split()[0] for line in result.stdout.splitlines()
            }
        elif command == "validate" and args[0] == "my-recipe.yaml":  # the user's own recipe: a placeholder
            result = run_cli("validate", str(ROOT / "recipes/quickstart.yaml"), *args[1:], cwd=ROOT)
            assert result.returncode == 0, result.stderr[-2000:]
        else:
            assert command in ("run", "sweep"), words
            world = args[args.index("--world-size") :] if "--world-size" in args else []
            rest = [a for a in args if a not in world]
            result = run_cli("validate", *rest, *world, cwd=ROOT)
            assert result.returncode == 0, (words, result.stderr[-2000:])
        checked.append(command)
    assert checked.count("run") >= 3 and "sweep" in checked and "losses" in checked
