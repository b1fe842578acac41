"""The distill stage on tiny random models: teacher answers, derived or foreign students, dSFT that learns.

A random 4-layer teacher answers 16 PKU prompts; the student (2 layers, derived from it) is trained on
those answers through OpenRLHF's SFTTrainer. "Learns" is checked twice: the stage's own loss falls, and
the student's log-likelihood of the teacher's answers, recomputed here with plain transformers, rises
over the untrained student's. (best-of-n, dDPO and the eval stage's student are covered by the
rm → align → distill → eval pipeline in test_eval_stage.py.)
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from support import build_tokenizer, kill_when, pku_rows, run_cli, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from safealign.models.resolve import build_random, derive_student
from safealign.recipe import RandomModel

pytestmark = pytest.mark.slow

# Untied: a tiny random model with tied embeddings copies its last input token ("\\n" after the chat
# template) forever, and its answers strip to nothing.
TEACHER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "tie_word_embeddings": False}
SFT = {"learning_rate": 3e-3, "batch_size": 4, "micro_batch_size": 2, "epochs": 4, "warmup_ratio": 0.0,
       "lr_scheduler": "constant"}  # fmt: skip


def distill_recipe(root, tokenizer_dir, **distill) -> str:
    write_jsonl(root / "pku.jsonl", pku_rows(16))
    recipe = {
        "name": "d",
        "stages": ["distill"],
        "model": {
            "policy": {"random": {"tokenizer": str(tokenizer_dir), "config": TEACHER, "seed": 0}},
            "dtype": "fp32",
        },
        "data": {"train": [{"path": "pku.jsonl"}], "max_len": 256},
        "distill": {"max_new_tokens": 24, "sft": SFT, **distill},
        "logging": {"tensorboard": False},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return "recipe.yaml"


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("distill")
    result = run_cli("run", distill_recipe(root, tokenizer_dir), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, root / "runs" / "d" / "distill", result


def answer_logprob(model_dir, records) -> float:
    """Mean per-token log-likelihood of the teacher's answers given their prompts (chat template)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for record in records:
        prompt = tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
        answer = record["answer"] + tokenizer.eos_token
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + tokenizer(answer, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        token_logps = logps.gather(-1, ids[0, 1:, None])[:, 0][len(p_ids) - 1 :]
        total, count = total + token_logps.sum().item(), count + token_logps.numel()
    return total / count


def test_teacher_answers_every_training_prompt_once(distilled):
    _, stage, _ = distilled
    records = [json.loads(line) for line in (stage / "teacher_answers.jsonl").read_text().splitlines()]
    prompts = {r["prompt"] for r in pku_rows(16)}
    assert len(records) == len(prompts) and {r["prompt"][0]["content"] for r in records} == prompts
    assert all(r["selection"] == "greedy" and r["backend"] == "hf" and r["answer"] for r in records)


def test_the_derived_student_is_half_the_teacher(distilled):
    _, stage, _ = distilled
    summary = json.loads((stage / "stage.json").read_text())
    assert summary["outputs"]["model"] == "sft/model"
    student = AutoModelForCausalLM.from_pretrained(stage / "sft" / "model")
    assert student.config.num_hidden_layers == 2
    assert summary["student_parameters"] < summary["teacher_parameters"]
    assert not (stage / "student-init").exists()  # the init copy is not kept beside the trained student


def test_dsft_loss_falls_and_the_student_learns_the_teachers_answers(distilled, tokenizer_dir, tmp_path):
    _, stage, result = distilled
    records = [json.loads(line) for line in (stage / "teacher_answers.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (stage / "sft" / "metrics.jsonl").read_text().splitlines()]
    expected = len(records) * 4 // 4  # answers × 4 epochs / batch 4 (OpenRLHF's windows span epochs)
    assert [s["step"] for s in steps] == list(range(1, expected + 1))
    assert json.loads((stage / "stage.json").read_text())["sft"]["steps"] == expected
    first, last = steps[0]["loss"], sum(s["loss"] for s in steps[-3:]) / 3
    assert last < first - 1.0, (first, last)
    teacher = build_random(RandomModel(tokenizer=str(tokenizer_dir), config=TEACHER, seed=0))
    untrained = derive_student(teacher, tmp_path / "init")
    before, after = answer_logprob(untrained, records), answer_logprob(stage / "sft" / "model", records)
    assert after > before + 1.0, (before, after)
    assert "distill: dSFT of" in result.stderr


def test_a_student_with_another_tokenizer_is_trained_on_re_tokenised_answers(tmp_path, tokenizer_dir):
    """Answers are text: a student with a 300-token vocabulary learns them through its own tokenizer.
    (Had the teacher's 512-token ids been fed to it, its embedding lookup would fail.)"""
    other = build_tokenizer(tmp_path / "other-tokenizer", vocab_size=300)
    student = {"random": {"tokenizer": str(other), "config": {"hidden_size": 32, "intermediate_size": 64}}}
    result = run_cli("run", distill_recipe(tmp_path, tokenizer_dir, student=student, max_prompts=8), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "re-tokenised with the student's tokenizer" in result.stderr
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "d" / "distill" / "sft" / "model")
    assert trained.config.vocab_size == 300
    assert len((tmp_path / "runs/d/distill/teacher_answers.jsonl").read_text().splitlines()) == 8


def test_a_student_without_a_chat_template_is_a_clear_error(tmp_path, tokenizer_dir):
    bare = build_tokenizer(tmp_path / "bare-tokenizer", chat_template=None)
    student = {"random": {"tokenizer": str(bare), "config": {"hidden_size": 32, "intermediate_size": 64}}}
    result = run_cli("run", distill_recipe(tmp_path, tokenizer_dir, student=student, max_prompts=4), cwd=tmp_path)
    assert result.returncode == 2
    assert "distill.student has no chat template: set data.input_template" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_interrupted_distill_stage_resumes_from_its_checkpoint(tmp_path, tokenizer_dir, distilled):
    """SIGKILL distill once the student's dSFT has a checkpoint; the rerun reuses the cached teacher
    answers and the derived student, resumes the dSFT, and ends where an uninterrupted run ends."""
    recipe = distill_recipe(tmp_path, tokenizer_dir, sft={**SFT, "checkpoint_steps": 1})
    partial = tmp_path / "runs/d/.distill.partial"

    def checkpointed() -> bool:
        metrics = partial / "sft" / "metrics.jsonl"
        return metrics.exists() and len(metrics.read_text().splitlines()) >= 6 and (
            partial / "sft" / "checkpoints" / "latest"
        ).exists()

    kill_when(["run", recipe], tmp_path, checkpointed)
    result = run_cli("run", recipe, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher answers from" in result.stderr and "resumed from" in result.stderr
    _, straight, _ = distilled
    ours = tmp_path / "runs/d/distill"
    answers = lambda d: [json.loads(line)["answer"] for line in (d / "teacher_answers.jsonl").read_text().splitlines()]  # noqa: E731
    assert answers(ours) == answers(straight)
    final = lambda d: [m for m in map(json.loads, (d / "sft/metrics.jsonl").read_text().splitlines()) if "loss" in m]  # noqa: E731
    assert [m["step"] for m in final(ours)] == [m["step"] for m in final(straight)]
    assert final(ours)[-1]["loss"] == pytest.approx(final(straight)[-1]["loss"], rel=1e-4)
