"""The settings OpenRLHF reads, built once from the recipe and frozen.

OpenRLHF's strategy, models, datasets and trainers read one nested namespace that its CLIs build with
argparse (`--train.micro_batch_size` becomes `args.train.micro_batch_size`, `openrlhf.utils.config.
hierarchize`). `build_settings` fills exactly the fields of the CLI of the same kind — `train_dpo` for
the policy, `train_rm` for value models, `train_sft` for the distilled student — from the recipe,
with OpenRLHF's CLI defaults where the recipe has no say, so OpenRLHF's own objects run and an OpenRLHF
upgrade that adds, renames or drops a field fails tests/openrlhf/test_openrlhf_settings.py (which parses
OpenRLHF's own parsers) instead of drifting silently.

How it is built: `FIXED` and `FIXED_BY_KIND` hold OpenRLHF's CLI defaults the recipe has no say in
(one table to read against OpenRLHF's parsers); one small pure function per group of fields maps the
recipe onto the rest (`optimizer_fields`, `run_fields`, `lora_fields`, `data_fields`, `output_fields`,
`model_fields`, joined by `settings_fields`); `build_settings` alone asks the machine and the files
(bf16 support, FlashAttention, the tokenizer's chat template, a W&B key) and switches on OpenRLHF's
fp32 support when it is needed.

The object is frozen (TRL's one-config-object habit): every decision — dtype, attention, prompt
format, LoRA — is taken while building it, and what a trainer needs that depends on the data (the
evaluation cadence) is a derived copy (`Settings.replace`), never an edit that another holder of the
same object would see.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

from safealign.core.errors import SafeAlignError
from safealign.core.process import gpu_available
from safealign.openrlhf import patches
from safealign.recipe import Recipe, TrainingSection, check_wandb

#: Which OpenRLHF CLI's fields a settings object carries: `train_dpo`, `train_rm` or `train_sft`.
Kind = Literal["dpo", "rm", "sft"]

#: What OpenRLHF's `logger.wandb.key` holds instead of the key. Its trainers switch W&B on when the
#: field is set, log in with it only when W&B has no key of its own, and upload the whole settings
#: object as the run's config (readable by anyone who sees the project). So the field names where the
#: key is, never the key: W&B reads $WANDB_API_KEY itself (checked to be set below).
WANDB_KEY_FROM_ENV = "$WANDB_API_KEY"

#: The value head's attribute name in the value models we train and score with.
VALUE_HEAD = "score"


class Settings(SimpleNamespace):
    """A nested namespace that refuses assignment: derive a changed copy with `replace`."""

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"OpenRLHF settings are frozen (tried to set {name!r}): decide it in build_settings, or derive "
            "a copy with .replace()"
        )

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"OpenRLHF settings are frozen (tried to delete {name!r})")

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> Settings:
        """Nest dotted keys as OpenRLHF's `hierarchize` does ("train.seed" -> .train.seed)."""
        root: dict[str, Any] = {}
        for key, value in flat.items():
            node = root
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value

        def build(node: dict[str, Any]) -> Settings:
            return cls(**{k: build(v) if isinstance(v, dict) else v for k, v in node.items()})

        return build(root)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value: argparse's view of these settings."""
        out: dict[str, Any] = {}
        for key, value in vars(self).items():
            if isinstance(value, Settings):
                out.update({f"{key}.{k}": v for k, v in value.flat().items()})
            else:
                out[key] = value
        return out

    def replace(self, **changes: Any) -> Settings:
        """A copy with dotted keys changed (`replace(**{"eval.steps": 10})`); unknown keys are errors."""
        flat = self.flat()
        unknown = sorted(set(changes) - set(flat))
        if unknown:
            raise KeyError(f"no OpenRLHF setting {unknown[0]!r}")
        return Settings.from_flat({**flat, **changes})


def resolve_dtype(choice: str) -> str:
    """`auto`: bf16 on GPUs and on CPUs with native bf16 (e.g. AVX512-BF16/AMX), else fp32.

    fp16 is never chosen: it does not train on DeepSpeed's CPU accelerator and needs loss scaling on GPUs.
    A question about the machine, nothing more: `build_settings` turns on OpenRLHF's fp32 support when
    it builds settings that load a model in fp32.
    """
    if choice != "auto":
        return choice
    if gpu_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def resolve_attention(choice: str) -> str:
    """`auto`: FlashAttention 2 where transformers can run it, else PyTorch SDPA (FlashAttention kernels
    of its own on a GPU).

    Asks transformers' own check (a GPU, and flash-attn *installed* at a version it supports), not
    whether `import flash_attn` works: the padding stand-in (`patches.stub_flash_attn_padding`) imports
    fine on every machine without flash-attn, and must never select it.
    """
    from transformers.utils import is_flash_attn_2_available

    if choice == "flash_attention_2" and not is_flash_attn_2_available():
        where = "a GPU" if not gpu_available() else "the flash-attn package, which is not installed (docs/install.md)"
        raise SafeAlignError(f"model.attn_implementation: flash_attention_2 needs {where}; use auto or sdpa")
    if choice != "auto":
        return choice
    return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"


