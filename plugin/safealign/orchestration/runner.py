"""Run a recipe's stages in a run directory, atomically and resumably.

Layout of a run directory (a PVC on Kubernetes, shared by every stage):

    runs/<name>/.safealign-run         says SafeAlign made this directory (`claim_run_dir`)
    runs/<name>/recipe.yaml            the validated recipe, as run (`recipe_as_run`: runnable again)
    runs/<name>/.lock                  held by the one `safealign run` working here (`safealign.core.locks`)
    runs/<name>/<stage>/stage.json     fingerprint + summary: present only when the stage finished
    runs/<name>/.<stage>.partial/      the stage's work in progress (checkpoints live here)

A stage writes only into its `.partial` directory; when it returns, the runner writes `stage.json`
there and renames the directory into place, so `<stage>/` is either absent or complete. The
fingerprint hashes what the outputs depend on (the stage's recipe sections, the bytes of its data
files, the plugin version): a finished stage with the same fingerprint is skipped, an unfinished one
with the same fingerprint resumes from its checkpoints, and anything else starts clean.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import yaml

from safealign import __version__
from safealign.core.errors import SafeAlignError
from safealign.core.files import (
    disk_full,
    disk_full_error,
    tree_size,
    unusable_dir_error,
    unwritable_error,
    write_text_atomically,
)
from safealign.core.locks import RunLock
from safealign.core.pipeline import STAGE_ORDER
from safealign.core.process import agree, barrier, is_rank_0, release_memory
from safealign.recipe import Recipe, results_dump
from safealign.stages import STAGE_FILE, Stage, StageContext, finished_stage, load_builtin_stages

log = logging.getLogger("safealign")

FINGERPRINT_FILE = "fingerprint"
LOCK_FILE = ".lock"
RUN_MARKER = ".safealign-run"


def claim_run_dir(run_dir: Path) -> None:
    """Make `run_dir` a run directory, or refuse it in one line. A run writes `recipe.yaml` and replaces
    `<stage>/` folders there, so only a directory SafeAlign made (its marker) is ever used: a new or empty
    one gets the marker; one from before the marker existed (a `.lock`, or a stage's `stage.json` or
    partial work) is recognised and marked; anything else — `--run-dir .` in a project holding an
    `align/` folder and a commented `recipe.yaml` — is refused untouched."""
    marker = run_dir / RUN_MARKER
    if marker.is_file():
        return
    if run_dir.is_dir():
        entries = sorted(p.name for p in run_dir.iterdir())
        ours = (run_dir / LOCK_FILE).exists() or any(
            (run_dir / s / STAGE_FILE).is_file() or (run_dir / f".{s}.partial" / FINGERPRINT_FILE).is_file()
            for s in STAGE_ORDER
        )
        if entries and not ours:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise SafeAlignError(
                f"{run_dir}: holds files that are not a SafeAlign run ({shown}); a run writes recipe.yaml and "
                "replaces <stage>/ folders there: give --run-dir a new or empty directory (default runs/<name>)"
            )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(marker, json.dumps({"created_by": f"safealign {__version__}"}) + "\n")
    except PermissionError as exc:
        raise unwritable_error("run directory", run_dir, exc) from None
    except OSError as exc:
        raise unusable_dir_error(run_dir, exc) from None


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def recipe_as_run(recipe: Recipe) -> str:
    """The recipe a run writes beside its stages: `extends` resolved, paths absolute, every setting that is
    not its default — so `safealign run <run>/recipe.yaml` runs the same recipe again. Defaults are left
    out rather than written: a default the recipe's other settings do not use (the cost model's batch
    size under the pooled head, say) would be refused as a key that is ignored."""
    body = yaml.safe_dump(recipe.model_dump(mode="json", exclude_defaults=True), sort_keys=False, allow_unicode=True)
    return f"# as run by SafeAlign {__version__}; every key not written here has its default (docs/recipes.md)\n{body}"


def fingerprint(recipe: Recipe, stage: Stage, run_dir: Path) -> str:
    """Hash of everything the stage's outputs depend on, upstream stages' outputs included; operational
    settings (`recipe.OPERATIONAL`: checkpoint cadence, judge patience) are left out."""
    dumped = results_dump(recipe)
    sections = {name: dumped[name] for name in stage.sections}
    sources = list(recipe.data.train) + (list(recipe.eval.heldout_pairs) if "eval" in stage.sections else [])
    files = sorted({str(source.path): _file_digest(source.path) for source in sources}.items())
    upstream = {}
    for name in stage.upstream:
        record = finished_stage(run_dir, name)
        if name in recipe.stages and record is not None:
            upstream[name] = record.summary["fingerprint"]
    payload = json.dumps(
        {"stage": stage.name, "version": __version__, "sections": sections, "files": files, "upstream": upstream},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def select_stages(recipe: Recipe, requested: list[str] | None) -> list[Stage]:
    """The stages to run, in pipeline order: `requested` (from --stage) or the recipe's `stages`."""
    stages = load_builtin_stages()
    names = requested or recipe.stages
    unknown = [name for name in names if name not in stages]
    if unknown:
        raise SafeAlignError(f"--stage {unknown[0]}: unknown stage; available: {', '.join(sorted(stages))}")
    return [stages[name] for name in STAGE_ORDER if name in names]


