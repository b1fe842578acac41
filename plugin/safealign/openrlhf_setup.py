"""Configure OpenRLHF for one training stage: process group, its args namespace, strategy, models.

OpenRLHF's trainers and `DeepspeedStrategy` read a nested namespace built by its CLI parsers. We build
the same namespace from the recipe (every field those code paths read, with OpenRLHF's CLI defaults
where the recipe has no say), so the training runs through OpenRLHF's own objects rather than a copy.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace as NS

import torch

from safealign import compat
from safealign._openrlhf import Actor, DeepspeedStrategy, get_llm_for_sequence_regression, get_strategy, get_tokenizer
from safealign.errors import SafeAlignError
from safealign.process import barrier, ensure_process_env
from safealign.recipe import Recipe, TrainingSection

log = logging.getLogger("safealign")


def resolve_dtype(choice: str) -> str:
    """`auto`: bf16 on GPUs and on CPUs with native bf16 (e.g. AVX512-BF16/AMX), else fp32.

    fp16 is never chosen: it does not train on DeepSpeed's CPU accelerator and needs loss scaling on GPUs.
    """
    if choice == "auto":
        if compat.gpu_available():
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            choice = (
                "bf16"
                if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                else "fp32"
            )
    if choice == "fp32":
        compat.enable_fp32()
    return choice


def resolve_attention(choice: str) -> str:
    """`auto`: FlashAttention 2 where a GPU and the flash-attn package are present, else PyTorch SDPA."""
    if choice != "auto":
        if choice == "flash_attention_2" and not compat.gpu_available():
            raise SafeAlignError("model.attn_implementation: flash_attention_2 needs a GPU; use auto or sdpa")
        return choice
    if compat.gpu_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


#: What OpenRLHF's `logger.wandb.key` holds instead of the key. Its trainers switch W&B on when the
#: field is set, log in with it only when W&B has no key of its own, and upload the whole settings
#: object as the run's config (readable by anyone who sees the project). So the field names where the
#: key is, never the key: W&B reads $WANDB_API_KEY itself (checked to be set below).
WANDB_KEY_FROM_ENV = "$WANDB_API_KEY"


def openrlhf_args(recipe: Recipe, training: TrainingSection, out_dir: Path) -> NS:
    """The namespace OpenRLHF's strategy, Actor, datasets and trainers read, filled from the recipe.

    `data.apply_chat_template` is settled by `configure_prompt_format` once the tokenizer is loaded.
    """
    wandb_key = None
    if recipe.logging.wandb_project:
        if not os.environ.get("WANDB_API_KEY"):
            raise SafeAlignError(
                "logging.wandb_project is set but $WANDB_API_KEY is empty; export it or unset the project"
            )
        wandb_key = WANDB_KEY_FROM_ENV
    lora = recipe.model.lora
    return NS(
        local_rank=-1,
        use_ms=False,
        optim="adam",
        max_norm=training.max_norm,
        lr_scheduler=training.lr_scheduler,
        lr_warmup_ratio=training.warmup_ratio,
        min_lr_ratio=training.min_lr_ratio,
        adam=NS(lr=training.learning_rate, betas=(0.9, 0.95), eps=1e-8, weight_decay=training.weight_decay),
        muon=NS(lr=0.02, momentum=0.95, ns_steps=5, nesterov=True),
        train=NS(
            seed=recipe.seed,
            micro_batch_size=training.micro_batch_size,
            batch_size=training.batch_size,
            max_epochs=training.epochs,
            full_determinism_enable=False,
            dynamic_batch_enable=False,
        ),
        ds=NS(
            zero_stage=recipe.deepspeed.zero_stage,
            param_dtype=resolve_dtype(recipe.model.dtype),
            attn_implementation=resolve_attention(recipe.model.attn_implementation),
            adam_offload=recipe.deepspeed.adam_offload,
            zpg=1,
            packing_samples=False,
            ring_attn_size=1,
            ring_attn_head_stride=1,
            tensor_parallel_size=1,
            use_universal_ckpt=False,
            grad_accum_dtype=None,
            overlap_comm=False,
            deepcompile=False,
            experts_implementation=None,
            load_in_4bit=False,
            use_liger_kernel=False,
            lora=NS(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules),
        ),
        model=NS(
            label_smoothing=0.0,
            ipo_enable=False,
            aux_loss_coef=0.0,
            nll_loss_coef=0.0,
            gradient_checkpointing_enable=recipe.model.gradient_checkpointing,
            gradient_checkpointing_reentrant=False,
            margin_loss_enable=False,
            compute_fp32_loss_enable=False,
        ),
        ref=NS(offload=recipe.deepspeed.ref_offload),
        data=NS(
            apply_chat_template=False,
            tokenizer_chat_template=None,
            input_template=recipe.data.input_template,
            max_len=recipe.data.max_len,
            prompt_key="prompt",
            chosen_key="response_0",
            rejected_key="response_1",
            disable_fast_tokenizer=False,
        ),
        logger=NS(
            logging_steps=recipe.logging.logging_steps,
            tensorboard_dir=str(out_dir / "tensorboard") if recipe.logging.tensorboard else None,
            wandb=NS(key=wandb_key, org=None, group=None, project=recipe.logging.wandb_project, run_name=recipe.name),
        ),
        eval=NS(steps=-1),
        ckpt=NS(
            path=str(out_dir / "checkpoints"),
            save_steps=training.checkpoint_steps or -1,
            # OpenRLHF deletes the oldest checkpoint *before* writing the next one: keep two, so a
            # crash during a save still leaves the one DeepSpeed's `latest` names.
            max_num=2,
            max_mem=10**6,
            load_enable=True,
            save_hf=False,
            disable_ds=False,
            output_dir=str(out_dir / "model"),
        ),
    )


def make_strategy(args: NS) -> DeepspeedStrategy:
    """OpenRLHF's DeepspeedStrategy with its process group up (gloo on CPU, NCCL on GPUs)."""
    ensure_process_env()
    strategy = get_strategy(args)
    strategy.setup_distributed()
    world = strategy.world_size
    if args.train.batch_size % (args.train.micro_batch_size * world):
        raise SafeAlignError(
            f"batch_size ({args.train.batch_size}) must be a multiple of micro_batch_size × processes "
            f"({args.train.micro_batch_size} × {world})"
        )
    return strategy


