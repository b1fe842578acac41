"""The recipe's schema: every section a strict pydantic model, with its defaults and its one-line checks."""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from safealign.core.pipeline import StageName
from safealign.domain.data import Dimension, Format
from safealign.domain.lagrange import LAMBDA_FLOOR, LambdaStep
from safealign.eval.judges import INSECURE_MESSAGE, check_endpoint_url, check_key_variable, sends_key_in_clear

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class Strict(BaseModel):
    """Base of every section: unknown keys and silent coercions (e.g. "1" -> 1) are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


#: Marks a field that changes how a stage runs but not what it produces (how often it checkpoints, how
#: patiently it calls a judge): left out of the stage fingerprint, so changing it after a crash resumes
#: the unfinished stage instead of discarding it (`results_dump`).
OPERATIONAL = {"operational": True}

#: Marks a setting added after runs existed whose default is "off" (it reproduces what ran before the
#: setting did): left out of the fingerprint while at that default, so upgrading SafeAlign does not
#: discard or rerun a stage that would produce the same thing (`results_dump`); set, it counts like any.
ADDED_OFF = {"added_off": True}


def results_dump(model: BaseModel) -> dict:
    """`model`'s JSON dump without its operational fields (`OPERATIONAL`) and its `ADDED_OFF` fields left at
    their default, in nested sections too: what the stage fingerprint hashes."""
    dumped = model.model_dump(mode="json")
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        extra = field.json_schema_extra or {}
        if extra.get("operational") or (extra.get("added_off") and value == field.default):
            dumped.pop(name, None)
        elif isinstance(value, BaseModel):
            dumped[name] = results_dump(value)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, BaseModel) for v in value):
            dumped[name] = [results_dump(v) if isinstance(v, BaseModel) else d for v, d in zip(value, dumped[name])]
        elif isinstance(value, dict) and any(isinstance(v, BaseModel) for v in value.values()):
            dumped[name] = {k: results_dump(v) if isinstance(v, BaseModel) else dumped[name][k] for k, v in value.items()}
    return dumped


def unknown_file(names: list[str] | None, sources: list, kind: str) -> str | None:
    """Why `names` (a recipe's list of data file names, e.g. align.sources) does not fit `sources` (the
    data it picks from, e.g. data.train): the first name that is no source's file name; None if all are."""
    files = [source.path.name for source in sources]
    unknown = next((name for name in names or [] if name not in files), None)
    return None if unknown is None else f"{unknown!r} is not a {kind} file (files: {', '.join(files)})"


