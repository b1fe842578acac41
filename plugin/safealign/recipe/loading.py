"""Reading a recipe: YAML with `extends:` and `--set` overrides, then validation into a `Recipe` with
errors that name the field."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from safealign.core.errors import SafeAlignError
from safealign.core.remote_code import check_model_code
from safealign.recipe.checks import (
    check_align_sources,
    check_cost_model,
    check_eval_groups,
    check_gguf_specs,
    check_loss_keys,
    model_dirs,
)
from safealign.recipe.schema import Recipe, format_validation_error


class RecipeLoader(yaml.SafeLoader):
    """The safe loader, stricter: YAML 1.1 reads `5e-7` as a string (recipes are full of such learning
    rates: read as 5e-07), and a key given twice in one mapping is an error, not "the last one wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key] + 1})", key_node.start_mark
                )
            if isinstance(key, (str, int, float, bool)):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


MAX_RECIPE_VALUES = 100_000
#: Longer than any sensible `extends:` chain (the shipped recipes use 1).
MAX_EXTENDS = 16
#: Deeper than any recipe nests (a full one: 6 levels; a model config's free-form values a few more).
MAX_RECIPE_DEPTH = 32


def unshare(node: Any, budget: list[int] | None = None, depth: int = 0) -> Any:
    """A copy of a YAML tree in which no mapping or list appears twice. YAML anchors (`align: *base`)
    load as one shared object; an override must change the one place it names, not every alias.
    Raises ValueError past MAX_RECIPE_VALUES values or MAX_RECIPE_DEPTH levels (a value that contains
    itself, `&a [*a]`, is infinitely deep)."""
    budget = [MAX_RECIPE_VALUES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"the recipe expands to more than {MAX_RECIPE_VALUES:,} values (aliases of aliases?)")
    if depth > MAX_RECIPE_DEPTH:
        raise ValueError(f"nested deeper than {MAX_RECIPE_DEPTH} levels (a value that contains itself?)")
    if isinstance(node, dict):
        return {key: unshare(value, budget, depth + 1) for key, value in node.items()}
    if isinstance(node, list):
        return [unshare(value, budget, depth + 1) for value in node]
    return node


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.0.c=VALUE` -> (["a","b","0","c"], yaml-parsed VALUE)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SafeAlignError(f"--set {item!r}: expected KEY=VALUE, e.g. align.epochs=1")
    try:
        return key.split("."), unshare(yaml.load(value, Loader=RecipeLoader))
    except yaml.YAMLError as exc:
        raise SafeAlignError(f"--set {item!r}: the value is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except RecursionError:
        raise SafeAlignError(f"--set {key}: nested too deeply to be a recipe value") from None
    except ValueError as exc:
        raise SafeAlignError(f"--set {key}: {exc}") from None


def apply_override(data: dict, path: list[str], value: Any) -> None:
    """Set one dotted path in the raw recipe mapping (list items by index; null removes a key); creates
    missing mappings."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SafeAlignError(f"--set {'.'.join(path)}: {where} is not an item of a {len(node)}-item list")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise SafeAlignError(f"--set {'.'.join(path)}: {where} is not a mapping")
    last = path[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict) and value is None:
        node.pop(last, None)  # `--set key=null` removes the key, as `key: null` in an extending recipe does
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise SafeAlignError(f"--set {'.'.join(path)}: cannot set {last!r} there")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise SafeAlignError(f"{path}: recipe file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SafeAlignError(f"{path}: cannot be read ({exc.strerror or exc}); check the file's permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SafeAlignError(
            f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); a recipe is a YAML text file saved as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        position = getattr(exc, "position", None)  # a reader error (e.g. a NUL byte) has a position, no mark
        line = mark.line + 1 if mark else text.count("\n", 0, position) + 1 if position is not None else None
        reason = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc)
        where = f":{line}" if line else ""
        raise SafeAlignError(f"{path}{where}: not valid YAML ({' '.join(str(reason).split())})") from None
    except RecursionError:
        raise SafeAlignError(f"{path}: nested too deeply to be a recipe") from None
    if not isinstance(data, dict):
        raise SafeAlignError(f"{path}: a recipe must be a YAML mapping (name, model, data, align, ...)")
    try:
        return unshare(data)
    except ValueError as exc:
        raise SafeAlignError(f"{path}: {exc}") from None


def merge(base: dict, child: dict) -> dict:
    """`child` over `base`: mappings merge key by key, anything else (lists included) is replaced, and a
    null in `child` removes the key (as in Helm values): an extending recipe can drop an inherited
    setting, which then takes its default or, for a loss key, goes away with the loss that read it."""
    merged = dict(base)
    for key, value in child.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = merge(base[key], value)
        else:
            merged[key] = value
    return merged


def read_recipe_data(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A recipe file as a mapping, with `extends: other.yaml` resolved (the other recipe's values under
    this one's). An extended recipe lives in the same directory, so relative paths mean the same in both."""
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise SafeAlignError(f"{path}: extends: must be a recipe file name (got {parent!r})")
    parent_path = (path.parent / parent).resolve()
    if parent_path.parent != path.parent.resolve():
        raise SafeAlignError(f"{path}: extends: {parent} must be in the same directory (relative paths would move)")
    if parent_path in seen:
        raise SafeAlignError(f"{path}: extends: {parent} extends itself (a cycle)")
    if len(seen) >= MAX_EXTENDS:
        raise SafeAlignError(f"{path}: extends: a chain of more than {MAX_EXTENDS} recipes; extend a recipe that extends fewer")
    return merge(read_recipe_data(parent_path, (*seen, path.resolve())), data)


def _overridden_data(path: Path, overrides: list[str]) -> dict:
    """The recipe file's data with `--set` overrides applied, within one value budget for the whole."""
    data = read_recipe_data(path)
    for item in overrides:
        apply_override(data, *parse_override(item))
    try:
        return unshare(data)
    except ValueError as exc:
        raise SafeAlignError(f"{path} with --set: {exc}") from None


def _own_align_keys(path: Path, overrides: list[str]) -> set[str] | None:
    """The `align` keys the recipe file itself and its `--set` overrides write, when it extends another
    (None: it does not, so every key is its own). A key only inherited and unused by the leaf's loss is a
    warning, not an error: `extends: quickstart.yaml` + `align.loss: dpo` must not need λ's keys removed."""
    own = _read_yaml(path)
    if own.get("extends") is None:
        return None
    keys = set(own.get("align") or {}) if isinstance(own.get("align"), dict) else set()
    for item in overrides:
        key, _ = parse_override(item)
        if len(key) >= 2 and key[0] == "align":
            keys.add(key[1])
    return keys


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read (resolving `extends`), override and validate a recipe; every failure is one SafeAlignError line."""
    path = Path(path)
    return validate_recipe(
        _overridden_data(path, overrides), source=str(path), base_dir=path.parent,
        own_align_keys=_own_align_keys(path, overrides),
    )  # fmt: skip


def flatten_recipe(path: str | Path, overrides: list[str] = ()) -> str:
    """The recipe as one self-contained YAML document (`extends:` resolved, overrides applied): what goes
    into a Kubernetes ConfigMap, where the recipe's siblings do not exist. Callers validate it first
    (`load_recipe`), as they need the Recipe anyway."""
    return yaml.safe_dump(_overridden_data(Path(path), overrides), sort_keys=False, allow_unicode=True)


def validate_recipe(
    data: dict, source: str = "recipe", base_dir: Path | None = None, own_align_keys: set[str] | None = None
) -> Recipe:
    """`own_align_keys`: the align keys the leaf recipe sets itself (None: all of them; `_own_align_keys`)."""
    try:
        recipe = Recipe.model_validate(data, context={"base_dir": base_dir or Path.cwd()})
    except ValidationError as exc:
        raise SafeAlignError(format_validation_error(source, exc)) from None
    check_loss_keys(recipe, source, own_align_keys)
    check_cost_model(recipe, source)
    check_eval_groups(recipe, source)
    check_align_sources(recipe, source)
    for field, model_dir in model_dirs(recipe):
        check_model_code(f"{source}: {field}", model_dir, recipe.model.trust_remote_code)
    check_gguf_specs(recipe, source)
    if recipe.sweep is not None:
        for trial in trial_overrides(recipe.sweep.grid):
            trial_data = unshare({k: v for k, v in data.items() if k != "sweep"})
            for key, value in trial.items():
                apply_override(trial_data, key.split("."), value)
            where = ", ".join(f"{k}={v}" for k, v in trial.items())
            validate_recipe(trial_data, f"{source}: sweep trial {where}", base_dir)
    return recipe


def trial_overrides(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a sweep grid, in grid order (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