def load_actor(path: Path, args: NS, strategy: DeepspeedStrategy, *, trainable: bool) -> Actor:
    """OpenRLHF's Actor on a local checkpoint, configured for training or as a frozen reference."""
    common = dict(
        attn_implementation=args.ds.attn_implementation,
        param_dtype=args.ds.param_dtype,
        packing_samples=False,
    )
    if not trainable:
        actor = Actor(str(path), ds_config=strategy.get_ds_eval_config(offload=args.ref.offload), **common)
        actor._offload = args.ref.offload
        return actor
    lora = args.ds.lora
    actor = Actor(
        str(path),
        lora_rank=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        ds_config=strategy.get_ds_train_config(),
        **common,
    )
    if args.model.gradient_checkpointing_enable:
        actor.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return actor


def load_value_model(path: Path, args: NS, strategy: DeepspeedStrategy, *, trainable: bool):
    """OpenRLHF's value-head model (`score` head on the last token): a fresh head on a causal LM to
    train, or a trained reward/cost model to score with. Reward models are fully fine-tuned
    (`model.lora` is the policy's), so what is saved is always a complete checkpoint; to train, they take
    `model.gradient_checkpointing` as OpenRLHF's `train_rm` does (a 7B RM at 1024 tokens needs it)."""
    model = get_llm_for_sequence_regression(
        str(path),
        "reward",
        param_dtype=args.ds.param_dtype,
        attn_implementation=args.ds.attn_implementation,
        ds_config=strategy.get_ds_train_config() if trainable else strategy.get_ds_eval_config(),
        init_value_head=trainable,
        value_head_prefix="score",
        packing_samples=False,
    )
    if trainable and args.model.gradient_checkpointing_enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def freeze_below(model, trainable_layers: int | None, field: str = "trainable_layers") -> None:
    """Train only the value head, the final norm and the top `trainable_layers` decoder layers.

    With 0 the reward model is a linear probe on the frozen model's last-token state: no backward
    pass through the network, several times cheaper per pair, and on a small dataset often as
    accurate (harmfulness is close to linearly readable from an instruction model's representations).
    Frozen parameters stay out of OpenRLHF's optimizer groups (it keeps only `requires_grad` ones)."""
    if trainable_layers is None:
        return
    backbone = getattr(model, model.base_model_prefix)
    layers = backbone.layers
    if trainable_layers > len(layers):
        raise SafeAlignError(f"{field}={trainable_layers}: the model has only {len(layers)} decoder layers")
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    for module in [backbone.norm, *list(layers)[len(layers) - trainable_layers :]]:
        for parameter in module.parameters():
            parameter.requires_grad_(True)