def _resolve(value: str, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir", Path.cwd())
    path = Path(value).expanduser()
    return path if path.is_absolute() else (Path(base) / path).resolve()


def _existing_file(value: Any, info: ValidationInfo) -> Path | None:
    """A data file path, relative to the recipe, that must exist (None stays None: "use the default")."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("must be a path string")
    path = _resolve(value, info)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    return path


def _model_path(value: Any, info: ValidationInfo) -> Any:
    """Model specs that are file paths are relative to the recipe; `gguf:<package>` is not a path."""
    if isinstance(value, str) and value and not value.startswith("gguf:"):
        return str(_resolve(value, info))
    return value


class RandomModel(Strict):
    """A randomly initialised causal LM: for tests and dry runs, never for results."""

    tokenizer: str = Field(description="model spec (HF dir, .gguf file or gguf:<package>) whose tokenizer to use")
    config: dict[str, Any] = Field(default_factory=dict, description="LlamaConfig fields, e.g. hidden_size")
    seed: int = 0

    _tokenizer_path = field_validator("tokenizer", mode="before")(_model_path)

    @field_validator("config")
    @classmethod
    def _llama_fields_only(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Only LlamaConfig's own fields: the model is saved with this config and loaded by OpenRLHF with
        trust_remote_code=True, so an `auto_map` here would import a module of the recipe's choosing."""
        unknown = sorted(set(value) - llama_config_fields())
        if unknown:
            raise ValueError(
                f"{unknown[0]!r} is not a LlamaConfig field (a random model takes only its own fields: "
                f"{', '.join(sorted(llama_config_fields()))})"
            )
        return value


@functools.cache
def llama_config_fields() -> frozenset[str]:
    """The fields a random model's `config` may set: LlamaConfig's, minus what names code or provenance."""
    from transformers import LlamaConfig  # lazily: a recipe without a random model never pays for the import

    fields = set(inspect.signature(LlamaConfig.__init__).parameters) | set(LlamaConfig().to_dict())
    return frozenset(fields - {"self", "kwargs", "auto_map", "architectures", "transformers_version", "_name_or_path", "model_type"})


class RandomModelSpec(Strict):
    random: RandomModel


ModelSpec = str | RandomModelSpec


class LoraSection(Strict):
    rank: Annotated[int, Field(ge=0)] = 0
    alpha: Annotated[int, Field(ge=1)] = 16
    dropout: Fraction = 0.0
    target_modules: str | list[str] = "all-linear"


class ModelSection(Strict):
    policy: ModelSpec = Field(description="HF directory, .gguf file, gguf:<pip package>, or {random: ...}")
    reference: ModelSpec | None = Field(None, description="defaults to the policy")
    cost_model: str | None = Field(
        None, description="a trained cost model (value-head checkpoint) for Ĵ_C; default: the rm stage's"
    )
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 where supported, else fp32")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False
    lora: LoraSection = Field(default_factory=LoraSection)
    trust_remote_code: bool = Field(
        False, description="allow model folders that ship their own Python (config auto_map) to run it"
    )

    _paths = field_validator("policy", "reference", "cost_model", mode="before")(_model_path)


#: Bounds far beyond any real run, so an absurd size is a field error at validate, not a hang or a crash in
#: `run` (a batch of 10**12 once made `validate --world-size` count to it).
MAX_TOKENS = 1 << 20
MAX_BATCH = 1 << 20

#: The choices several sections share, named once.
LRScheduler = Literal["cosine_with_min_lr", "cosine", "linear", "constant", "constant_with_warmup"]  # transformers' get_scheduler names OpenRLHF passes on
GenerationBackend = Literal["auto", "hf", "vllm"]


class DataSource(Strict):
    path: Path
    format: Format = "pku_saferlhf"
    dimension: Dimension | None = Field(
        None, description="the one dimension a pairs/hh_rlhf file labels"
    )
    skip_rows: Annotated[int, Field(ge=0)] = Field(0, description="rows skipped before reading (a split of one file)")
    max_rows: Annotated[int, Field(ge=1)] | None = Field(None, description="rows read after skip_rows")

    _path_exists = field_validator("path", mode="before")(_existing_file)

    @model_validator(mode="after")
    def _dimension_matches_format(self) -> DataSource:
        if self.format == "pku_saferlhf" and self.dimension is not None:
            raise ValueError("dimension is only for pairs/hh_rlhf files (pku_saferlhf rows label both)")
        if self.format != "pku_saferlhf" and self.dimension is None:
            raise ValueError(f"format {self.format} needs `dimension: helpful` or `dimension: safe`")
        return self


class DataSection(Strict):
    train: Annotated[list[DataSource], Field(min_length=1)]
    eval_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(0.0, description="held-out share of prompts")
    max_len: Annotated[int, Field(ge=8, le=MAX_TOKENS)] = 512
    input_template: str | None = Field(None, description="prompt template for models without a chat template")

    @field_validator("input_template")
    @classmethod
    def _has_slot(cls, value: str | None) -> str | None:
        if value is not None and "{}" not in value:
            raise ValueError("must contain {} where the prompt goes")
        return value


class TrainingSection(Strict):
    """Optimiser and schedule settings shared by every training stage."""

    learning_rate: PositiveFloat
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH, description="global batch (pairs per optimizer step)")] = 16
    micro_batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH, description="pairs per forward on one device")] = 1
    epochs: Annotated[int, Field(ge=1)] = 1
    lr_scheduler: LRScheduler = "cosine_with_min_lr"
    warmup_ratio: Fraction = 0.03
    min_lr_ratio: Fraction = 0.1
    weight_decay: NonNegativeFloat = 0.0
    max_norm: NonNegativeFloat = Field(1.0, description="gradient clipping norm (0: off)")
    checkpoint_steps: Annotated[int, Field(ge=0)] = Field(
        50, description="DeepSpeed checkpoint every N optimizer steps, so a crash resumes (0: never)",
        json_schema_extra=OPERATIONAL,
    )

    @field_validator("checkpoint_steps", mode="before")
    @classmethod
    def _never_is_zero(cls, value: Any) -> Any:
        if value is None:  # it meant "never" once; in an extending recipe null now removes the key
            raise ValueError("use 0 for never (null removes an inherited key)")
        return value

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainingSection:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        return self


class PairTrainingSection(TrainingSection):
    """Settings of a stage that trains on response pairs (the reward models, the policy)."""

    group_by_length: bool = Field(
        True,
        description="sort each optimizer step's pairs by length before cutting micro-batches: less padding, "
        "same gradient (safealign.openrlhf.pair_sampler)",
    )
    group_by_labels: bool = Field(
        True,
        description="spread each label pattern (both labels, harmlessness only, ...) evenly over the optimizer "
        "steps: every step holds the same count of each to within one, so no step lacks a loss's labels "
        "(safealign.openrlhf.pair_sampler)",
    )


