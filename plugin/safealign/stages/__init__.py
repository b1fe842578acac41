"""The stage registry: each pipeline stage is a function of (recipe, work directory) -> summary.

A stage declares which recipe sections its outputs depend on; the runner hashes those (plus the
contents of the data files they name) into a fingerprint, skips a stage whose finished outputs carry
the same fingerprint, and resumes an unfinished one from its checkpoints.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safealign.recipe import Recipe

log = logging.getLogger("safealign")

#: Pipeline order; a recipe's `stages` run in this order whatever order they are listed in.
ORDER = ("rm", "align", "distill", "eval")


@dataclass(frozen=True)
class StageContext:
    """What a stage gets: the recipe, the run directory, and its own work directory to fill."""

    recipe: Recipe
    run_dir: Path
    work_dir: Path


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], dict]
    sections: tuple[str, ...]  # top-level recipe sections the outputs depend on
    description: str
    upstream: tuple[str, ...] = ()  # stages whose outputs this one reads, when the recipe runs them


STAGES: dict[str, Stage] = {}


def register_stage(name: str, sections: tuple[str, ...], upstream: tuple[str, ...] = ()):
    """Decorator: register `fn(ctx) -> summary dict` as the stage `name`.

    The summary is stored in `<stage>/stage.json`; its `outputs` maps names to paths relative to the
    stage directory (what the CLI shows at the end of a run and later stages read).
    """

    def decorate(fn: Callable[[StageContext], dict]) -> Callable[[StageContext], dict]:
        doc = (fn.__doc__ or "").strip().splitlines()
        STAGES[name] = Stage(name=name, run=fn, sections=sections, description=doc[0] if doc else "", upstream=upstream)
        return fn

    return decorate


def run_once(work_dir: Path, train: Callable[[], dict]) -> dict:
    """Run `train()` — which must publish `work_dir/model` atomically — unless a resumed stage already
    did; its summary is kept in `work_dir/summary.json` (stages that train several models use this)."""
    from safealign.files import write_text_atomically
    from safealign.process import agree, barrier, is_rank_0

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
