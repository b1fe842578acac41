"""What a validated recipe is checked for beyond its schema, and what it implies: the models and
GGUFs it names, the cost model a dual λ needs, W&B, world sizes, the stages' training sections."""

from __future__ import annotations

import importlib.util
import logging
import math
import netrc
import os
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from safealign.core.errors import SafeAlignError
from safealign.core.gguf import check_gguf, find_packaged_gguf
from safealign.recipe.schema import (
    BETA_NAMES,
    LAMBDA_KEYS,
    LOSS_KEYS,
    AlignSection,
    ModelSpec,
    RandomModelSpec,
    Recipe,
    TrainingSection,
    unknown_file,
)

log = logging.getLogger("safealign")


def check_gguf_specs(recipe: Recipe, source: str) -> None:
    """Every GGUF the recipe names (a `.gguf` path or `gguf:<package>`) starts like one: an installed
    package without its `.gguf`, or a file that is not one, is a line at validate, not a crash in run. (A
    package not installed here may be in the image a cluster runs: `run` says so where it is missing.)"""
    for field, spec in model_specs(recipe).items():
        try:
            if isinstance(spec, str) and spec.startswith("gguf:"):
                try:
                    distribution(spec.removeprefix("gguf:"))
                except PackageNotFoundError:
                    continue
                check_gguf(find_packaged_gguf(spec.removeprefix("gguf:")))
            elif isinstance(spec, str) and spec.endswith(".gguf") and Path(spec).is_file():
                check_gguf(Path(spec))
        except SafeAlignError as exc:
            raise SafeAlignError(f"{source}: {field}: {exc}") from None


def model_specs(recipe: Recipe) -> dict[str, ModelSpec | str | None]:
    """Every model spec the recipe gives, by field (a random model's by its tokenizer's spec)."""
    specs: dict[str, ModelSpec | None] = {
        "model.policy": recipe.model.policy,
        "model.reference": recipe.model.reference,
        "model.cost_model": recipe.model.cost_model,
        "rm.helpful.base": recipe.rm.helpful.base,
        "rm.cost.base": recipe.rm.cost.base,
        "distill.teacher": recipe.distill.teacher,
        "distill.student": recipe.distill.student,
    }
    flat: dict[str, ModelSpec | str | None] = {}
    for field, spec in specs.items():
        if isinstance(spec, RandomModelSpec):
            field, spec = f"{field}.random.tokenizer", spec.random.tokenizer
        flat[field] = spec
    return flat


def model_dirs(recipe: Recipe) -> list[tuple[str, Path]]:
    """Every local model folder the recipe names, by field (GGUF files and packages are converted by
    us from tensors alone, so they carry no code)."""
    return [(field, Path(spec)) for field, spec in model_specs(recipe).items() if isinstance(spec, str) and Path(spec).is_dir()]


def training_sections(recipe: Recipe, stages: list[str] | None = None) -> dict[str, TrainingSection]:
    """Every training section the given stages (default: the recipe's) run, by recipe key."""
    stages = recipe.stages if stages is None else stages
    sections: dict[str, TrainingSection] = {}
    if "rm" in stages:
        sections.update({"rm.helpful": recipe.rm.helpful, "rm.cost": recipe.rm.cost})
    if "align" in stages or ("distill" in stages and recipe.distill.ddpo):
        sections["align"] = recipe.align
    if "distill" in stages:
        sections["distill.sft"] = recipe.distill.sft
    return sections


def divisors(n: int) -> list[int]:
    """Every divisor of `n` (≥ 1), ascending, by trial division up to √n."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def check_world_size(recipe: Recipe, world_size: int, stages: list[str] | None = None) -> None:
    """Every global batch must split evenly into micro-batches over `world_size` processes; the first one
    that does not is a one-line error saying which sizes would."""
    for key, section in training_sections(recipe, stages).items():
        group = section.micro_batch_size * world_size
        if section.batch_size % group:
            fits = divisors(section.batch_size // world_size) if section.batch_size % world_size == 0 else []
            micro = f", or micro_batch_size {' / '.join(map(str, fits))}" if fits else ""
            raise SafeAlignError(
                f"{key}.batch_size={section.batch_size} does not split over {world_size} processes × "
                f"micro_batch_size {section.micro_batch_size}: use a multiple of {group} "
                f"(e.g. {group * math.ceil(section.batch_size / group)}){micro}"
            )


def samples_policy_cost(align: AlignSection) -> bool:
    """Whether training with these settings samples Ĵ_C: a loss that uses λ, updated by the dual step — or
    held fixed with `cost_sampling.in_fixed_runs`, to watch its pool beside the dual runs'."""
    from safealign.losses import get_loss  # torch: importing the recipe module stays light (CLI start, submit)

    dual = align.lambda_update == "dual"
    return get_loss(align.loss).uses_lambda and (dual or align.cost_sampling.in_fixed_runs)


def sampling_variant(align: AlignSection) -> tuple[str, AlignSection] | None:
    """The first of the align settings and their ablations that samples Ĵ_C (its recipe key and settings),
    or None. One such variant is enough for the run to need a cost model and a held-out prompt pool."""
    variants = [("align", align)] + [(f"align.ablations.{n}", align.ablation(n)) for n in align.ablations]
    return next(((key, v) for key, v in variants if samples_policy_cost(v)), None)