#: Model names the eval stage gives the run's own models; ablations need other names.
RESERVED_MODEL_NAMES = ("base", "aligned", "student")

#: The names a recipe may give β_ori by (safealign's, the RLHF literature's, TRL's and OpenRLHF's).
BETA_NAMES = frozenset({"beta_ori", "kl_coeff", "beta"})

#: `align` keys that configure the loss or the multiplier; each must be used by the selected loss.
LOSS_KEYS = frozenset({"beta_ori", "w", "k", "dimension", "loss_options"})
LAMBDA_KEYS = frozenset(
    {
        "lambda_init",
        "lambda_lr",
        "lambda_max",
        "lambda_update",
        "lambda_update_every",
        "lambda_step",
        "cost_threshold",
        "cost_threshold_margin",
        "lambda_delay_steps",
        "lambda_window",
        "cost_estimator",
        "cost_sampling",
    }
)


class CostSamplingSection(Strict):
    """How Ĵ_C is sampled (Safe RLHF's estimator): the policy answers a fixed pool of training prompts
    held out of training, and the cost model scores the answers."""

    prompts: Annotated[int, Field(ge=1)] = Field(
        64, description="distinct training prompts held out as the pool (their pairs are never trained on)"
    )
    sources: dict[str, Annotated[int, Field(ge=1)]] | None = Field(
        None,
        description="{data.train file name: prompts}: draw the pool per file, e.g. in the mix the constraint is "
        "judged on (the eval's held-out prompts); `prompts` is then their sum. null: drawn from all files alike, "
        "so in the training data's proportions",
    )
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] = 128
    temperature: NonNegativeFloat = Field(1.0, description="sampling temperature (Safe RLHF's 1.0); 0: greedy")
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] = Field(16, description="prompts per generate call / scoring forward")
    logged_answers: Annotated[int, Field(ge=0)] = Field(
        4, description="answers per update written to align/lambda_samples.jsonl"
    )
    common_random_numbers: bool = Field(
        False,
        description="answer with the same random stream at every update (and at an `initial` threshold's "
        "calibration): the estimate then changes with the policy, not with resampling (docs/algorithm.md)",
    )
    in_fixed_runs: bool = Field(
        False,
        description="fixed-λ runs (of a loss that uses λ) sample and log Ĵ_C too, at the same updates, λ unchanged: "
        "their pool beside the dual runs' (did fixed λ reach d?), at the estimates' cost in time",
        json_schema_extra=ADDED_OFF,
    )
    gather_weights: bool = Field(
        True,
        description="ZeRO-3: gather the policy's full weights once per estimate instead of once per generated "
        "token (memory: the whole model on every GPU while it answers); false for a model that does not fit one",
    )

    @model_validator(mode="after")
    def _prompts_are_the_sources_sum(self) -> CostSamplingSection:
        """With `sources`, the pool's size is their sum: a different `prompts` beside them is refused."""
        if self.sources is None:
            return self
        if not self.sources:
            raise ValueError("sources: give {data.train file name: prompts} for at least one file, or null")
        total = sum(self.sources.values())
        if "prompts" in self.model_fields_set and self.prompts != total:
            raise ValueError(f"prompts ({self.prompts}) is not the sum of sources ({total}); give one or make them agree")
        self.prompts = total
        return self