def load_tokenizer(path: Path, model, strategy: DeepspeedStrategy, padding_side: str = "right"):
    """OpenRLHF's tokenizer setup (pad = eos when missing): right padding for log-probs, left for values."""
    return get_tokenizer(str(path), getattr(model, "model", model), padding_side, strategy)


def configure_prompt_format(args: NS, tokenizer, recipe: Recipe, model_field: str = "model.policy") -> None:
    """Use `data.input_template` when given, else the tokenizer's chat template; a model with neither
    (a base model such as Mistral-7B-v0.1) needs the template spelled out. `model_field` names the
    recipe key of the model, for the error."""
    if recipe.data.input_template is not None:
        args.data.apply_chat_template = False
    elif getattr(tokenizer, "chat_template", None):
        args.data.apply_chat_template = True
    else:
        raise SafeAlignError(
            f'{model_field} has no chat template: set data.input_template, e.g. "Human: {{}}\\nAssistant: "'
        )


def optimizer_config(args: NS, total_steps: int) -> dict:
    """The `cfg` half of `strategy.prepare((model, cfg))`, as OpenRLHF's CLIs build it."""
    return dict(
        optim=args.optim,
        muon=vars(args.muon),
        adam=vars(args.adam),
        lr_scheduler=args.lr_scheduler,
        lr_warmup_ratio=args.lr_warmup_ratio,
        min_lr_ratio=args.min_lr_ratio,
        max_norm=args.max_norm,
        scheduler_steps=max(1, math.ceil(total_steps)),
    )


def publish_model(strategy: DeepspeedStrategy, model, tokenizer, args: NS, target: Path) -> None:
    """Save the trained model beside `target` and rename it into place, so `target` is complete or
    absent (a resumed stage skips what is complete); then drop the resume checkpoints."""
    staging = target.with_name(target.name + ".saving")
    strategy.save_model(model, tokenizer, str(staging))
    if strategy.is_rank_0():
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        shutil.rmtree(args.ckpt.path, ignore_errors=True)
    barrier()


def resume_state(strategy: DeepspeedStrategy, engine, args: NS) -> dict:
    """The client state of the newest DeepSpeed checkpoint in `args.ckpt.path` ({} to start fresh).

    `engine`: an OpenRLHF Actor (its DeepSpeed engine is `actor.model`) or a prepared value model, which
    is the engine itself — whose attribute lookups fall through to the wrapped module, so
    `getattr(engine, "model")` would hand OpenRLHF the value model's backbone instead.
    """
    if not os.path.isdir(args.ckpt.path):
        return {}
    load_path, states = strategy.load_ckpt(engine.model if isinstance(engine, Actor) else engine, args.ckpt.path)
    if load_path is None:
        return {}
    log.info("resumed from %s: %d pairs already trained", load_path, states.get("consumed_samples", 0))
    return states