def check_cost_model(recipe: Recipe, source: str) -> None:
    """λ's dual update needs a cost model to score the policy's answers: the rm stage's or a given one."""
    if recipe.model.cost_model is not None or "rm" in recipe.stages:
        return
    sampling = None
    if "align" in recipe.stages:  # the align stage trains the ablations too
        sampling = sampling_variant(recipe.align)
    elif "distill" in recipe.stages and recipe.distill.ddpo and samples_policy_cost(recipe.align):
        sampling = ("align", recipe.align)  # dDPO trains with the align settings alone
    if sampling is not None:
        variant, settings = sampling
        why, off = (
            ("lambda_update: dual", "lambda_update: fixed")
            if settings.lambda_update == "dual"
            else ("cost_sampling.in_fixed_runs: true", "cost_sampling.in_fixed_runs: false")
        )
        raise SafeAlignError(
            f"{source}: {variant}.{why} samples Ĵ_C with a cost model, and this recipe has none: "
            f"add rm to stages, set model.cost_model to a trained cost model, or set {variant}.{off}"
        )


def check_wandb(recipe: Recipe) -> None:
    """With `logging.wandb_project`, W&B can log before anything loads: the package is installed (it is
    an extra) and a key exists — $WANDB_API_KEY or `wandb login`'s entry in ~/.netrc — unless W&B runs
    offline. Otherwise one line, at validate and at the start of run (it once failed after the models loaded)."""
    if not recipe.logging.wandb_project:
        return
    if importlib.util.find_spec("wandb") is None:
        raise SafeAlignError(
            "logging.wandb_project: the wandb package is not installed: pip install 'safealign[wandb]' "
            "(or unset logging.wandb_project)"
        )
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "dryrun") or _netrc_has_wandb():
        return
    raise SafeAlignError(
        "logging.wandb_project: no W&B key: run `wandb login`, export WANDB_API_KEY, or set WANDB_MODE=offline"
    )


def _netrc_has_wandb() -> bool:
    """Whether `wandb login` left a key in the netrc file (W&B's own store)."""
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_align_sources(recipe: Recipe, source: str) -> None:
    """Every file `align.sources` or `align.cost_sampling.sources` (or an ablation's) names, in any form,
    is one of `data.train`'s."""
    align = recipe.align
    variants = [("align", align)] + [(f"align.ablations.{n}", align.ablation(n)) for n in align.ablations]
    for key, variant in variants:
        named = {
            (f"{key}.sources" if isinstance(variant.sources, list) else f"{key}.sources.{dimension}"): names
            for dimension, names in (variant.label_sources() or {}).items()
        }
        named[f"{key}.cost_sampling.sources"] = list(variant.cost_sampling.sources or {})
        for field, names in named.items():
            if unknown := unknown_file(names, recipe.data.train, "data.train"):
                raise SafeAlignError(f"{source}: {field}: {unknown}")


def check_eval_groups(recipe: Recipe, source: str) -> None:
    """Every `eval.groups` member is a model the run produces: `base`, `aligned` and the align ablations
    when align runs, `student` when distill runs."""
    produced = {"base"}
    if "align" in recipe.stages:
        produced |= {"aligned", *recipe.align.ablations}
    if "distill" in recipe.stages:
        produced.add("student")
    for group, members in recipe.eval.groups.items():
        for member in members:
            if member not in produced:
                raise SafeAlignError(
                    f"{source}: eval.groups.{group}: {member!r} is not a model this run produces "
                    f"({', '.join(sorted(produced))}); name an align ablation or add its stage"
                )
        if len(set(members)) != len(members):
            raise SafeAlignError(f"{source}: eval.groups.{group}: a model is listed twice")


def check_loss_keys(recipe: Recipe, source: str, own_keys: set[str] | None = None) -> None:
    """Reject loss settings the selected loss would not read (no silently ignored keys); a setting only
    inherited through `extends` (not in `own_keys`) is reported as a warning instead."""
    given = recipe.align.model_fields_set
    inherited = set() if own_keys is None else given - own_keys
    _check_loss_keys(recipe.align, given - inherited, f"{source}: align")
    _check_loss_keys(recipe.align, inherited, f"{source}: align", warn=True)
    for name, overrides in recipe.align.ablations.items():
        # An ablation inherits align's settings (a `dpo` ablation of a safe_mm_dpo run inherits `w`,
        # which it does not read, by design); what it sets itself must be used by its own loss.
        _check_loss_keys(recipe.align.ablation(name), set(overrides), f"{source}: align.ablations.{name}")


def _check_loss_keys(align: AlignSection, given_keys: set[str], where: str, warn: bool = False) -> None:
    """Every key of `given_keys` the loss does not read: an error, or with `warn` (inherited keys) one
    warning naming them all."""
    from safealign.losses import get_loss  # (see samples_policy_cost)

    loss = get_loss(align.loss)
    used = set(loss.reads) | (LAMBDA_KEYS if loss.uses_lambda else set())
    given = given_keys & (LOSS_KEYS | LAMBDA_KEYS)
    if given_keys & BETA_NAMES:
        given.add("beta_ori")
    unused = sorted(given - used)
    if unused and warn:
        log.warning("%s: %s inherited but not used by loss %r (ignored; set them to null to drop them)",
                    where, ", ".join(unused), loss.name)  # fmt: skip
    elif unused:
        raise SafeAlignError(
            f"{', '.join(f'{where}.{key}' for key in unused)}: not used by loss {loss.name!r} "
            f"(it reads {', '.join(sorted(used))}); remove {'it' if len(unused) == 1 else 'them'} or choose another loss"
        )