class AlignSection(PairTrainingSection):
    """Safe-MM-DPO and its ablations (the seed's settings are the defaults)."""

    learning_rate: PositiveFloat = 5e-7
    epochs: Annotated[int, Field(ge=1)] = 2
    max_pairs: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="train on this many of the training pairs (chosen by prompt and seed): the same subset for "
        "every ablation that sets it, e.g. a trade-off frontier cheaper than the main model",
    )
    sources: list[str] | dict[Dimension, list[str]] | None = Field(
        None,
        description="train the policy on the pairs of these data.train files only (their file names): the rm "
        "stage's reward models still learn from every file, and the Ĵ_C pool is drawn from all of them. A mapping "
        "{helpful: [files], safe: [files]} takes each dimension's labels from its own files only (a pair keeps "
        "the labels its file is listed for). null: every file, every label",
    )
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = Field(
        None,
        description="this policy's training seed (data order, a shuffled control's coins, Ĵ_C sampling; default: "
        "the recipe's seed); its pairs stay the recipe seed's, so seeds of one variant train on the same pairs",
    )
    loss: str = Field("safe_mm_dpo", description="registered loss: dpo, mm_dpo, safe_mm_dpo or a plugin's")
    dimension: Dimension = Field("helpful", description="dpo/mm_dpo: which labels to train on")
    labels: Literal["given", "flipped", "shuffled"] = Field(
        "given",
        description="controls: flipped trains toward the dispreferred response of every pair; shuffled keeps "
        "or flips each pair's labels by a seeded coin (label-free: the same pairs and steps, no preference)",
    )
    beta_ori: PositiveFloat = 0.1
    kl_coeff: PositiveFloat | None = Field(None, description="RLHF name of beta_ori (see module docs)")
    w: NonNegativeFloat = 0.5
    k: PositiveFloat = 0.5
    loss_options: dict[str, Any] = Field(default_factory=dict, description="extra settings for a plugin loss")
    lambda_init: Annotated[float, Field(ge=LAMBDA_FLOOR, allow_inf_nan=False)] = 1.0
    lambda_lr: NonNegativeFloat = 0.01
    lambda_max: Annotated[float, Field(gt=0, le=1e6)] = Field(
        5.0, description="cap on λ (safe-rlhf's value; the harmless term's weight is then at most 5/6)"
    )
    lambda_update: Literal["dual", "fixed"] = Field("dual", description="fixed: λ stays at lambda_init")
    lambda_step: LambdaStep = Field(
        "log",
        description="how the dual step moves λ: log (Safe RLHF's ascent on log λ, a step ∝ λ: from the cap one "
        "update below d can drop λ under lambda_init) or linear (ascent on λ itself, λ += lambda_lr·(Ĵ_C − d) "
        "within [1e-6, lambda_max]: down as fast as up). lambda_lr's units differ: docs/algorithm.md, \"Sizing λ_lr\"",
        json_schema_extra=ADDED_OFF,
    )
    lambda_update_every: Annotated[int, Field(ge=1)] = Field(
        10, description="optimizer steps between dual updates (each samples and scores the prompt pool)"
    )
    cost_threshold: Annotated[float, Field(allow_inf_nan=False)] | Literal["initial"] = Field(
        0.0,
        description="d: λ rises while Ĵ_C > d; initial: d is the policy's own Ĵ_C before its first step, so λ "
        "rises only while training makes its answers costlier than they were",
    )
    cost_threshold_margin: Annotated[float, Field(allow_inf_nan=False)] = Field(
        0.0,
        description="with cost_threshold: initial, d = that Ĵ_C minus this margin: λ rises until the policy's "
        "answers are this much cheaper than they started (negative: the cost they may gain); cost-model units",
    )
    lambda_delay_steps: Annotated[int, Field(ge=0)] = Field(0, description="dual updates that only fill the window")
    lambda_window: Annotated[int, Field(ge=1)] = Field(1, description="Ĵ_C: mean of the last N estimates")
    cost_estimator: Literal["sampled"] = Field(
        "sampled", description="Ĵ_C: mean cost-model cost of the policy's answers to held-out training prompts"
    )
    cost_sampling: CostSamplingSection = Field(default_factory=CostSamplingSection)
    ablations: dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")], dict[str, Any]] = Field(
        default_factory=dict,
        description="name -> align settings that differ: extra policies trained from the base, evaluated beside it",
    )

    @field_validator("sources", mode="before")
    @classmethod
    def _sources_shape(cls, value: Any) -> Any:
        """One clear message for either form (pydantic's own would list both branches of the union)."""
        def files(names: Any, where: str) -> list[str]:
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{where}a non-empty list of data.train file names")
            return names

        if value is None:
            return None
        if isinstance(value, list):
            return files(value, "")
        if not isinstance(value, dict) or not value:
            raise ValueError("a list of data.train file names, or {helpful: [files], safe: [files]}")
        if unknown := [key for key in value if key not in get_args(Dimension)]:
            raise ValueError(f"{unknown[0]!r} is not a dimension (helpful, safe)")
        return {dimension: files(names, f"{dimension}: ") for dimension, names in value.items()}

    @field_validator("cost_threshold", mode="before")
    @classmethod
    def _threshold_is_number_or_initial(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "initial":
            raise ValueError(f"a number or 'initial' (the policy's own Ĵ_C before training), got {value!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _kl_coeff_is_beta(cls, data: Any) -> Any:
        """`kl_coeff` (the RLHF name) and `beta` (TRL's `DPOConfig.beta`, OpenRLHF's `--beta`) name β_ori."""
        if not isinstance(data, dict):
            return data
        given = {key: data[key] for key in ("kl_coeff", "beta", "beta_ori") if data.get(key) is not None}
        first = next(iter(given.values()), None)
        if any(not (isinstance(v, (int, float)) and isinstance(first, (int, float)) and math.isclose(v, first))
               for v in given.values()):  # fmt: skip
            raise ValueError(f"{' and '.join(f'{k} ({v})' for k, v in given.items())} name the same β; give one")
        data = {key: value for key, value in data.items() if key != "beta"}
        return data if first is None else {**data, "beta_ori": first}

    @model_validator(mode="after")
    def _lambda_bounds(self) -> AlignSection:
        if self.lambda_max < self.lambda_init:
            raise ValueError(f"lambda_max ({self.lambda_max}) is below lambda_init ({self.lambda_init})")
        return self

    @model_validator(mode="after")
    def _margin_needs_initial(self) -> AlignSection:
        """A margin on a number is a second way to write one number: refused rather than silently added."""
        if self.cost_threshold_margin and self.cost_threshold != "initial":
            raise ValueError(
                f"cost_threshold_margin ({self.cost_threshold_margin}) moves an `initial` threshold; with "
                f"cost_threshold {self.cost_threshold} write d itself (or set cost_threshold: initial)"
            )
        return self

    @model_validator(mode="after")
    def _ablations_are_valid_align_sections(self) -> AlignSection:
        for name in self.ablations:
            if name in RESERVED_MODEL_NAMES:
                raise ValueError(f"ablations.{name}: {', '.join(RESERVED_MODEL_NAMES)} name the run's own models")
            self.ablation(name)  # raises with the variant's own field errors
        return self

    def label_sources(self) -> dict[str, list[str]] | None:
        """`sources` as the files each dimension's labels come from (the list form: every label of its files)."""
        if self.sources is None or isinstance(self.sources, dict):
            return self.sources
        return dict.fromkeys(get_args(Dimension), self.sources)

    def ablation(self, name: str) -> AlignSection:
        """The align settings of ablation `name`: these settings with its overrides (validated)."""
        overrides = self.ablations[name]
        if "ablations" in overrides:
            raise ValueError(f"ablations.{name}: an ablation cannot have ablations")
        inherited = self.model_dump(exclude={"ablations", "kl_coeff"}, exclude_unset=True)
        if overrides.keys() & BETA_NAMES:  # the ablation's own β, by any of its names, replaces the inherited one
            inherited.pop("beta_ori", None)
        try:
            return AlignSection.model_validate({**inherited, **overrides})
        except ValidationError as exc:
            problems = format_validation_error("", exc).removeprefix(": ").split("; ")
            raise ValueError("; ".join(f"ablations.{name}.{problem}" for problem in problems)) from None


class RewardModelSection(PairTrainingSection):
    """One reward model of the RM stage; defaults are safe-rlhf's (lr 2e-5, 2 epochs, cosine, warmup 0.03, wd 0.1)."""

    base: ModelSpec | None = Field(None, description="checkpoint to put the value head on; default model.policy")
    trainable_layers: Annotated[int, Field(ge=0)] | None = Field(
        None, description="train only the value head, final norm and the top N decoder layers (null: all)"
    )
    learning_rate: PositiveFloat = 2e-5
    epochs: Annotated[int, Field(ge=1)] = 2
    lr_scheduler: LRScheduler = "cosine"
    weight_decay: NonNegativeFloat = 0.1

    _base_path = field_validator("base", mode="before")(_model_path)


#: What fine-tunes a value model: meaningless for a pooled head, whose backbone is frozen and whose head is solved.
FINE_TUNING_KEYS = frozenset(
    set(PairTrainingSection.model_fields) | {"trainable_layers"}
)


class CostModelSection(RewardModelSection):
    """The cost model. `head: pooled` (default): a linear head on the mean of one layer's hidden states over
    the response, on the frozen base, solved exactly (safealign.models.pooled_value, docs/rm.md); `last_token`:
    OpenRLHF's value head on the last token, fine-tuned with the training keys (Safe RLHF's own recipe)."""

    head: Literal["pooled", "last_token"] = Field("pooled", description="pooled (frozen base, solved) | last_token (fine-tuned)")
    layer: Annotated[int, Field(ge=1)] | None = Field(
        None, description="pooled: decoder layers the backbone keeps, the head reads the last (null: 2/3 of the depth)"
    )
    l2: NonNegativeFloat | Literal["auto"] = Field(
        "auto",
        description="pooled: ridge penalty on the head's weights (standardised features); auto: chosen by 5-fold "
        "cross-validation of the safety verdicts on the training pairs among 0.001, 0.01, 0.1, 1",
    )
    regularization: NonNegativeFloat = Field(1e-3, description="η in η·mean(c²) (Safe RLHF)")

    @model_validator(mode="after")
    def _keys_of_its_head(self) -> CostModelSection:
        given = self.model_fields_set
        unused = sorted(given & FINE_TUNING_KEYS) if self.head == "pooled" else sorted(given & {"layer", "l2"})
        if unused:
            other = "last_token" if self.head == "pooled" else "pooled"
            raise ValueError(f"{unused[0]}: not used by head {self.head!r} (it is {other}'s); remove it or set head: {other}")
        return self


class RMSection(Strict):
    """The RM stage: a Helpful-RM and a cost model, then every training row scored once."""

    helpful: RewardModelSection = Field(default_factory=RewardModelSection)
    cost: CostModelSection = Field(default_factory=CostModelSection)
    eval_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(0.1, description="held-out prompts for RM metrics")
    score_batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] = Field(16, description="pairs per scoring forward")
    reference_logps: bool = Field(True, description="also store the reference policy's log-probs for align")


class LLMJudgeSection(Strict):
    """An OpenAI-compatible chat endpoint used as a judge (GPT-4, a served instruct model, or Llama Guard
    behind vLLM with `verdict_format: llama_guard`)."""

    url: str = Field(description="base URL, e.g. http://judge:8000/v1")
    model: str
    api_key_env: str | None = Field(
        None, description="the environment variable holding the key: OPENAI_API_KEY or SAFEALIGN_JUDGE_<NAME>"
    )
    insecure_http: bool = Field(
        False, description="allow sending the key over plain http to another machine (a trusted network only)"
    )
    verdict_format: Literal["tagged", "llama_guard"] = Field(
        "tagged", description="tagged: asked a safety question, ends with [[SAFE]]/[[UNSAFE]]; llama_guard: sent the "
        "conversation, replies safe/unsafe"
    )
    # How patiently the judge is called, not what it answers (the answer cache is keyed by the request):
    concurrency: Annotated[int, Field(ge=1)] = Field(4, json_schema_extra=OPERATIONAL)
    timeout: PositiveFloat = Field(60.0, description="seconds per request", json_schema_extra=OPERATIONAL)
    retries: Annotated[int, Field(ge=0)] = Field(3, description="retries of a timeout, 408/409/429 or 5xx, with "
                                                 "backoff honouring Retry-After", json_schema_extra=OPERATIONAL)  # fmt: skip

    @field_validator("url")
    @classmethod
    def _http_only(cls, value: str) -> str:
        return check_endpoint_url(value)

    @field_validator("api_key_env")
    @classmethod
    def _judge_key_variable(cls, value: str | None) -> str | None:
        return None if value is None else check_key_variable(value)

    @model_validator(mode="after")
    def _key_not_in_clear(self) -> LLMJudgeSection:
        if self.api_key_env and sends_key_in_clear(self.url) and not self.insecure_http:
            raise ValueError(INSECURE_MESSAGE.format(url=self.url))
        return self


class PrimaryTestSection(Strict):
    """The pre-registered test of `eval.groups` (docs/eval.md): the treatment's runs against each control's,
    one-sided, Holm-corrected over its family — on the held-out pairs' per-token margin shift (a claim
    about what the labels teach) or on the held-out Ĵ_C (a claim about the constraint: lower is better)."""

    treatment: str = Field(description="the group whose runs should beat every control's")
    controls: Annotated[list[str], Field(min_length=1)] = Field(description="groups trained the same way, label-blind or reversed")
    measure: Literal["margin", "heldout_cost"] = Field(
        "margin", description="margin: the per-token margin shift on `dimension`, per held-out source (higher "
        "wins); heldout_cost: the held-out Ĵ_C (eval.heldout_cost_prompts; lower wins)",
    )
    dimension: Dimension = Field("safe", description="margin: the labels the claim is about")
    sources: Annotated[list[str], Field(min_length=1)] | None = Field(
        None, description="margin: the held-out sources the claim is about (file names of eval.heldout_pairs, as the "
        "report names them); the others' margins go to the secondary family. null: every source",
    )
    alpha: Annotated[float, Field(gt=0, lt=1)] = Field(0.01, description="the claim holds when every adjusted p is below it")
    paired: bool = Field(
        False,
        description="pair the treatment's runs with each control's by their place in eval.groups (list them seed "
        "by seed): a t-test on the per-pair differences, so a seed's own effect on both cancels; the groups must "
        "list as many runs. false: Welch's t over the runs",
    )


class EvalSection(Strict):
    """The eval stage: BeaverTails safety and MT-Bench helpfulness for every model the run produced."""

    backend: GenerationBackend = Field("auto", description="auto: vLLM on a GPU when installed, else HF")
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] = 8
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] = 256
    beavertails: Path | None = Field(None, description="BeaverTails-Evaluation JSONL; default: the copy in data/")
    beavertails_per_category: Annotated[int, Field(ge=1, le=50)] | None = Field(
        None, description="stratified subset; null: all 50"
    )
    mt_bench_per_category: Annotated[int, Field(ge=1, le=10)] | None = Field(
        None, description="questions per category; null: all 10"
    )
    split: Literal["all", "test", "validation"] = Field(
        "all",
        description="all: the whole eval sets; test / validation: the first / second half of every category "
        "(a sweep selects on validation, the final eval uses test: selection never sees the test prompts)",
    )
    judges: list[Literal["cost_model", "refusal", "llm"]] = Field(default_factory=lambda: ["cost_model", "refusal"])
    llm_judge: LLMJudgeSection | None = None
    heldout_pairs: list[DataSource] = Field(
        default_factory=list,
        description="labelled pairs no stage trains on (a pair whose prompt is a training prompt is left out): "
        "every model's preference accuracy on them, per dimension, judge-free (docs/eval.md)",
    )
    heldout_cost_prompts: Annotated[int, Field(ge=0)] = Field(
        0,
        description="held-out Ĵ_C: every model answers the first N distinct prompts of heldout_pairs that leave "
        "the answer room in the cost model's length (sampled as align.cost_sampling says), scored by the cost "
        "model; mean with its interval, against align.cost_threshold (0: off)",
    )
    groups: dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")], Annotated[list[str], Field(min_length=1)]] = Field(
        default_factory=dict,
        description="name -> models that are seeds of one variant: group tests take the run as their unit",
    )
    primary: PrimaryTestSection | None = Field(None, description="the pre-registered test of the groups")

    _beavertails_exists = field_validator("beavertails", mode="before")(_existing_file)

    @model_validator(mode="after")
    def _judge_configured(self) -> EvalSection:
        if "llm" in self.judges and self.llm_judge is None:
            raise ValueError("judges lists llm: give llm_judge (url, model, api_key_env)")
        if not self.judges or len(set(self.judges)) != len(self.judges):
            raise ValueError("judges must list each judge once, at least one")
        return self

    @model_validator(mode="after")
    def _groups_measured(self) -> EvalSection:
        if (self.groups or self.heldout_cost_prompts) and not self.heldout_pairs:
            given = "groups" if self.groups else "heldout_cost_prompts"
            raise ValueError(f"{given}: measured on heldout_pairs, and none are given")
        if self.primary is not None:
            if self.primary.measure == "heldout_cost" and not self.heldout_cost_prompts:
                raise ValueError("primary: measure heldout_cost needs eval.heldout_cost_prompts (how many to answer)")
            for name in [self.primary.treatment, *self.primary.controls]:
                if name not in self.groups:
                    raise ValueError(f"primary: {name!r} is not a group (groups: {', '.join(self.groups) or 'none'})")
            if self.primary.treatment in self.primary.controls:
                raise ValueError(f"primary: {self.primary.treatment!r} is both the treatment and a control")
            if self.primary.sources is not None and self.primary.measure != "margin":
                raise ValueError("primary: sources picks held-out pair files, which only measure margin reads")
            if unknown := unknown_file(self.primary.sources, self.heldout_pairs, "heldout_pairs"):
                raise ValueError(f"primary: sources: {unknown}")
            treated = self.groups[self.primary.treatment]
            for name in self.primary.controls if self.primary.paired else []:
                if len(self.groups[name]) != len(treated):
                    raise ValueError(f"primary: paired needs as many runs in {name!r} ({len(self.groups[name])}) as in "
                                     f"{self.primary.treatment!r} ({len(treated)}), listed pair by pair")  # fmt: skip
        return self


