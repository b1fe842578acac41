"""OpenRLHF's engine for one model: the DeepSpeed strategy, the models and tokenizer on it, the
optimizer config, resume and publish — each a thin call into OpenRLHF driven by the frozen `Settings`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safealign.core.errors import SafeAlignError
from safealign.core.process import barrier, ensure_process_env, release_memory, repick_own_port
from safealign.openrlhf import Actor, DeepspeedStrategy, get_llm_for_sequence_regression, get_strategy, get_tokenizer
from safealign.openrlhf.settings import Settings

log = logging.getLogger("safealign")

#: Tries at the process group's port in a one-process world (`repick_own_port`).
PORT_ATTEMPTS = 3


def make_strategy(args: Settings) -> DeepspeedStrategy:
    """OpenRLHF's DeepspeedStrategy with its process group up (gloo on CPU, NCCL on GPUs)."""
    ensure_process_env()
    strategy = get_strategy(args)
    for attempt in range(PORT_ATTEMPTS):
        try:
            strategy.setup_distributed()
            break
        except RuntimeError as exc:  # torch's DistNetworkError
            if "EADDRINUSE" not in str(exc) or attempt == PORT_ATTEMPTS - 1 or not repick_own_port():
                raise
            log.warning("the process group's port was taken by another process; retrying on port %s",
                        os.environ["MASTER_PORT"])  # fmt: skip
    world = strategy.world_size
    if args.train.batch_size % (args.train.micro_batch_size * world):
        raise SafeAlignError(
            f"batch_size ({args.train.batch_size}) must be a multiple of micro_batch_size × processes "
            f"({args.train.micro_batch_size} × {world})"
        )
    return strategy


def _checkpointing_kwargs(args: Settings) -> dict:
    """Gradient checkpointing as OpenRLHF's CLIs configure it (non-reentrant unless asked)."""
    return {"use_reentrant": args.model.gradient_checkpointing_reentrant}


def load_actor(path: Path, args: Settings, strategy: DeepspeedStrategy, *, trainable: bool) -> Actor:
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
        actor.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_checkpointing_kwargs(args))
    return actor


def load_value_model(path: Path, args: Settings, strategy: DeepspeedStrategy, *, trainable: bool):
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
        value_head_prefix=args.ds.value_head_prefix,
        packing_samples=False,
    )
    if trainable and args.model.gradient_checkpointing_enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_checkpointing_kwargs(args))
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


def optimizer_config(args: Settings, total_steps: int) -> dict:
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


def publish_model(strategy: DeepspeedStrategy, model, tokenizer, args: Settings, target: Path) -> None:
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


def release(*models) -> None:
    """Tear down the DeepSpeed engines of `models` (OpenRLHF Actors or prepared value models; None and
    plain modules are skipped) once their work is done, then free what they held.

    An engine that is only dropped is never freed: DeepSpeed's hooks keep it and its parameters
    reachable (after `del` and a full `gc.collect()`, a weak reference to a prepared SmolLM2-135M engine
    is still alive; after `destroy()` it is gone). A stage that loads one model after another in one
    process — eval's policies, rm's two value models, align's ablations — would otherwise keep them all."""
    for model in models:
        ds_engine = deepspeed_engine(model)
        if callable(getattr(type(ds_engine), "destroy", None)):
            ds_engine.destroy()
    release_memory()


def deepspeed_engine(model):
    """The DeepSpeed engine of an OpenRLHF Actor (`actor.model`) or a prepared value model, which is the
    engine itself — whose attribute lookups fall through to the wrapped module, so
    `getattr(engine, "model")` would hand back the value model's backbone instead."""
    return model.model if isinstance(model, Actor) else model


@contextmanager
def prepared_for_inference(strategy: DeepspeedStrategy, model) -> Iterator:
    """`model` on OpenRLHF's strategy for forward passes only (eval mode), released on the way out."""
    prepared = strategy.prepare(model)
    prepared.eval()
    try:
        yield prepared
    finally:
        release(prepared)


def resumable_tag(ckpt_dir: Path) -> str | None:
    """The checkpoint to resume from: the one DeepSpeed's `latest` names, or None to start fresh.

    DeepSpeed writes `latest` last, after every state file of the new checkpoint, by truncating and
    rewriting it. A kill inside that write leaves it empty (seen in CI: a SIGKILLed distill stage), and
    DeepSpeed would then look for states in the checkpoint folder itself and fail. Then the newest
    *complete* checkpoint is taken, and the log says so: not simply the newest folder, which a kill
    while its states were written leaves with a truncated file that fails to unpickle (seen in CI too)."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if tag and (ckpt_dir / tag).is_dir():
        return tag
    saved = {
        int(match[1]): d
        for d in ckpt_dir.iterdir()
        if (match := re.fullmatch(r"global_step(\d+)", d.name)) and d.is_dir() and complete_checkpoint(d)
    }
    if not saved:
        return None
    newest = saved[max(saved)]
    log.warning("%s names %s, which is not a checkpoint (a kill while it was being written); resuming from %s, "
                "the newest complete one", latest, repr(tag) if tag else "nothing", newest.name)  # fmt: skip
    return newest.name


def complete_checkpoint(folder: Path) -> bool:
    """Whether a DeepSpeed checkpoint folder holds model and optimizer states, each written to the end.

    torch.save writes a zip archive whose directory record comes last, so a file cut short by a kill is
    told apart from a whole one without unpickling gigabytes."""
    states = list(folder.glob("*.pt"))
    return (
        any(f.name.endswith("model_states.pt") for f in states)
        and any(f.name.endswith("optim_states.pt") for f in states)
        and all(zipfile.is_zipfile(f) for f in states)
    )


def resume_state(strategy: DeepspeedStrategy, engine, args: Settings) -> dict:
    """The client state of the newest DeepSpeed checkpoint in `args.ckpt.path` ({} to start fresh).
    `engine`: an OpenRLHF Actor or a prepared value model (`deepspeed_engine`)."""
    tag = resumable_tag(Path(args.ckpt.path))
    if tag is None:
        return {}
    load_path, states = strategy.load_ckpt(deepspeed_engine(engine), args.ckpt.path, tag=tag)
    if load_path is None:
        return {}
    log.info("resumed from %s: %d pairs already trained", load_path, states.get("consumed_samples", 0))
    return states


@contextmanager
def full_weights(engine) -> Iterator[None]:
    """For the length of a generation, every rank holds the whole of a ZeRO-3 model: its weights gathered
    once, and DeepSpeed's per-module hooks lifted (they would gather each module's weights again before
    its forward and release them after — once per generated token). Outside ZeRO-3 (nothing partitioned)
    this does nothing. Costs the full weights' memory on every rank while it lasts; no collective runs
    during the generation, so ranks need not stay in lockstep (`synced_gpus`)."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None:
        yield
        return
    import deepspeed

    parameters = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(parameters):
        for parameter in parameters:
            parameter.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)  # the hooks back, its trace invalidated
