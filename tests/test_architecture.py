"""The import layers of docs/architecture.md, enforced on every way one module can reach another.

What import-linter's `layers`, `independence` and `forbidden` contracts would check, and what they cannot
see: every `import` (module level and inside functions: hiding one in a function does not dodge the
layering), relative imports resolved to what they name, `importlib.import_module` / `__import__` of a
constant string read as the import it is (and one whose target cannot be read allowed only in the
OpenRLHF adapter), no module outside the layer table, no import cycle, and stages that reach one another
neither by import, nor through the registry (`STAGES[...]`), nor by building a path into another stage's
directory. Each rule is also run on a made-up module that breaks it (`HOLES`), so a rule that stops
catching what it is for fails here too.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "plugin" / "safealign"

#: Top to bottom: a module may import from its own layer and the layers below it, never above. A layer is
#: its folders (an entry ending in `.*`: the package and everything in it); the only modules named one by
#: one are the package itself and the two public ones at its root, `cli` (what users run) and `losses`
#: (what plugins subclass and name in entry points). A new module is in no layer until it is placed.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("interface", ("safealign.cli", "safealign.k8s.*")),
    ("orchestration", ("safealign.orchestration.*",)),
    ("stages", ("safealign.stages.*",)),
    ("workflows", ("safealign.workflows.*",)),
    ("trainers", ("safealign.trainers.*",)),
    ("openrlhf adapter", ("safealign.openrlhf.*",)),
    ("recipe", ("safealign.recipe.*", "safealign.models.*")),
    ("domain", ("safealign.domain.*", "safealign.eval.*", "safealign.losses")),
    ("foundation", ("safealign", "safealign.core.*")),
]  # fmt: skip

#: The stage modules, by the directory each writes in a run: none may reach another's code or outputs
#: except through `safealign.stages.StageContext` (the recorded `outputs` of an upstream stage).
STAGE_DIRS = {"safealign.stages.rm": "rm", "safealign.stages.align": "align",
              "safealign.stages.distill": "distill", "safealign.stages.evaluate": "eval"}  # fmt: skip
ADAPTER = "safealign.openrlhf"


@dataclass(frozen=True)
class Import:
    line: int
    target: str | None  # None: a dynamic import whose module the source does not say
    in_function: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(module: str, sources: dict[str, str]) -> bool:
    return any(other.startswith(module + ".") for other in sources)


def _named(candidate: str, base: str, sources: dict[str, str]) -> str:
    """`from base import candidate`: the submodule when there is one, else the module itself."""
    full = f"{base}.{candidate}"
    return full if full in sources or _is_package(full, sources) else base


def imports(module: str, source: str, sources: dict[str, str]) -> list[Import]:
    """Every project or OpenRLHF import in `source`, wherever it stands and however it is spelled."""
    package = module if _is_package(module, sources) or module == "safealign" else module.rsplit(".", 1)[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolved against the importing module's package
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - (child.level - 1)] + ([base] if base else []))
                for alias in child.names:
                    found.append(Import(child.lineno, _named(alias.name, base, sources), in_function))
            elif isinstance(child, ast.Import):
                found.extend(Import(child.lineno, a.name, in_function) for a in child.names)
            elif isinstance(child, ast.Call) and _dynamic_import(child):
                arg = child.args[0] if child.args else None
                target = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
                found.append(Import(child.lineno, target, in_function))
            visit(child, inner)

    visit(ast.parse(source), False)
    return [i for i in found if i.target is None or i.target.split(".")[0] in ("safealign", "openrlhf")]


def _dynamic_import(call: ast.Call) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in ("import_module", "__import__")


def layer_of(module: str) -> int | None:
    best, layer = -1, None
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            folder = entry.removesuffix(".*")
            hit = module == folder or (entry.endswith(".*") and module.startswith(folder + "."))
            if hit and len(folder) > best:
                best, layer = len(folder), index
    return layer


def unplaced(sources: dict[str, str]) -> list[str]:
    return [f"{m} is in no layer: add it to LAYERS here and to docs/architecture.md" for m in sources if layer_of(m) is None]


def upward(sources: dict[str, str]) -> list[str]:
    out = []
    for module, source in sources.items():
        for i in imports(module, source, sources):
            if not i.target or layer_of(i.target) is None or layer_of(module) is None:
                continue  # OpenRLHF, a computed name, an unplaced module: the other rules' business
            if layer_of(i.target) < layer_of(module):
                out.append(f"{module}:{i.line} ({LAYERS[layer_of(module)][0]}) imports {i.target} "
                           f"({LAYERS[layer_of(i.target)][0]})")  # fmt: skip
    return out


def unreadable(sources: dict[str, str]) -> list[str]:
    """Dynamic imports of a computed name: only the adapter may (it loads OpenRLHF's classes by name)."""
    return [f"{module}:{i.line} imports a module named at run time: name it, or move this into {ADAPTER}"
            for module, source in sources.items() if not _within(module, ADAPTER)
            for i in imports(module, source, sources) if i.target is None]  # fmt: skip


def openrlhf_outside_the_adapter(sources: dict[str, str]) -> list[str]:
    return [f"{module}:{i.line} imports {i.target}" for module, source in sources.items() if not _within(module, ADAPTER)
            for i in imports(module, source, sources) if i.target and i.target.split(".")[0] == "openrlhf"]  # fmt: skip


def cycles(sources: dict[str, str]) -> list[str]:
    """Import cycles (any import, anywhere), but for a package's registry importing its own submodules
    inside a function (`safealign.stages.load_builtin_stages`: the stages register themselves)."""
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for module, source in sources.items():
        for i in imports(module, source, sources):
            registry = i.in_function and i.target and i.target.startswith(module + ".")
            if i.target in sources and i.target != module and not registry:
                graph[module].add(i.target)
    return [" -> ".join([*component, component[0]]) for component in _strongly_connected(graph) if len(component) > 1]


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    found.append(sorted(component))
    return found


def stages_reaching_each_other(sources: dict[str, str]) -> list[str]:
    out = []
    for module in STAGE_DIRS:
        if module not in sources:
            continue
        others = {m: d for m, d in STAGE_DIRS.items() if m != module}
        out += [f"{module}:{i.line} imports {i.target}" for i in imports(module, sources[module], sources)
                if i.target and any(_within(i.target, other) for other in others)]  # fmt: skip
        for node in ast.walk(ast.parse(sources[module])):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "STAGES":
                out.append(f"{module}:{node.lineno} reaches a stage through the registry (STAGES[...])")
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
                first = str(node.right.value).split("/")[0]
                if first in others.values():
                    out.append(f"{module}:{node.lineno} builds a path into the {first} stage's directory: "
                               f"use ctx.upstream_output({first!r}, ...)")  # fmt: skip
    return out


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


SOURCES = {module_name(path): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}
RULES = {"unplaced": unplaced, "upward": upward, "unreadable": unreadable, "openrlhf": openrlhf_outside_the_adapter,
         "cycles": cycles, "stages": stages_reaching_each_other}  # fmt: skip


@pytest.mark.parametrize("rule", RULES)
def test_the_package_keeps_the_rule(rule):
    violations = RULES[rule](SOURCES)
    assert not violations, "\n".join(violations)


#: Each way around the layers that today's rules must catch: (rule, made-up modules added to the package).
HOLES = {
    "a relative upward import": ("upward", {"safealign.losses": "from .stages import StageContext\n"}),
    "an upward import hidden in a function": ("upward", {"safealign.domain.data": "def f():\n    import safealign.orchestration.runner\n"}),
    "import_module of a constant": ("upward", {"safealign.core.errors": "import importlib\nimportlib.import_module('safealign.cli')\n"}),
    "__import__ of a constant": ("upward", {"safealign.core.files": "__import__('safealign.orchestration.sweep')\n"}),
    "a computed module name": ("unreadable", {"safealign.domain.data": "import importlib\nname = 'safealign' + '.cli'\nimportlib.import_module(name)\n"}),
    "a new module nobody placed": ("unplaced", {"safealign.helpers": "x = 1\n"}),
    "a cycle inside one layer": ("cycles", {"safealign.losses": "import safealign.domain.lagrange\n",
                                            "safealign.domain.lagrange": "def f():\n    import safealign.losses\n"}),
    "a stage importing another": ("stages", {"safealign.stages.align": "from safealign.stages.rm import run_rm\n"}),
    "a stage through the registry": ("stages", {"safealign.stages.align": "from safealign.stages import STAGES\nSTAGES['rm'].run(ctx)\n"}),
    "a stage building rm's path": ("stages", {"safealign.stages.align": "p = ctx.run_dir / 'rm' / 'scored.jsonl'\n"}),
    "a stage building a nested path": ("stages", {"safealign.stages.distill": "p = run_dir / 'align/model'\n"}),
    "OpenRLHF imported outside the adapter": ("openrlhf", {"safealign.trainers.loop": "from openrlhf.models import Actor\n"}),
    "OpenRLHF by import_module": ("openrlhf", {"safealign.domain.data": "import importlib\nimportlib.import_module('openrlhf.models')\n"}),
}  # fmt: skip


@pytest.mark.parametrize("hole", HOLES)
def test_a_way_around_the_layers_is_caught(hole):
    rule, modules = HOLES[hole]
    holed = {**SOURCES, **{module: SOURCES.get(module, "") + "\n" + code for module, code in modules.items()}}
    assert RULES[rule](holed), f"{hole} is not caught by the {rule} rule"


@pytest.mark.parametrize(
    "importer, imported, allowed",
    [("safealign.stages.align", "safealign.workflows.policy", True),
     ("safealign.workflows.policy", "safealign.stages", False),
     ("safealign.openrlhf.engine", "safealign.trainers.loop", False),
     ("safealign.eval.report", "safealign.eval.helpfulness", True),
     ("safealign.workflows.heldout", "safealign.recipe", True),
     ("safealign.eval.pairs", "safealign.workflows.heldout", False),
     ("safealign.eval.safety", "safealign.recipe", False)],
)  # fmt: skip
def test_the_layer_rule_itself(importer, imported, allowed):
    assert (layer_of(imported) >= layer_of(importer)) is allowed


def test_the_stage_list_has_one_source():
    """Every place that names stages derives from safealign.core.pipeline: the registry binds code to its
    entries (and takes their sections and upstreams), the recipe's `stages`, the charts, the run order."""
    from typing import get_args

    from safealign.core.pipeline import PIPELINE, STAGE_ORDER, run_order
    from safealign.k8s.charts import STAGE_CHARTS
    from safealign.recipe import Recipe
    from safealign.stages import load_builtin_stages

    names = [spec.name for spec in PIPELINE]
    assert {name: stage.spec for name, stage in load_builtin_stages().items()} == {s.name: s for s in PIPELINE}
    assert set(get_args(get_args(Recipe.model_fields["stages"].annotation)[0])) == set(names)
    assert list(STAGE_CHARTS) == [*STAGE_ORDER, "sweep"]
    assert {p.name for p in (PACKAGE / "k8s" / "charts").glob("safealign-*") if p.name != "safealign-common"} == set(
        STAGE_CHARTS.values()
    )
    defaults = (PACKAGE / "k8s" / "charts" / "safealign-common" / "stage-defaults.yaml").read_text()
    assert [line.split(":")[0] for line in defaults.splitlines() if line[:1].isalpha()] == [*STAGE_ORDER, "sweep"]
    # the order comes from the upstreams: a table listed backwards still runs rm first
    assert run_order(tuple(reversed(PIPELINE))) == STAGE_ORDER