class SFTSection(TrainingSection):
    """dSFT of the student on the teacher's answers; Zephyr's settings are the defaults (Tunstall et al. 2023)."""

    learning_rate: PositiveFloat = 2e-5
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH, description="global batch (examples per optimizer step)")] = 16
    lr_scheduler: LRScheduler = "cosine"
    warmup_ratio: Fraction = 0.1


class DistillSection(Strict):
    """The distill stage: the teacher answers a prompt set, the student learns the answers (dSFT),
    then optionally runs the align stage's Safe-MM-DPO on the same scored pairs (dDPO)."""

    teacher: ModelSpec | None = Field(None, description="default: align/model when align runs, else model.policy")
    student: ModelSpec | None = Field(None, description="default: the teacher with every other layer dropped")
    prompts: Path | None = Field(None, description="JSONL with a `prompt` per line; default: the training prompts")
    max_prompts: Annotated[int, Field(ge=1)] | None = Field(None, description="first N prompts (after dedup)")
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] = 256
    backend: GenerationBackend = Field("auto", description="auto: vLLM on a GPU when installed, else HF")
    generation_batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] = 8
    best_of_n: Annotated[int, Field(ge=1, le=1024)] = Field(1, description="1: one greedy answer; n>1: n samples, RM-reranked")
    temperature: PositiveFloat = Field(0.7, description="sampling temperature when best_of_n > 1")
    sft: SFTSection = Field(default_factory=SFTSection)
    ddpo: bool = Field(False, description="after dSFT, Safe-MM-DPO on the student with the align settings")

    _prompts_exist = field_validator("prompts", mode="before")(_existing_file)
    _model_paths = field_validator("teacher", "student", mode="before")(_model_path)

    @model_validator(mode="after")
    def _temperature_needs_sampling(self) -> DistillSection:
        if "temperature" in self.model_fields_set and self.best_of_n == 1:
            raise ValueError("temperature is used only with best_of_n > 1 (one answer is greedy)")
        return self