def uses_chat_template(recipe: Recipe, tokenizer_dir: Path, model_field: str = "model.policy") -> bool:
    """Prompts are formatted with `data.input_template` when given, else with the tokenizer's chat
    template; a model with neither (a base model such as Mistral-7B-v0.1) needs the template spelled
    out. `model_field` names the recipe key of the model, for the error."""
    if recipe.data.input_template is not None:
        return False
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=recipe.model.trust_remote_code)
    if getattr(tokenizer, "chat_template", None):
        return True
    raise SafeAlignError(
        f'{model_field} has no chat template: set data.input_template, e.g. "Human: {{}}\\nAssistant: "'
    )


def _wandb_key(recipe: Recipe) -> str | None:
    if not recipe.logging.wandb_project:
        return None
    check_wandb(recipe)
    return WANDB_KEY_FROM_ENV


#: OpenRLHF's CLI defaults for every field the recipe has no say in, common to the three kinds.
#: `data.*` dataset fields keep their defaults: the stages build the datasets from the recipe's rows.
FIXED: dict[str, Any] = {
    "local_rank": -1,
    "use_ms": False,
    "optim": "adam",
    "adam.betas": (0.9, 0.95),
    "adam.eps": 1e-8,
    "muon.lr": 0.02,
    "muon.momentum": 0.95,
    "muon.ns_steps": 5,
    "muon.nesterov": True,
    "train.full_determinism_enable": False,
    "ds.experts_implementation": None,
    "ds.zpg": 1,
    "ds.packing_samples": False,
    "ds.ring_attn_size": 1,
    "ds.ring_attn_head_stride": 1,
    "ds.tensor_parallel_size": 1,
    "ds.use_universal_ckpt": False,
    "ds.grad_accum_dtype": None,
    "ds.overlap_comm": False,
    "ds.deepcompile": False,
    "ds.load_in_4bit": False,
    "model.aux_loss_coef": 0.0,
    "model.gradient_checkpointing_reentrant": False,
    "data.dataset": None,
    "data.dataset_probs": None,
    "data.dataset_split": "train",
    "data.max_samples": 1_000_000,
    "data.dataloader_num_workers": 0,
    "data.tokenizer_chat_template": None,
    "data.disable_fast_tokenizer": False,
    "logger.wandb.org": None,
    "logger.wandb.group": None,
    "eval.dataset": None,
    "eval.steps": -1,  # once per epoch (`for_fit`)
    # OpenRLHF deletes the oldest checkpoint *before* writing the next one: keep two, so a crash during a
    # save still leaves the one DeepSpeed's `latest` names.
    "ckpt.max_num": 2,
    "ckpt.max_mem": 10**6,
    "ckpt.load_enable": True,
    "ckpt.save_hf": False,
    "ckpt.disable_ds": False,
}

#: The response-pair columns of the rows the stages build (dpo and rm read pairs).
PAIR_KEYS = {"data.prompt_key": "prompt", "data.chosen_key": "response_0", "data.rejected_key": "response_1"}

#: The fixed fields of each kind's own CLI (`train_dpo`, `train_rm`, `train_sft`).
FIXED_BY_KIND: dict[Kind, dict[str, Any]] = {
    "dpo": PAIR_KEYS | {"model.label_smoothing": 0.0, "model.ipo_enable": False, "model.nll_loss_coef": 0.0,
                        "ds.use_liger_kernel": False, "eval.split": "test"},
    "rm": PAIR_KEYS | {"ds.value_head_prefix": VALUE_HEAD,
                       "model.loss_type": "sigmoid",  # −log σ(r_better − r_other): the Helpful-RM's loss
                       "model.margin_loss_enable": False, "model.compute_fp32_loss_enable": False,
                       "eval.split": "train"},
    "sft": {"data.input_key": "prompt", "data.output_key": "answer", "data.multiturn": False,
            "model.pretrain_mode_enable": False, "ds.use_liger_kernel": False, "eval.split": "train"},
}  # fmt: skip


def optimizer_fields(training: TrainingSection) -> dict[str, Any]:
    """The optimizer and schedule a training section sets."""
    return {
        "max_norm": training.max_norm,
        "lr_scheduler": training.lr_scheduler,
        "lr_warmup_ratio": training.warmup_ratio,
        "min_lr_ratio": training.min_lr_ratio,
        "adam.lr": training.learning_rate,
        "adam.weight_decay": training.weight_decay,
        "train.micro_batch_size": training.micro_batch_size,
        "train.batch_size": training.batch_size,
        "train.max_epochs": training.epochs,
    }


