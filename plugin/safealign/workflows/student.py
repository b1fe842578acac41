"""dSFT: a student fine-tuned on a teacher's answers through OpenRLHF's `SFTDataset` and `SFTTrainer`."""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import Dataset

from safealign.core.errors import SafeAlignError
from safealign.domain.data import flatten_messages
from safealign.openrlhf import SFTDataset, engine
from safealign.openrlhf.settings import build_settings
from safealign.recipe import Recipe
from safealign.trainers.sft import DistillSFTTrainer

log = logging.getLogger("safealign")


def sft_records(answers: list[dict], chat: bool) -> list[dict]:
    """OpenRLHF `SFTDataset` inputs: chat messages when the student formats with its chat template,
    else flat prompt text for `data.input_template` (the same flattening training and generation use)."""
    records = []
    for record in answers:
        if not record["answer"].strip():
            continue
        if chat:
            records.append({"prompt": record["prompt"], "answer": [{"role": "assistant", "content": record["answer"]}]})
        else:
            records.append({"prompt": flatten_messages(record["prompt"]), "answer": record["answer"]})
    return records


def train_student(recipe: Recipe, answers: list[dict], student: Path, out: Path) -> dict:
    """dSFT of `student` on the teacher's `answers` with `distill.sft`; the student lands in `out/model`
    (fully fine-tuned: `model.lora` is the policy's)."""
    section = recipe.distill.sft
    # What it needs
    args = build_settings(recipe, section, out, "sft", model_dir=student, model_field="distill.student")
    strategy = engine.make_strategy(args)
    model = engine.load_actor(student, args, strategy, trainable=True)
    tokenizer = engine.load_tokenizer(student, model, strategy)
    records = sft_records(answers, chat=args.data.apply_chat_template)
    if not records:
        raise SafeAlignError("distill: every teacher answer is empty; check the teacher and distill.max_new_tokens")
    dataset = SFTDataset(
        Dataset.from_list(records), tokenizer, recipe.data.max_len, strategy, recipe.data.input_template,
        num_processors=None,  # in-process: datasets forks a pool for any num_proc >= 1 (see pair_dataset)
    )  # fmt: skip
    if len(dataset) < len(records):
        log.warning("distill: dropped %d of %d examples whose prompt fills data.max_len=%d",
                    len(records) - len(dataset), len(records), recipe.data.max_len)  # fmt: skip
    loader = strategy.setup_dataloader(dataset, section.micro_batch_size, False, True, dataset.collate_fn)
    # OpenRLHF's SFT loop carries gradient-accumulation windows across epochs: size the schedule as it does.
    total_steps = len(loader) * section.epochs // strategy.accumulated_gradient
    if total_steps == 0:
        raise SafeAlignError(
            f"distill.sft.batch_size={section.batch_size} exceeds the {len(dataset)} usable teacher answers "
            "× epochs; lower it or answer more prompts"
        )
    model, optimizer, scheduler = strategy.prepare((model, engine.optimizer_config(args, total_steps)))
    # What it runs
    consumed = engine.resume_state(strategy, model, args).get("consumed_samples", 0)
    log.info("distill: dSFT of %s on %d teacher answers, %d steps × %d examples",
             student, len(dataset), total_steps, section.batch_size)  # fmt: skip
    trainer = DistillSFTTrainer(
        model, strategy, optimizer, loader, scheduler, tokenizer, settings=args, metrics_path=out / "metrics.jsonl"
    )
    trainer.fit(args, consumed, max(1, len(loader) // strategy.accumulated_gradient))
    # What it publishes
    engine.publish_model(strategy, model, tokenizer, args, out / "model")
    engine.release(model)
    return {"examples": len(dataset), "steps": total_steps}
