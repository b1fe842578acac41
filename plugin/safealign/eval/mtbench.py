"""MT-Bench: the 80 two-turn questions and FastChat's single-answer grading prompts and rating parser.

Judging follows FastChat's `llm_judge` exactly: `single-v1` (and `single-v1-multi-turn`) for most
categories, `single-math-v1` (with the GPT-4 reference answer) for math, reasoning and coding; the
judge ends with a rating in `[[n]]`, parsed with FastChat's two patterns. FastChat's per-category
sampling temperatures are used when generating answers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parents[3] / "data" / "mt-bench"

#: FastChat `llm_judge/common.py` temperature_config.
TEMPERATURES = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
#: Categories graded against a reference answer (FastChat's NEED_REF_CATS).
NEEDS_REFERENCE = {"math", "reasoning", "coding"}

_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(judgment: str) -> float | None:
    """FastChat's rule: the first `[[n]]`, else the first `[n]`; None when neither is there (or out of 0..10)."""
    match = _RATING.search(judgment) or _RATING_BACKUP.search(judgment)
    if not match:
        return None
    rating = float(match.group(1))
    return rating if 0 <= rating <= 10 else None


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None

    @property
    def temperature(self) -> float:
        return TEMPERATURES.get(self.category, 0.7)


def load_questions(data: Path = DATA) -> list[Question]:
    references = {}
    for line in (data / "reference_answer_gpt-4.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        references[row["question_id"]] = tuple(row["choices"][0]["turns"])
    questions = []
    for line in (data / "question.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        questions.append(
            Question(row["question_id"], row["category"], tuple(row["turns"]), references.get(row["question_id"]))
        )
    return questions


def load_judge_prompts(data: Path = DATA) -> dict[str, dict]:
    return {
        row["name"]: row
        for row in map(json.loads, (data / "judge_prompts.jsonl").read_text(encoding="utf-8").splitlines())
    }


def judge_messages(question: Question, answers: tuple[str, str], turn: int, prompts: dict[str, dict]) -> list[dict]:
    """The chat messages FastChat sends its judge for one question, turn 1 or 2 (1-based)."""
    math_like = question.category in NEEDS_REFERENCE and question.reference is not None
    name = ("single-math-v1" if math_like else "single-v1") + ("-multi-turn" if turn == 2 else "")
    template = prompts[name]
    fields = {"question": question.turns[0], "answer": answers[0]}
    if turn == 2:
        fields = {
            "question_1": question.turns[0],
            "question_2": question.turns[1],
            "answer_1": answers[0],
            "answer_2": answers[1],
        }
    if math_like:
        if turn == 2:
            fields.update(ref_answer_1=question.reference[0], ref_answer_2=question.reference[1])
        else:
            fields["ref_answer_1"] = question.reference[0]
    return [
        {"role": "system", "content": template["system_prompt"]},
        {"role": "user", "content": template["prompt_template"].format(**fields)},
    ]
