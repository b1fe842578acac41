"""Fit the rm stage's pooled cost model (`rm.cost.head: pooled`, safealign.models.pooled_value): the backbone cut
at `rm.cost.layer` reads every training response once, and the linear head is solved on those features
with Safe RLHF's cost loss (`cost_loss.fit_linear_cost_head`). No optimizer steps, no checkpoints: the
features take one forward per response, the solve seconds, so a crash simply reruns it."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from safealign.core.errors import SafeAlignError
from safealign.core.process import agree, barrier, gpu_available, is_rank_0
from safealign.domain.cost_loss import cost_model_loss, cross_validated_l2, fit_linear_cost_head
from safealign.domain.data import PreferenceRow, prompt_folds
from safealign.models.pooled_value import (
    SPEC_FILE,
    TORCH_DTYPES,
    PooledValueModel,
    read_spec,
    save_pooled,
    truncated_backbone,
)
from safealign.openrlhf import engine
from safealign.openrlhf.pair_dataset import PreferencePairDataset
from safealign.openrlhf.scoring import score_pairs
from safealign.openrlhf.settings import build_settings
from safealign.recipe import CostModelSection, Recipe

log = logging.getLogger("safealign")

#: Folds of `l2: auto`'s cross-validation, and its penalty where there are too few pairs to fold.
CV_FOLDS = 5
FALLBACK_L2 = 0.01


def default_layer(depth: int) -> int:
    """Two thirds of the way up, fixed before measuring: harmfulness reads best from middle-to-late layers.
    On SmolLM2-135M (30 layers) every layer from 15 up gave 0.78-0.835 held-out sign accuracy, layer 20
    (this rule) 0.81 (benchmarks/cost_probe.py, docs/rm.md)."""
    return max(1, round(2 * depth / 3))


def pair_features(model: PooledValueModel, dataset: PreferencePairDataset, strategy, batch_size: int,
                  description: str) -> torch.Tensor:  # fmt: skip
    """Both responses' pooled features for every item of `dataset`: `[len(dataset), 2, hidden]` (sharded
    over ranks and merged, like every scoring pass)."""
    return score_pairs(dataset, lambda batch: model.pair(batch, features=True), strategy, batch_size, description)


def label_tensors(dataset: PreferencePairDataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`safer_id`, `safe_0`, `safe_1` of the dataset's items, in item order (cost_loss's encoding)."""
    extras = dataset.extras
    return tuple(torch.tensor([e[key] for e in extras], dtype=torch.long) for key in ("safer_id", "safe_0", "safe_1"))


def fit_pooled_cost_model(
    recipe: Recipe, section: CostModelSection, base_dir: Path, rows: list[PreferenceRow], out: Path
) -> tuple[Path, dict]:
    """Fit on `rows` (each with a safer response; safety signs where the data has them) from `base_dir`;
    the model lands in `out/model`. Returns it and the fit's statistics on its own training rows."""
    target = out / "model"
    if agree((target / SPEC_FILE).is_file()):
        log.info("rm.cost: model already fitted in %s", target)
        return target, read_spec(target)["fit"]
    args = build_settings(recipe, section, out, "rm", model_dir=base_dir)
    strategy = engine.make_strategy(args)
    dtype = TORCH_DTYPES[args.ds.param_dtype]
    depth = AutoConfig.from_pretrained(base_dir, trust_remote_code=recipe.model.trust_remote_code).num_hidden_layers
    layer = section.layer if section.layer is not None else default_layer(depth)
    if layer > depth:
        raise SafeAlignError(f"rm.cost.layer={layer}: {base_dir} has only {depth} decoder layers")
    backbone = truncated_backbone(base_dir, layer, dtype, recipe.model.trust_remote_code)
    tokenizer = engine.load_tokenizer(base_dir, backbone, strategy, padding_side="left")
    dataset = PreferencePairDataset(
        rows, tokenizer, recipe.data.max_len, strategy, recipe.data.input_template, for_reward_model=True
    )
    if len(dataset) == 0:
        raise SafeAlignError(f"rm.cost: no training pair fits data.max_len={recipe.data.max_len}")
    if gpu_available():
        backbone.to(torch.device("cuda", torch.cuda.current_device()))
    model = PooledValueModel(backbone, nn.Linear(backbone.config.hidden_size, 1))
    log.info("rm.cost: pooled head on layer %d of %d, fitted on %d pairs", layer, depth, len(dataset))
    features = pair_features(model, dataset, strategy, recipe.rm.score_batch_size, "rm.cost: reading responses")
    safer, safe_0, safe_1 = label_tensors(dataset)
    l2, cv = section.l2, None
    if l2 == "auto":
        item_rows = [rows[e["row_index"]] for e in dataset.extras]
        folds = torch.tensor(prompt_folds(item_rows, CV_FOLDS, recipe.seed))
        if len(folds.unique()) < CV_FOLDS:  # a handful of pairs: nothing to cross-validate on
            l2 = FALLBACK_L2
            log.info("rm.cost: %d pairs are too few to cross-validate the penalty: l2 %g", len(dataset), l2)
        else:
            l2, cv = cross_validated_l2(features[:, 0], features[:, 1], safer, safe_0, safe_1, folds,
                                        section.regularization)  # fmt: skip
            log.info("rm.cost: l2 %g chosen by %d-fold cross-validation (verdict log-loss %s)", l2, CV_FOLDS,
                     ", ".join(f"{k:g}: {v:.4f}" for k, v in cv.items()))  # fmt: skip
    weight, bias = fit_linear_cost_head(
        features[:, 0], features[:, 1], safer, safe_0, safe_1, section.regularization, l2
    )
    costs = features.float() @ weight + bias
    _, fit = cost_model_loss(costs[:, 0], costs[:, 1], safer, safe_0, safe_1, section.regularization)
    stats = {"layer": layer, "depth": depth, "pairs": len(dataset), "l2": l2, "cv_loss": cv,
             "train_pair_accuracy": round(fit["pair_acc"], 4),
             "train_sign_accuracy": None if math.isnan(fit["sign_acc"]) else round(fit["sign_acc"], 4)}  # fmt: skip
    if is_rank_0():
        staging = target.with_name(target.name + ".saving")
        shutil.rmtree(staging, ignore_errors=True)
        spec = {"kind": "pooled", "pooling": "response_mean", "layer": layer, "depth": depth, "base": str(base_dir),
                "max_len": recipe.data.max_len, "dtype": args.ds.param_dtype, "l2": l2,
                "regularization": section.regularization, "fit": stats}  # fmt: skip
        save_pooled(staging, backbone.to("cpu"), tokenizer, weight, bias, spec)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    barrier()
    return target, stats