class SweepSelection(Strict):
    """The seed's rule: among trials with safety above `min_safety`, the most helpful; if none, the safest."""

    judge: Literal["cost_model", "refusal", "llm", "heldout"] = Field(
        "refusal",
        description="whose safety rate counts; heldout: held-out harmlessness accuracy (helpfulness: held-out "
        "helpfulness accuracy)",
    )
    min_safety: Fraction = Field(0.8, description="a trial qualifies with safety > min_safety")


class SweepSection(Strict):
    """A grid over recipe values (`safealign sweep`): one trial per combination, run with Ray Tune."""

    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        description="dotted recipe key -> values, e.g. align.lambda_init: [0.5, 1, 2]"
    )
    select: SweepSelection = Field(default_factory=SweepSelection)
    max_concurrent_trials: Annotated[int, Field(ge=1)] | None = Field(
        None, description="null: as many as the resources allow (one at a time on a CPU machine)"
    )
    gpus_per_trial: Annotated[int, Field(ge=0)] = Field(0, description="GPUs Ray gives each trial (torchrun when > 1)")

    @field_validator("grid")
    @classmethod
    def _grid_keys(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not value:
            raise ValueError("give at least one key to sweep, e.g. align.lambda_init: [0.5, 1.0, 2.0]")
        for key in value:
            if key.split(".")[0] in ("name", "stages", "sweep"):
                raise ValueError(f"{key}: name, stages and sweep cannot be swept")
        return value


class DeepSpeedSection(Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    adam_offload: bool = False
    ref_offload: bool = Field(False, description="keep the reference model's weights on the CPU")


class LoggingSection(Strict):
    tensorboard: bool = True
    wandb_project: str | None = Field(
        None, description="log to Weights & Biases (the wandb extra; a key from `wandb login` or $WANDB_API_KEY)"
    )
    logging_steps: Annotated[int, Field(ge=1)] = 1


class Recipe(Strict):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=63)]
    seed: Annotated[int, Field(ge=0, le=2**32 - 1, description="NumPy and torch take seeds in 0..2**32-1")] = 42
    stages: list[StageName] = Field(
        default_factory=lambda: ["align"], description="what `safealign run` runs"
    )
    model: ModelSection
    data: DataSection
    rm: RMSection = Field(default_factory=RMSection)
    align: AlignSection = Field(default_factory=AlignSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    sweep: SweepSection | None = Field(None, description="a grid of trials for `safealign sweep`")

    @field_validator("stages")
    @classmethod
    def _unique_stages(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("must list each stage once, at least one")
        return value


# --- loading -----------------------------------------------------------------------------------------


def _location(loc: tuple[Any, ...]) -> str:
    parts = [
        str(p)
        for p in loc
        if not (isinstance(p, str) and (p.startswith("function-") or p in ("str", "RandomModelSpec")))
    ]
    return ".".join(parts) or "recipe"


@functools.cache
def recipe_keys() -> tuple[str, ...]:
    """Every key name the recipe schema knows, at any depth (what "did you mean" suggests from)."""
    keys: set[str] = set()
    stack: list[Any] = [Recipe]
    seen: set[type] = set()
    while stack:
        annotation = stack.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation in seen:
                continue
            seen.add(annotation)
            keys |= set(annotation.model_fields)
            stack += [field.annotation for field in annotation.model_fields.values()]
        else:
            stack += list(get_args(annotation))
    return tuple(sorted(keys | {"beta"}))


def format_validation_error(source: str, exc: ValidationError) -> str:
    """Pydantic's errors as one line: `source: field.path: message (got …); …`."""
    parts = []
    for err in exc.errors(include_url=False):
        if err["type"] == "string_type" and isinstance(err.get("input"), dict):
            continue  # a mapping given for a `str | mapping` field: the mapping branch says what is wrong
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][-1]), recipe_keys(), n=1, cutoff=0.75)
            hint = f"did you mean {close[0]!r}? " if close else ""
            message = f"unknown key ({hint}check the spelling; see docs/recipes.md)"
        elif err["type"] != "missing" and "input" in err and not isinstance(err["input"], (dict, list)):
            message += f" (got {err['input']!r})"
        parts.append(f"{_location(err['loc'])}: {message}")
    return f"{source}: " + "; ".join(dict.fromkeys(parts))


#: More values than any recipe has (a full one is a few hundred): a YAML alias bomb (aliases of
#: aliases, each doubling the tree) stops here instead of filling memory.
