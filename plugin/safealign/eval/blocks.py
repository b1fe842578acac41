"""One registration run in blocks: several runs' group tests pooled into the one registered test.

Why: a registration whose seeds do not fit one session (or one cluster reservation) runs as *blocks* —
each a complete run (rm, align, eval) of one recipe with other seeds, so a lost run directory costs a
block, not the claim — and is tested once, over all of them (`safealign pool RUN_DIR...`). Each block's own
report tests its runs alone; this reads the run-level values the blocks' evals recorded (`group_tests` in
`eval/results.json`) and runs the recipe's `eval.primary` over their union with the same code
(`compare_groups`), pairing runs by place within each block.

Held-out Ĵ_C is pooled as each run's value *less its own block's base*: a block's base answered with its
own draws and, when its rm stage was refitted, was scored by its own cost model, so the block-to-block offset
is not the method's. A paired difference is unchanged by it (both twins lose the same base); a group's mean
becomes its mean fall from the base, the number a relative threshold (`cost_threshold: initial` less a
margin) is about. Margins already are shifts from the block's base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from safealign.core.errors import SafeAlignError
from safealign.eval.pairs import HELDOUT_COST, compare_groups
from safealign.eval.report import dual_runs_table, group_tables, markdown_table


@dataclass(frozen=True)
class Block:
    """What pooling needs from one finished run: its groups (in place order), its primary test, its runs'
    values per measure, the base's held-out Ĵ_C and the relative threshold's margin (None if absolute).
    `primary` is the recipe's `eval.primary` (compared between blocks by equality); reading a run directory
    into a Block is `safealign.orchestration.pool`'s job."""

    name: str
    groups: dict[str, list[str]]
    primary: Any
    measures: dict[str, dict[str, float]]
    base_cost: float | None
    cost_margin: float | None
    training_logs: dict[str, list[dict]] = field(default_factory=dict)  # run -> its metrics.jsonl records


def pool_blocks(blocks: list[Block]) -> dict:
    """The registered test over every block's runs: `compare_groups`' result on the union (runs named
    `<block>/<run>`, held-out Ĵ_C less each block's base), plus the blocks and, under a relative threshold,
    each group's mean held-out fall against the margin."""
    if len(blocks) < 2:
        raise SafeAlignError("pool: give at least two run directories (blocks of one registration)")
    first = blocks[0]
    for block in blocks[1:]:
        if block.primary != first.primary:
            raise SafeAlignError(f"pool: {block.name}'s eval.primary differs from {first.name}'s: blocks of one registration test one thing")
        if list(block.groups) != list(first.groups):
            raise SafeAlignError(f"pool: {block.name}'s eval.groups ({', '.join(block.groups)}) are not {first.name}'s ({', '.join(first.groups)})")
        if block.cost_margin != first.cost_margin:
            raise SafeAlignError(f"pool: {block.name}'s cost threshold margin differs from {first.name}'s")
    if len({block.name for block in blocks}) < len(blocks):
        raise SafeAlignError("pool: two blocks have the same recipe name; each block is its own recipe (other seeds)")
    measures: dict[str, dict[str, float]] = {}
    for block in blocks:
        for measure, values in block.measures.items():
            if measure == HELDOUT_COST:
                if block.base_cost is None:
                    raise SafeAlignError(f"pool: {block.name} has held-out Ĵ_C for its runs but none for its base")
                values = {run: value - block.base_cost for run, value in values.items()}
            measures.setdefault(measure, {}).update({f"{block.name}/{run}": value for run, value in values.items()})
    groups = {group: [f"{block.name}/{run}" for block in blocks for run in block.groups[group]] for group in first.groups}
    result = compare_groups(measures, groups, first.primary)
    result["blocks"] = [{"name": b.name, "runs": sum(map(len, b.groups.values())), "base_heldout_cost": b.base_cost} for b in blocks]
    logs = {f"{b.name}/{run}": b.training_logs[run] for b in blocks for run in b.groups[first.primary.treatment] if run in b.training_logs}
    if table := dual_runs_table(logs, None):  # the treatment's λ and pool, run by run (each logs its own d)
        result["dual_runs"] = {"header": table[0], "rows": table[1]}
    if first.cost_margin is not None and HELDOUT_COST in measures:
        result["heldout_fall"] = {
            "margin": first.cost_margin,
            "groups": {group: {"mean_fall": -summary[HELDOUT_COST]["mean"], "meets": -summary[HELDOUT_COST]["mean"] >= first.cost_margin}
                       for group, summary in result["groups"].items() if HELDOUT_COST in summary},
        }  # fmt: skip
    return result


def pooled_markdown(result: dict) -> str:
    """The pooled test as a person reads it, in the report's own tables (`group_tables`): the blocks, each
    group's runs per measure, every comparison with its Holm-adjusted p and the verdict; then the
    treatment's λ run by run and each group's mean held-out fall against the margin."""
    verdict, tables = group_tables({"group_tests": result})
    lines = ["# Pooled over blocks", ""]
    lines += [f"- {b['name']}: {b['runs']} runs" + ("" if b["base_heldout_cost"] is None else f", base held-out Ĵ_C {b['base_heldout_cost']:.3f}")
              for b in result["blocks"]]  # fmt: skip
    if HELDOUT_COST in result["measures"]:
        lines += ["", f"{HELDOUT_COST} is each run's value less its own block's base."]
    lines += ["", verdict, ""]
    lines += [line for table in tables for line in (markdown_table(*table), "")]
    if dual := result.get("dual_runs"):
        lines += ["The treatment's runs, λ and the sampled pool (each block's align logs):", "",
                  markdown_table(dual["header"], dual["rows"]), ""]  # fmt: skip
    if fall := result.get("heldout_fall"):
        parts = [f"{group} {g['mean_fall']:.3f} ({'≥' if g['meets'] else '<'} {fall['margin']})" for group, g in fall["groups"].items()]
        lines.append(f"Held-out mean fall from the base against the margin: {'; '.join(parts)}.")
    return "\n".join(lines).rstrip("\n") + "\n"
