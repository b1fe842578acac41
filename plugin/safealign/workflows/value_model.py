"""Train one value-head model (the Helpful-RM or the cost model) on response pairs, resumably."""

from __future__ import annotations

import logging
from pathlib import Path

from safealign.core.errors import SafeAlignError
from safealign.core.process import agree
from safealign.domain.data import PreferenceRow
from safealign.openrlhf import engine
from safealign.openrlhf.pair_dataset import PreferencePairDataset
from safealign.openrlhf.pair_sampler import pair_loader
from safealign.openrlhf.settings import build_settings
from safealign.recipe import Recipe, RewardModelSection

log = logging.getLogger("safealign")


def train_value_model(
    recipe: Recipe, field: str, section: RewardModelSection, base_dir: Path, trainer_cls,
    rows: list[PreferenceRow], out: Path, **trainer_kwargs,
) -> Path:  # fmt: skip
    """Train `trainer_cls` (a `PairValueTrainer`) from `base_dir` on `rows`; the model lands in
    `out/model`, which is returned. `field` names the recipe section (e.g. `rm.cost`) in messages."""
    target = out / "model"
    if agree((target / "config.json").is_file()):
        log.info("%s: model already trained in %s", field, target)
        return target
    # What the model needs
    args = build_settings(recipe, section, out, "rm", model_dir=base_dir)
    strategy = engine.make_strategy(args)
    model = engine.load_value_model(base_dir, args, strategy, trainable=True)
    engine.freeze_below(model, section.trainable_layers, f"{field}.trainable_layers")
    tokenizer = engine.load_tokenizer(base_dir, model, strategy, padding_side="left")
    dataset = PreferencePairDataset(
        rows, tokenizer, recipe.data.max_len, strategy, recipe.data.input_template, for_reward_model=True
    )
    steps_per_epoch = len(dataset) // section.batch_size
    if steps_per_epoch == 0:
        raise SafeAlignError(f"{field}.batch_size={section.batch_size} exceeds the {len(dataset)} usable training pairs")
    loader = pair_loader(strategy, dataset, section)
    model, optimizer, scheduler = strategy.prepare(
        (model, engine.optimizer_config(args, steps_per_epoch * section.epochs))
    )
    # What it runs
    consumed = engine.resume_state(strategy, model, args).get("consumed_samples", 0)
    log.info("%s: training on %d pairs, %d steps", field, len(dataset), steps_per_epoch * section.epochs)
    trainer = trainer_cls(
        model, strategy, optimizer, loader, None, scheduler, tokenizer,
        settings=args, metrics_path=out / "metrics.jsonl", **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(args, consumed, steps_per_epoch)
    # What it publishes
    engine.publish_model(strategy, model, tokenizer, args, target)
    engine.release(model)
    return target
