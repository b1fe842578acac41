"""The distill stage: Zephyr-style distillation of the aligned teacher into a smaller student.

Zephyr's recipe (Tunstall et al. 2023), with the teacher being our aligned model:
1. **Teacher answers.** The teacher (`align/model`, or `distill.teacher`) answers a prompt set — the
   training prompts, deduplicated, or `distill.prompts` — through the eval stage's generation
   backends (vLLM on a GPU, batched HF elsewhere). With `best_of_n > 1` it samples n answers per
   prompt and keeps the one the Helpful-RM prefers among those the cost model calls safe (cost ≤ 0);
   when all n are unsafe, the least costly one. Every record says how its answer was chosen
   (`teacher_answers.jsonl`). Answers are written once, atomically, and reused when the stage resumes.
2. **Student.** `distill.student`, or the teacher with every other layer dropped
   (`models.derive_student`: DistilBERT's initialisation), so a CPU run has a student too.
3. **dSFT.** OpenRLHF's `SFTDataset` (prompt tokens masked) and `SFTTrainer` on its DeepSpeed
   strategy; the student is fully fine-tuned with Zephyr's defaults (lr 2e-5, 1 epoch, cosine,
   warmup 0.1). Answers are text, re-tokenised with the student's own tokenizer and chat template, so
   a student from another model family (another vocabulary) works as well as a derived one.
4. **dDPO** (`distill.ddpo: true`): the align stage's Safe-MM-DPO (`workflows.policy`, same trainer,
   same `align` settings, same scored pairs) on the dSFT student, which is its own reference (Zephyr).

Outputs: `model/` (the student the eval stage evaluates), `teacher_answers.jsonl`, `sft/metrics.jsonl`
(and `ddpo/metrics.jsonl`), and a summary with the teacher's and student's sizes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from safealign.core.errors import SafeAlignError
from safealign.core.files import write_text_atomically
from safealign.core.process import agree, barrier, is_rank_0
from safealign.domain.data import Message, PreferenceRow, load_prompt_file, read_jsonl, unique_prompts
from safealign.domain.generation import GenerationRequest, make_generator
from safealign.models.resolve import count_parameters, derive_student, resolve_model
from safealign.openrlhf.settings import resolve_dtype
from safealign.recipe import Recipe
from safealign.stages import StageContext, cost_model_dir, register_stage, run_once, run_training_rows
from safealign.workflows.heldout import check_not_eval_prompts
from safealign.workflows.inference import score_generated
from safealign.workflows.policy import split_policy_rows, train_policy
from safealign.workflows.student import train_student

log = logging.getLogger("safealign")

ANSWERS = "teacher_answers.jsonl"


def teacher_dir(ctx: StageContext) -> Path:
    """`distill.teacher`, else the aligned model when the recipe aligns, else the base policy."""
    recipe = ctx.recipe
    if recipe.distill.teacher is not None:
        return resolve_model(recipe.distill.teacher, recipe.model.trust_remote_code)
    aligned = ctx.upstream_output("align", "model")
    return aligned if aligned is not None else resolve_model(recipe.model.policy, recipe.model.trust_remote_code)


def prompt_set(ctx: StageContext) -> list[list[Message]]:
    """The prompts the teacher answers: `distill.prompts`, else the training prompts; deduplicated,
    cut to `max_prompts`, and checked against the eval sets."""
    distill = ctx.recipe.distill
    if distill.prompts is not None:
        prompts, what = load_prompt_file(distill.prompts), "distill.prompts"
    else:
        prompts, what = [row.prompt for row in run_training_rows(ctx)], "data.train"
    prompts = unique_prompts(prompts)[: distill.max_prompts]
    check_not_eval_prompts(ctx.recipe, prompts, what)
    return prompts


def pick_answer(rewards: list[float], costs: list[float]) -> tuple[int, bool]:
    """Best-of-n choice: the highest reward among answers with cost ≤ 0 (Safe RLHF's safety verdict);
    when every answer is unsafe, the least costly. Returns (index, whether the choice is safe)."""
    safe = [i for i, cost in enumerate(costs) if cost <= 0]
    if safe:
        return max(safe, key=lambda i: (rewards[i], -i)), True
    return min(range(len(costs)), key=lambda i: (costs[i], i)), False


def _candidate_pairs(prompts: list[list[Message]], candidates: list[list[str]]) -> list[PreferenceRow]:
    """n answers of each prompt as ⌈n/2⌉ response pairs (an odd last one pairs with the first): the
    value models score two responses per forward."""
    rows = []
    for prompt, answers in zip(prompts, candidates):
        for j in range(0, len(answers), 2):
            second = answers[j + 1] if j + 1 < len(answers) else answers[0]
            rows.append(PreferenceRow(prompt=prompt, response_0=answers[j] or " ", response_1=second or " "))
    return rows


def _unpair(scores: list[tuple[float, float]], n: int) -> list[list[float]]:
    """Inverse of `_candidate_pairs`: per prompt, one value per answer."""
    pairs_per_prompt = (n + 1) // 2
    out = []
    for start in range(0, len(scores), pairs_per_prompt):
        values = [v for pair in scores[start : start + pairs_per_prompt] for v in pair]
        out.append(values[:n])
    return out


def rerank(ctx: StageContext, prompts: list[list[Message]], candidates: list[list[str]]) -> list[dict]:
    """Score every candidate with the RM stage's Helpful-RM and cost model; pick one per prompt."""
    recipe = ctx.recipe
    rm = ctx.upstream("rm")
    if rm is None:
        raise SafeAlignError(
            f"distill.best_of_n={recipe.distill.best_of_n} re-ranks with the rm stage's models: add rm to stages "
            "(and run it) or set distill.best_of_n: 1"
        )
    rows, n = _candidate_pairs(prompts, candidates), recipe.distill.best_of_n
    scratch = ctx.work_dir / "scratch"
    rewards = _unpair(score_generated(recipe, rm.output("helpful_rm"), rows, scratch), n)
    costs = _unpair(score_generated(recipe, rm.output("cost_model"), rows, scratch), n)
    shutil.rmtree(scratch, ignore_errors=True)
    records = []
    for answers, r, c in zip(candidates, rewards, costs):
        index, safe = pick_answer(r, c)
        records.append({"answer": answers[index], "chosen": index, "safe_choice": safe, "rewards": r, "costs": c})
    return records


def teacher_answers(ctx: StageContext, teacher: Path) -> list[dict]:
    """One answer per prompt from the teacher (greedy, or best-of-n re-ranked), cached in the work dir."""
    recipe, path = ctx.recipe, ctx.work_dir / ANSWERS
    if agree(path.is_file()):
        log.info("distill: teacher answers from %s (resumed)", path)
        return [record for _, record in read_jsonl(path)]
    distill = recipe.distill
    prompts = prompt_set(ctx)
    n = distill.best_of_n
    log.info("distill: the teacher (%s) answers %d prompts (%s)", teacher, len(prompts),
             "greedy" if n == 1 else f"best of {n} at temperature {distill.temperature}")  # fmt: skip
    dtype = resolve_dtype(recipe.model.dtype)
    generator = make_generator(
        teacher, distill.backend, distill.generation_batch_size, dtype, recipe.seed, recipe.data.input_template,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    temperature = 0.0 if n == 1 else distill.temperature
    requests = [
        GenerationRequest.from_chat(prompt, max_new_tokens=distill.max_new_tokens, temperature=temperature)
        for prompt in prompts
        for _ in range(n)
    ]
    flat = generator.generate(requests)
    generator.close()
    stats = generator.stats
    candidates = [flat[i * n : (i + 1) * n] for i in range(len(prompts))]
    if n == 1:
        chosen = [{"answer": answers[0], "chosen": 0} for answers in candidates]
    else:
        chosen = rerank(ctx, prompts, candidates)
    selection = "greedy" if n == 1 else f"best_of_{n}"
    records = [
        {"prompt": prompt, **choice, "selection": selection, "backend": stats.backend,
         "answers_per_second": round(stats.answers_per_second, 4)}
        for prompt, choice in zip(prompts, chosen)
    ]  # fmt: skip
    empty = sum(1 for r in records if not r["answer"].strip())
    if empty:
        log.warning("distill: %d of %d teacher answers are empty; they are left out of dSFT", empty, len(records))
    if is_rank_0():
        write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    barrier()
    return records


def student_init(recipe: Recipe, teacher: Path, work_dir: Path) -> Path:
    """`distill.student`, or a half-depth copy of the teacher (built once, in the work dir)."""
    if recipe.distill.student is not None:
        student = resolve_model(recipe.distill.student, recipe.model.trust_remote_code)
        _check_student(student, teacher, recipe)
        return student
    target = work_dir / "student-init"
    if is_rank_0():
        derive_student(teacher, target, recipe.model.trust_remote_code)
    barrier()
    return target


def _check_student(student: Path, teacher: Path, recipe: Recipe) -> None:
    """What can be checked before training: context length; a different vocabulary is fine (re-tokenised)."""
    from transformers import AutoConfig, AutoTokenizer

    trusted = recipe.model.trust_remote_code
    config = AutoConfig.from_pretrained(student, trust_remote_code=trusted)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and positions < recipe.data.max_len:
        raise SafeAlignError(
            f"distill.student: {student} handles {positions} positions but data.max_len is {recipe.data.max_len}; "
            "lower data.max_len or choose another student"
        )
    student_vocab = AutoTokenizer.from_pretrained(student, trust_remote_code=trusted).get_vocab()
    if student_vocab != AutoTokenizer.from_pretrained(teacher, trust_remote_code=trusted).get_vocab():
        log.info("distill: the student's tokenizer differs from the teacher's: the teacher's answers are "
                 "re-tokenised with the student's tokenizer and chat template (text-level distillation)")  # fmt: skip
    if count_parameters(student) >= count_parameters(teacher):
        log.warning("distill: the student (%s) is not smaller than the teacher (%s)", student, teacher)


def ddpo_rows(ctx: StageContext) -> list[PreferenceRow]:
    """The align stage's rows for dDPO, without the base policy's cached reference log-probs: the
    student's reference is the dSFT student itself."""
    return [
        dataclasses.replace(row, ref_logps_0=None, ref_logps_1=None, ref_logps_provenance=None)
        for row in run_training_rows(ctx)
    ]


@register_stage("distill")
def run_distill(ctx: StageContext) -> dict:
    """Teacher answers a prompt set; a smaller student learns them (dSFT, optional dDPO)."""
    recipe, out = ctx.recipe, ctx.work_dir
    # What it needs
    teacher = teacher_dir(ctx)
    answers = teacher_answers(ctx, teacher)
    # What it runs
    sft = run_once(out / "sft", lambda: train_student(recipe, answers, student_init(recipe, teacher, out), out / "sft"))
    if is_rank_0():
        shutil.rmtree(out / "student-init", ignore_errors=True)  # a derived student's weights live on in sft/model
    final, ddpo = out / "sft" / "model", None
    if recipe.distill.ddpo:
        log.info("distill: dDPO (align.loss=%s with the align settings) on the dSFT student, its own reference",
                 recipe.align.loss)
        cost_model = cost_model_dir(ctx)

        def ddpo_train() -> dict:
            rows = split_policy_rows(recipe, ddpo_rows(ctx), pairs_from=recipe)
            return train_policy(recipe, rows, final, final, cost_model, out / "ddpo")

        ddpo = run_once(out / "ddpo", ddpo_train)
        final = out / "ddpo" / "model"
    # What it publishes
    chosen = [a for a in answers if "safe_choice" in a]
    return {
        "outputs": {"model": str(final.relative_to(out)), "teacher_answers": ANSWERS, "sft_metrics": "sft/metrics.jsonl",
                    **({"ddpo_metrics": "ddpo/metrics.jsonl"} if ddpo else {})},
        "teacher": str(teacher),
        "student_init": (
            str(resolve_model(recipe.distill.student, recipe.model.trust_remote_code)) if recipe.distill.student is not None
            else "the teacher's even-numbered layers"
        ),
        "teacher_parameters": count_parameters(teacher),
        "student_parameters": count_parameters(final),
        "prompts": len(answers),
        "selection": answers[0]["selection"] if answers else None,
        "unsafe_only_prompts": sum(1 for a in chosen if not a["safe_choice"]) if chosen else None,
        "teacher_answers_per_second": answers[0]["answers_per_second"] if answers else None,
        "sft": sft,
        "ddpo": {k: ddpo[k] for k in ("loss", "steps", "train_pairs", "final_lambda")} if ddpo else None,
    }  # fmt: skip