def run_fields(recipe: Recipe, dtype: str, attention: str) -> dict[str, Any]:
    """Seed, DeepSpeed and the model's numerics, as the recipe and the machine decided them."""
    return {
        "train.seed": recipe.seed,
        "ds.zero_stage": recipe.deepspeed.zero_stage,
        "ds.param_dtype": dtype,
        "ds.attn_implementation": attention,
        "ds.adam_offload": recipe.deepspeed.adam_offload,
        "model.gradient_checkpointing_enable": recipe.model.gradient_checkpointing,
    }


def lora_fields(recipe: Recipe, kind: Kind) -> dict[str, Any]:
    """`model.lora` for the policy (dpo); value models and the distilled student are fully fine-tuned."""
    lora = recipe.model.lora
    return {
        "ds.lora.rank": lora.rank if kind == "dpo" else 0,
        "ds.lora.alpha": lora.alpha,
        "ds.lora.dropout": lora.dropout,
        "ds.lora.target_modules": lora.target_modules,
    }


def data_fields(recipe: Recipe, chat_template: bool) -> dict[str, Any]:
    """How prompts are formatted and cut."""
    return {
        "data.apply_chat_template": chat_template,
        "data.input_template": recipe.data.input_template,
        "data.max_len": recipe.data.max_len,
    }


def output_fields(recipe: Recipe, training: TrainingSection, out_dir: Path, wandb_key: str | None) -> dict[str, Any]:
    """Where a run's logs, checkpoints and model go."""
    return {
        "logger.logging_steps": recipe.logging.logging_steps,
        "logger.tensorboard_dir": str(out_dir / "tensorboard") if recipe.logging.tensorboard else None,
        "logger.wandb.key": wandb_key,
        "logger.wandb.project": recipe.logging.wandb_project,
        "logger.wandb.run_name": recipe.name,
        "ckpt.path": str(out_dir / "checkpoints"),
        "ckpt.save_steps": training.checkpoint_steps or -1,
        "ckpt.output_dir": str(out_dir / "model"),
    }


def model_fields(recipe: Recipe, kind: Kind, model_dir: Path, reference_dir: Path | None) -> dict[str, Any]:
    """The model trained or scored and, for the policy, its frozen reference and DPO's β."""
    fields: dict[str, Any] = {"model.model_name_or_path": str(model_dir)}
    if kind == "dpo":
        fields |= {"ref.model_name_or_path": str(reference_dir or model_dir), "ref.offload": recipe.deepspeed.ref_offload,
                   "model.beta": recipe.align.beta_ori}  # fmt: skip
    return fields


def settings_fields(
    recipe: Recipe, training: TrainingSection, out_dir: Path, kind: Kind, *, model_dir: Path,
    reference_dir: Path | None, dtype: str, attention: str, chat_template: bool, wandb_key: str | None,
) -> dict[str, Any]:  # fmt: skip
    """Every field of `kind`'s OpenRLHF CLI, flat (dotted), from values already decided: pure."""
    return (FIXED | FIXED_BY_KIND[kind] | optimizer_fields(training) | run_fields(recipe, dtype, attention)
            | lora_fields(recipe, kind) | data_fields(recipe, chat_template)
            | output_fields(recipe, training, out_dir, wandb_key) | model_fields(recipe, kind, model_dir, reference_dir))  # fmt: skip


def build_settings(
    recipe: Recipe,
    training: TrainingSection,
    out_dir: Path,
    kind: Kind,
    *,
    model_dir: Path,
    tokenizer_dir: Path | None = None,
    reference_dir: Path | None = None,
    model_field: str = "model.policy",
) -> Settings:
    """OpenRLHF's settings for one model's training or scoring in `out_dir`.

    `model_dir`: the model trained or scored; `tokenizer_dir`: whose tokenizer formats the prompts
    (default: the model's own); `reference_dir` (dpo): the frozen reference. What needs the machine or
    the files is decided here — the dtype and attention (and OpenRLHF's fp32 support switched on when the
    dtype is fp32), whether the tokenizer has a chat template, whether W&B has a key — and the rest is
    `settings_fields`, which only assembles.
    """
    dtype = resolve_dtype(recipe.model.dtype)
    if dtype == "fp32":
        patches.enable_fp32()  # OpenRLHF's loaders know only bf16/fp16 without it
    return Settings.from_flat(settings_fields(
        recipe, training, out_dir, kind, model_dir=model_dir, reference_dir=reference_dir, dtype=dtype,
        attention=resolve_attention(recipe.model.attn_implementation),
        chat_template=uses_chat_template(recipe, tokenizer_dir or model_dir, model_field),
        wandb_key=_wandb_key(recipe),
    ))  # fmt: skip


def for_fit(settings: Settings, steps_per_epoch: int) -> Settings:
    """The copy a training loop reads: evaluation once per epoch and no checkpoints when none were
    asked for, resolved as OpenRLHF's trainers would resolve them in place (-1 -> these values)."""
    changes: dict[str, Any] = {}
    if settings.eval.steps == -1:
        changes["eval.steps"] = steps_per_epoch
    if settings.ckpt.save_steps == -1:
        changes["ckpt.save_steps"] = float("inf")
    return settings.replace(**changes) if changes else settings
