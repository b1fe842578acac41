"""The import layers of docs/architecture.md, enforced: what import-linter's `layers` and `independence`
contracts would check, on every `import` in the package — module level and inside functions alike, so
an import cannot dodge the layering by hiding in a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "plugin" / "safealign"

#: Top to bottom: a module may import from its own layer and the layers below it, never above.
#: A module belongs to the layer of the longest prefix that names it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("interface", ("safealign.cli", "safealign.sweep", "safealign.k8s")),
    ("orchestration", ("safealign.runner",)),
    ("stages", ("safealign.stages",)),
    ("training floor", ("safealign.training",)),
    ("trainers", ("safealign.trainers", "safealign.cost_sampling")),
    ("openrlhf adapter", ("safealign.openrlhf", "safealign.pair_dataset", "safealign.pair_sampler",
                          "safealign.scoring")),
    ("recipe", ("safealign.recipe", "safealign.models", "safealign.pooled_value", "safealign.ref_provenance",
                "safealign.eval.heldout")),
    ("domain", ("safealign.data", "safealign.losses", "safealign.lagrange", "safealign.cost_loss",
                "safealign.metrics", "safealign.eval")),
    ("foundation", ("safealign", "safealign.errors", "safealign.files", "safealign.locks", "safealign.process",
                    "safealign.remote_code", "safealign.allocator")),
]  # fmt: skip

#: Modules that may not import one another: each stage finds the others' outputs through the
#: `safealign.stages.StageContext.upstream` contract, never through their code.
INDEPENDENT = ("safealign.stages.rm", "safealign.stages.align", "safealign.stages.distill", "safealign.stages.evaluate")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every `safealign` import in the file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "safealign":
            for alias in node.names:  # `from safealign.openrlhf import engine` imports a submodule
                candidate = f"{node.module}.{alias.name}"
                found.append((node.lineno, candidate if (PACKAGE.parent / candidate.replace(".", "/")).exists()
                              or (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists() else node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "safealign"]
    return found


def layer_of(module: str) -> int:
    best, layer = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    if layer is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")
    return layer


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in MODULES:
        layer_of(module_name(path))


def test_no_module_imports_from_a_layer_above_its_own():
    violations = []
    for path in MODULES:
        importer = module_name(path)
        for line, imported in project_imports(path):
            if layer_of(imported) < layer_of(importer):
                violations.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {importer} ({LAYERS[layer_of(importer)][0]}) "
                    f"imports {imported} ({LAYERS[layer_of(imported)][0]})"
                )
    assert not violations, "\n".join(violations)


def test_stages_do_not_import_each_other():
    violations = []
    for path in MODULES:
        importer = module_name(path)
        if importer in INDEPENDENT:
            violations += [f"{importer}:{line} imports {m}" for line, m in project_imports(path)
                           if any(m == other or m.startswith(other + ".") for other in INDEPENDENT if other != importer)]  # fmt: skip
    assert not violations, "\n".join(violations)


def test_only_the_adapter_imports_openrlhf():
    """OpenRLHF is reached through `safealign.openrlhf` alone (its classes load after its patches)."""
    violations = []
    for path in MODULES:
        if module_name(path).startswith("safealign.openrlhf"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])  # fmt: skip
            violations += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "openrlhf"]
    assert not violations, violations


@pytest.mark.parametrize(
    "importer, imported, allowed",
    [("safealign.stages.align", "safealign.training.policy", True),
     ("safealign.training.policy", "safealign.stages", False),
     ("safealign.openrlhf.engine", "safealign.trainers.loop", False),
     ("safealign.eval.report", "safealign.eval.helpfulness", True),
     ("safealign.recipe", "safealign.eval.heldout", True),
     ("safealign.eval.safety", "safealign.recipe", False)],
)  # fmt: skip
def test_the_layer_rule_itself(importer, imported, allowed):
    assert (layer_of(imported) >= layer_of(importer)) is allowed
