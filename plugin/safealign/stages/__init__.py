"""The stage registry and the stages' one contract with each other.

Each pipeline stage is a function of a `StageContext` -> summary. A stage declares which recipe
sections its outputs depend on; the runner hashes those (plus the contents of the data files they
name) into a fingerprint, skips a stage whose finished outputs carry the same fingerprint, and
resumes an unfinished one from its checkpoints.

Stages never import each other and never spell out each other's paths: a stage finds what an upstream
stage produced only through that stage's recorded summary (`<run>/<stage>/stage.json`, whose
`outputs` names each output's path in the stage directory), via `StageContext.upstream`. Shared work
lives one layer below, in `safealign.workflows`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safealign.core.errors import SafeAlignError
from safealign.core.files import write_text_atomically
from safealign.core.pipeline import SPECS, StageSpec
from safealign.core.process import agree, barrier, is_rank_0
from safealign.domain.data import PreferenceRow
from safealign.recipe import Recipe
from safealign.workflows.rows import training_rows

log = logging.getLogger("safealign")

#: The summary a finished stage leaves in its directory.
STAGE_FILE = "stage.json"


@dataclass(frozen=True)
class StageRecord:
    """A finished stage as it recorded itself: its directory and its summary."""

    name: str
    dir: Path
    summary: dict

    def output(self, name: str) -> Path:
        """The path of the recorded output `name` (e.g. rm's `cost_model`)."""
        outputs = self.summary.get("outputs")
        outputs = outputs if isinstance(outputs, dict) else {}
        if not isinstance(outputs.get(name), str):
            raise SafeAlignError(
                f"{self.dir / STAGE_FILE} records no output {name!r} (it has {sorted(outputs)}): "
                f"run the {self.name} stage again with --force"
            )
        path = self.dir / outputs[name]
        if not path.resolve().is_relative_to(self.dir.resolve()):  # a hand-edited summary must not send a stage elsewhere
            raise SafeAlignError(f"{self.dir / STAGE_FILE}: output {name!r} points outside the stage directory")
        return path

    def policy_metrics(self) -> dict[str, Path]:
        """The align stage's training logs by model name: `aligned`'s and each ablation's `metrics.jsonl`."""
        ablations = self.summary.get("ablations", {})
        return {"aligned": self.output("metrics"), **{name: self.dir / "ablations" / name / "metrics.jsonl" for name in ablations}}


def finished_stage(run_dir: Path, stage: str) -> StageRecord | None:
    """`stage`'s record in `run_dir`, or None while it has not finished there."""
    path = run_dir / stage / STAGE_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        summary = None
    if not isinstance(summary, dict):
        raise SafeAlignError(f"{path} is damaged (not a stage summary): run the {stage} stage again with --force")
    return StageRecord(stage, path.parent, summary)


@dataclass(frozen=True)
class StageContext:
    """What a stage gets: the recipe, the run directory, and its own work directory to fill."""

    recipe: Recipe
    run_dir: Path
    work_dir: Path

    def upstream(self, stage: str) -> StageRecord | None:
        """What `stage` produced in this run: None when the recipe does not run it (its outputs then
        play no part, as in the fingerprint); an error naming the fix when it runs but has not finished."""
        if stage not in self.recipe.stages:
            return None
        record = finished_stage(self.run_dir, stage)
        if record is None:
            raise SafeAlignError(
                f"{self.run_dir / stage} is not finished: run the {stage} stage first "
                f"(`safealign run RECIPE --stage {stage}`)"
            )
        return record

    def cache_dir(self, name: str) -> Path:
        """The run's shared cache `name` (eval answers, judge replies): outside every stage directory,
        so a stage run again, or another sweep trial, regenerates nothing that exists."""
        return self.run_dir / "cache" / name

    def upstream_output(self, stage: str, name: str) -> Path | None:
        """The path of `stage`'s output `name`, or None when the recipe does not run `stage`."""
        record = self.upstream(stage)
        return record.output(name) if record is not None else None


def cost_model_dir(ctx: StageContext) -> Path | None:
    """The cost model that scores sampled and generated answers (align's Ĵ_C, dDPO's, eval's judge):
    `model.cost_model`, else the rm stage's `cost_model` output, else None."""
    if ctx.recipe.model.cost_model is not None:
        return Path(ctx.recipe.model.cost_model)
    return ctx.upstream_output("rm", "cost_model")


def run_training_rows(ctx: StageContext) -> list[PreferenceRow]:
    """The rows this run trains the policy on (align, distill's prompts and dDPO): the rm stage's scored
    pairs when the recipe runs it, else the recipe's data."""
    return training_rows(ctx.recipe, ctx.upstream_output("rm", "scored"))


@dataclass(frozen=True)
class Stage:
    """A stage of `safealign.core.pipeline.PIPELINE` with its code: what the runner runs."""

    spec: StageSpec
    run: Callable[[StageContext], dict]
    description: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def sections(self) -> tuple[str, ...]:
        return self.spec.sections

    @property
    def upstream(self) -> tuple[str, ...]:
        return self.spec.upstream


STAGES: dict[str, Stage] = {}


def register_stage(name: str):
    """Decorator: register `fn(ctx) -> summary dict` as the code of the stage `name` of
    `safealign.core.pipeline.PIPELINE` (which says what it depends on and where it runs).

    The summary is stored in `<stage>/stage.json`; its `outputs` maps names to paths relative to the
    stage directory (what the CLI shows at the end of a run and later stages read).
    """

    def decorate(fn: Callable[[StageContext], dict]) -> Callable[[StageContext], dict]:
        doc = (fn.__doc__ or "").strip().splitlines()
        STAGES[name] = Stage(spec=SPECS[name], run=fn, description=doc[0] if doc else "")
        return fn

    return decorate


def run_once(work_dir: Path, train: Callable[[], dict]) -> dict:
    """Run `train()` — which must publish `work_dir/model` atomically — unless a resumed stage already
    did; its summary is kept in `work_dir/summary.json` (stages that train several models use this)."""
    summary_path = work_dir / "summary.json"
    if agree((work_dir / "model" / "config.json").is_file() and summary_path.is_file()):
        log.info("%s already trained (resumed)", work_dir / "model")
        return json.loads(summary_path.read_text())
    summary = train()
    if is_rank_0():
        write_text_atomically(summary_path, json.dumps(summary))
    barrier()
    return summary


def load_builtin_stages() -> dict[str, Stage]:
    """Import the built-in stage modules (they pull in OpenRLHF, so only when a run needs them)."""
    from safealign.stages import align, distill, evaluate, rm  # noqa: F401

    return STAGES