def run_stage(recipe: Recipe, run_dir: Path, stage: Stage, force: bool = False) -> dict:
    """Run one stage unless its finished outputs are current; returns its summary (with `up_to_date`
    true when it was skipped: its `seconds` are then the earlier run's)."""
    final_dir, work_dir = run_dir / stage.name, run_dir / f".{stage.name}.partial"
    expected = fingerprint(recipe, stage, run_dir)
    done = final_dir / STAGE_FILE
    finished = json.loads(done.read_text()) if not force and done.is_file() else None
    unpublished = _unpublished(work_dir, expected) if is_rank_0() and not force else None
    finished, unpublished = agree((finished, unpublished))  # rank 0 decides: no rank may race its renames
    if unpublished is not None:
        log.info("%s: finished before the last run stopped, but not yet published; publishing it", stage.name)
        if is_rank_0():
            _publish(work_dir, final_dir)
        barrier()
        return unpublished
    if finished is not None:
        if finished.get("fingerprint") == expected:
            log.info("%s: up to date (%s); --force to run it again", stage.name, final_dir)
            if is_rank_0():
                (final_dir / FINGERPRINT_FILE).unlink(missing_ok=True)  # a kill's leftover from `_publish`
            return {**finished, "up_to_date": True}
        log.info("%s: recipe or data changed since the last run; running it again", stage.name)

    if is_rank_0():
        marker = work_dir / FINGERPRINT_FILE
        if work_dir.is_dir() and (force or not marker.is_file() or marker.read_text() != expected):
            why = "--force" if force else "the recipe, data or SafeAlign version changed since it started"
            log.warning("%s: discarding the unfinished work in %s (%s; %s)", stage.name, work_dir, why,
                        _size_note(work_dir))  # fmt: skip
            shutil.rmtree(work_dir)
        if work_dir.is_dir():
            log.info("%s: resuming the unfinished run in %s", stage.name, work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(marker, expected)
    barrier()

    log.info("%s: %s", stage.name, stage.description)
    started = time.time()
    try:
        summary = stage.run(StageContext(recipe=recipe, run_dir=run_dir, work_dir=work_dir))
    except Exception as exc:
        if disk_full(exc, work_dir):
            raise disk_full_error(exc, work_dir, largest_checkpoint(work_dir)) from None
        raise
    summary = {"stage": stage.name, "fingerprint": expected, "seconds": round(time.time() - started, 1), **summary}
    barrier()  # every rank is done reading its work dir (e.g. counting a model's parameters) before rank 0 moves it
    release_memory()  # the next stage (a generator, another trainer) starts with the accelerator empty

    if is_rank_0():
        write_text_atomically(work_dir / STAGE_FILE, json.dumps(summary, indent=2) + "\n")
        _publish(work_dir, final_dir)
        log.info("%s: done in %.0f s -> %s", stage.name, summary["seconds"], final_dir)
    barrier()
    return summary


def _size_note(work_dir: Path) -> str:
    """What is thrown away, in a user's terms: its size and whether it held checkpoints."""
    checkpoints = largest_checkpoint(work_dir)
    return f"{tree_size(work_dir) / 2**20:.0f} MiB" + (", checkpoints included" if checkpoints else "")


def _unpublished(work_dir: Path, expected: str) -> dict | None:
    """The summary of a finished work dir a kill left unpublished (its stage.json and marker match)."""
    marker, summary = work_dir / FINGERPRINT_FILE, work_dir / STAGE_FILE
    if marker.is_file() and summary.is_file() and marker.read_text() == expected:
        return json.loads(summary.read_text())
    return None


def _publish(work_dir: Path, final_dir: Path) -> None:
    """Put a finished work dir in place of the stage's outputs. The old outputs are set aside, not
    deleted, until the new ones are in place, and the work dir keeps its marker until it has been
    renamed: a kill at any point leaves either the old outputs or the new ones, and a finished work
    dir that the next run publishes (`_unpublished`)."""
    stale = final_dir.with_name(f".{final_dir.name}.stale")
    shutil.rmtree(stale, ignore_errors=True)
    if final_dir.exists():
        final_dir.rename(stale)
    work_dir.rename(final_dir)
    (final_dir / FINGERPRINT_FILE).unlink()
    shutil.rmtree(stale, ignore_errors=True)


def largest_checkpoint(work_dir: Path) -> int | None:
    """Bytes of the largest model or checkpoint directory a stage has written: about what its next save
    needs (what a full disk's error message tells the user to free)."""
    weights = {p.parent for suffix in ("*.pt", "*.safetensors", "*.bin") for p in work_dir.rglob(suffix)}
    return max((tree_size(d) for d in weights), default=None)


def run_recipe(recipe: Recipe, run_dir: Path, stages: list[str] | None = None, force: bool = False) -> list[dict]:
    """Run the selected stages in pipeline order in `run_dir`, holding its lock; returns their summaries.

    Under torchrun rank 0 holds the lock for the whole world, and a refusal stops every rank."""
    selected = select_stages(recipe, stages)
    lock = RunLock(run_dir / LOCK_FILE)
    refused = None
    if is_rank_0():
        try:
            claim_run_dir(run_dir)
            lock.acquire()
        except SafeAlignError as exc:
            refused = str(exc)
    refused = agree(refused)
    if refused:
        raise SafeAlignError(refused)
    try:
        if is_rank_0():
            write_text_atomically(run_dir / "recipe.yaml", recipe_as_run(recipe))
        return [run_stage(recipe, run_dir, stage, force) for stage in selected]
    finally:
        lock.release()
