"""The pipeline's stages: their names, what each depends on, and the order that follows — one table.

Everything that names stages derives from `PIPELINE`: the recipe's `stages` field and its order
(`STAGE_ORDER`), the stage registry (`safealign.stages.register_stage` binds a run function to an entry
here and takes its sections and upstreams from it), the CLI's `--stage` choices, the charts (one per
stage, plus the sweep's) and the tests. The run order is not written down: it is a topological order
of the declared upstreams (ties in table order), so a stage added with its upstreams runs in the right
place. Light on purpose — the recipe imports it, and importing the stage modules would pull in OpenRLHF.
"""

from __future__ import annotations

from dataclasses import dataclass
from graphlib import TopologicalSorter
from typing import Literal


@dataclass(frozen=True)
class StageSpec:
    """One stage as the rest of the package sees it, before its code is loaded."""

    name: str
    sections: tuple[str, ...]  # the top-level recipe sections its outputs depend on (its fingerprint)
    upstream: tuple[str, ...] = ()  # stages whose outputs it reads when the recipe runs them


PIPELINE: tuple[StageSpec, ...] = (
    StageSpec("rm", ("seed", "model", "data", "rm", "deepspeed")),
    StageSpec("align", ("seed", "model", "data", "align", "deepspeed"), upstream=("rm",)),
    StageSpec("distill", ("seed", "model", "data", "align", "distill", "deepspeed"), upstream=("rm", "align")),
    StageSpec("eval", ("seed", "model", "data", "eval"), upstream=("rm", "align", "distill")),
)

SPECS: dict[str, StageSpec] = {spec.name: spec for spec in PIPELINE}


def run_order(specs: tuple[StageSpec, ...]) -> tuple[str, ...]:
    """A topological order of `specs` by their upstreams, ties broken by table order; an upstream that is
    not a stage, or a cycle, is a programming error and fails at import."""
    names = [spec.name for spec in specs]
    for spec in specs:
        unknown = [u for u in spec.upstream if u not in names]
        if unknown:
            raise ValueError(f"stage {spec.name}: upstream {unknown[0]!r} is not a stage")
    sorter = TopologicalSorter({spec.name: spec.upstream for spec in specs})
    sorter.prepare()  # raises CycleError on a cycle
    order: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=names.index)
        order += ready
        sorter.done(*ready)
    return tuple(order)


#: The stages in the order they run, whatever order a recipe lists them in.
STAGE_ORDER: tuple[str, ...] = run_order(PIPELINE)
StageName = Literal[STAGE_ORDER]  # type: ignore[valid-type]  (a Literal of the table's names, for the schema)
