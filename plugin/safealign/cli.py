"""`safealign`: run, validate and inspect recipes.

Errors a user can cause print one line (`safealign: error: …`) and exit 2 (75 for an outage of a service
the run calls, which a retry may outlive: `errors.TransientError`); a stage that crashes keeps
its traceback (that is a bug) and its partial work, which the next `safealign run` resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from safealign import __version__
from safealign.core.allocator import use_caching_allocator
from safealign.core.errors import SafeAlignError, TransientError
from safealign.core.files import disk_full, disk_full_error, write_text_atomically
from safealign.core.pipeline import STAGE_ORDER
from safealign.core.process import gpu_available, init_process_group, is_rank_0, leave_process_group, no_gpu_reason
from safealign.domain.data import load_prompt_file
from safealign.eval.safety import DEFAULT_PATH, load_prompts
from safealign.k8s import submit as k8s
from safealign.orchestration.runner import run_recipe
from safealign.recipe import check_wandb, check_world_size, flatten_recipe, load_recipe
from safealign.stages import finished_stage
from safealign.workflows.heldout import heldout_rows, load_training_rows

EPILOG = """examples:
  safealign run recipes/quickstart.yaml                    every stage the recipe lists, on this machine
  safealign run recipes/quickstart.yaml --stage align      one stage (its inputs must exist in the run dir)
  safealign run R.yaml --set align.epochs=1 --set data.train.0.max_rows=64
  torchrun --nproc_per_node 8 -m safealign.cli run R.yaml --stage align     one node, 8 GPUs
  safealign sweep recipes/sweep-lambda-w.yaml              the seed's 3x3 grid (Ray Tune), then the selection rule
  safealign validate recipes/mistral-7b-beavertails.yaml   check a recipe without running it
  safealign losses                                         list the registered losses
  safealign report runs/quickstart                         rewrite a run's report.md / report.html
  safealign submit recipes/mistral-7b-beavertails.yaml -n ml --values gpu.yaml --wait
                                                           every stage as a Kubernetes Job, in order
  safealign status mistral-7b-beavertails -n ml            the run's stage Jobs
  safealign logs mistral-7b-beavertails -n ml --stage align -f

environment:
  SAFEALIGN_ALLOCATOR=auto|tcmalloc|jemalloc|system   run/sweep on a CPU re-execute themselves on tcmalloc
                                                     when installed (auto; docs/cpu.md), or as chosen
"""


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, help="recipe YAML (see docs/recipes.md)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value by its dotted path (list items by index), e.g. align.lambda_init=2; repeatable",
    )


def _add_cluster_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", "-n", default="default", help="Kubernetes namespace (default: default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safealign",
        description="Align a language model to be helpful and harmless with Safe-MM-DPO on OpenRLHF.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"safealign {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a recipe's stages (finished stages are skipped, interrupted ones resume)",
        description="Run a recipe's stages in a run directory. A stage whose outputs match the recipe and data "
        "is skipped; one interrupted mid-way resumes from its last checkpoint.",
    )
    _add_recipe_args(run)
    run.add_argument(
        "--stage", action="append", dest="stages", choices=STAGE_ORDER, metavar="NAME",
        help=f"run only this stage: {' | '.join(STAGE_ORDER)} (repeatable; in pipeline order whatever the order given)",
    )  # fmt: skip
    run.add_argument("--run-dir", type=Path, help="run directory (default: runs/<recipe name>)")
    run.add_argument("--force", action="store_true", help="run the selected stages again even if up to date")

    sweep = commands.add_parser(
        "sweep",
        help="run a recipe's sweep grid with Ray Tune and pick a trial by the selection rule",
        description="Run every combination of the recipe's sweep.grid (shared stages such as rm once, then one "
        "trial per grid point, in parallel where resources allow), print the table, write sweep/heatmap.png, "
        "and select: safety above sweep.select.min_safety with the best helpfulness, else the safest.",
    )
    _add_recipe_args(sweep)
    sweep.add_argument("--run-dir", type=Path, help="run directory (default: runs/<recipe name>)")
    sweep.add_argument(
        "--part",
        choices=("all", "shared", "trial", "select"),
        default="all",
        help="all (default) | shared: the shared stages only | trial: one grid point (--trial-index, no Ray; "
        "what each pod of a Kubernetes Indexed Job runs) | select: the rule over finished trials",
    )
    sweep.add_argument("--trial-index", type=int, metavar="N", help="with --part trial: the grid point (0-based)")

    validate = commands.add_parser("validate", help="validate a recipe (and its data files) without running it")
    _add_recipe_args(validate)
    validate.add_argument(
        "--world-size",
        type=int,
        metavar="N",
        help="also check that every training stage's batch splits over N processes (nodes × GPUs per node)",
    )
    validate.add_argument(
        "--stage", action="append", dest="stages", choices=STAGE_ORDER, metavar="NAME",
        help=f"with --world-size: check only this stage's training sections: {' | '.join(STAGE_ORDER)} "
        "(repeatable; default: the recipe's stages)",
    )  # fmt: skip
    validate.add_argument(
        "--flatten",
        action="store_true",
        help="print the recipe as one self-contained YAML (extends resolved, --set applied), e.g. for a ConfigMap",
    )

    submit = commands.add_parser(
        "submit",
        help="run a recipe's stages as Kubernetes Jobs, each after the previous one succeeded",
        description="Create the recipe ConfigMap, the run and model-cache PVCs and the stage Jobs from the "
        "charts in charts/ (same objects as helm install). Idempotent: finished stages are skipped, a running "
        "one is adopted. Without --wait it starts the next stage and returns; with --wait it drives the run to "
        "the end, streaming pod logs, and stops at the first failed stage naming its pod. Uses your kubeconfig.",
    )
    _add_recipe_args(submit)
    _add_cluster_args(submit)
    submit.add_argument("--stages", nargs="+", metavar="STAGE", help="only these of the recipe's stages")
    submit.add_argument("--values", "-f", dest="values", action="append", default=[], type=Path, metavar="FILE",
                        help="chart values (image, resources, scheduling, storage, secrets); repeatable")  # fmt: skip
    submit.add_argument("--run", help="run name (default: the recipe's name); Jobs are <run>-<stage>")
    submit.add_argument("--wait", action="store_true", help="wait for every stage, streaming logs")
    submit.add_argument("--poll", type=float, default=10.0, help="seconds between status checks (default 10)")

    status = commands.add_parser("status", help="the stage Jobs of a submitted run")
    status.add_argument("run", help="the run name (the recipe's name unless --run was given)")
    _add_cluster_args(status)

    logs = commands.add_parser("logs", help="the logs of a submitted run's stage pods")
    logs.add_argument("run", help="the run name")
    _add_cluster_args(logs)
    logs.add_argument("--stage", help="only this stage")
    logs.add_argument("--follow", "-f", action="store_true", help="keep streaming")

    commands.add_parser("losses", help="list the preference losses a recipe can name in align.loss (a plugin that "
                        "fails to load is named on stderr, and the exit code is 1)")

    report = commands.add_parser(
        "report",
        help="(re)write a run's report from its eval results: report.md and a self-contained report.html",
    )
    report.add_argument(
        "run_dir", type=Path, help="a run directory whose eval stage has finished, e.g. runs/quickstart"
    )

    pool = commands.add_parser(
        "pool",
        help="one registration run in blocks (runs of one design with other seeds): its eval.primary over all "
        "their runs, pairing within each block; held-out Ĵ_C from each block's own base (docs/eval.md)",
    )
    pool.add_argument("run_dirs", type=Path, nargs="+", help="the blocks' run directories, each with a finished eval")
    pool.add_argument("--json", type=Path, help="also write the pooled tests here (the eval's group_tests layout)")
    return parser


def _configure_logging() -> None:
    """Our progress lines on stderr (rank 0 only; other ranks only errors); libraries keep their own levels."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[safealign] %(message)s"))
    logger = logging.getLogger("safealign")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if is_rank_0() else logging.ERROR)
    logger.propagate = False


def require_gpu() -> None:
    """A Job that asks for GPUs sets SAFEALIGN_REQUIRE_GPU=1 (the charts do): finding none is an error,
    not a 7B model training on the CPU for days."""
    if os.environ.get("SAFEALIGN_REQUIRE_GPU") == "1":
        if not gpu_available():
            raise SafeAlignError(f"SAFEALIGN_REQUIRE_GPU=1 (this Job asks for GPUs) but no GPU is visible: {no_gpu_reason()}")


def check_input_files(recipe) -> list:
    """Read every data file the recipe's stages will read (training pairs, distill prompts, the eval
    sets, the held-out pairs), so a malformed row, or a training prompt that is an eval prompt, is one
    line from `validate` and from the start of `run`; returns the training pairs."""
    check_wandb(recipe)
    rows = load_training_rows(recipe)
    if "distill" in recipe.stages and recipe.distill.prompts is not None:
        load_prompt_file(recipe.distill.prompts)
    if "eval" in recipe.stages:
        load_prompts(recipe.eval.beavertails or DEFAULT_PATH)
        if recipe.eval.heldout_pairs:
            heldout_rows(recipe, rows)
    return rows


def _run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.command == "validate":
        if args.flatten:
            print(flatten_recipe(args.recipe, args.overrides), end="")
            return 0
        if args.world_size is not None:
            if args.world_size < 1:
                raise SafeAlignError(f"--world-size {args.world_size}: must be at least 1")
            check_world_size(recipe, args.world_size, args.stages)
        rows = check_input_files(recipe)
        print(
            f"{args.recipe}: ok (recipe {recipe.name!r}, stages {', '.join(recipe.stages)}, {len(rows)} training pairs)"
        )
        return 0
    if recipe.sweep is not None:
        raise SafeAlignError(
            f"{args.recipe} has a sweep section: run `safealign sweep {args.recipe}` "
            "(or add --set sweep=null to run the recipe's own values once)"
        )
    require_gpu()
    check_world_size(recipe, int(os.environ.get("WORLD_SIZE", "1")), args.stages)
    check_input_files(recipe)  # a bad eval or prompt file fails now, not after hours of training
    init_process_group()  # under torchrun: before the runner decides what to skip, resume or wipe
    run_dir = args.run_dir or Path("runs") / recipe.name
    summaries = run_recipe(recipe, run_dir, args.stages, args.force)
    leave_process_group()
    if is_rank_0():
        for summary in summaries:
            outputs = ", ".join(
                f"{name}: {run_dir / summary['stage'] / path}" for name, path in summary.get("outputs", {}).items()
            )
            when = "done earlier" if summary.get("up_to_date") else "finished"
            print(f"{summary['stage']}: {when} in {summary['seconds']:.0f} s; {outputs}")
    return 0


def _report(run_dir: Path) -> int:
    from safealign.eval.report import write_report  # matplotlib: only where a report is drawn

    evaluated = finished_stage(run_dir, "eval")
    results = evaluated.output("results") if evaluated else run_dir / "eval" / "results.json"
    if not results.is_file():
        raise SafeAlignError(f"{results} not found: run the eval stage first (`safealign run RECIPE --stage eval`)")
    aligned = finished_stage(run_dir, "align")
    try:
        data = json.loads(results.read_bytes())
        md, page = write_report(results.parent, data, aligned.policy_metrics() if aligned else {})
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise SafeAlignError(
            f"{results}: not an eval stage's results ({what}); rerun the eval stage (`safealign run RECIPE --stage eval --force`)"
        ) from None
    print(f"report: {page} (and {md})")
    return 0


def _pool(run_dirs: list[Path], json_path: Path | None) -> int:
    from safealign.eval.blocks import pool_blocks, pooled_markdown
    from safealign.orchestration.pool import load_block

    result = pool_blocks([load_block(run_dir) for run_dir in run_dirs])
    if json_path is not None:
        write_text_atomically(json_path, json.dumps(result, indent=1))
    print(pooled_markdown(result), end="")
    return 0


def _kubernetes(args: argparse.Namespace) -> int:
    """submit / status / logs; the API server's refusals and an unreachable cluster become one line."""
    try:
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError
    except ImportError:
        raise SafeAlignError(
            f"`safealign {args.command}` needs the Kubernetes client: pip install 'safealign[k8s]'"
        ) from None

    try:
        return _kubernetes_command(args)
    except ApiException as exc:
        try:
            message = json.loads(exc.body or "{}").get("message") or exc.reason
        except ValueError:
            message = exc.reason
        raise SafeAlignError(f"Kubernetes API ({exc.status} {exc.reason}): {message}") from None
    except HTTPError as exc:
        raise SafeAlignError(f"cannot reach the Kubernetes API server ({exc}); check your kubeconfig context") from None


def _kubernetes_command(args: argparse.Namespace) -> int:
    if args.command == "submit":
        k8s.submit(args.recipe, args.namespace, stages=args.stages, overrides=args.overrides, values_files=args.values,
                   run=args.run, wait=args.wait, poll=args.poll)  # fmt: skip
    elif args.command == "status":
        rows = k8s.status(args.run, args.namespace)
        if not rows:
            raise SafeAlignError(f"no Jobs for run {args.run!r} in namespace {args.namespace}")
        for r in rows:
            took = f"{r['seconds']} s" if r["seconds"] is not None else ""
            print(f"{r['stage']:8s} {r['job']:40s} {r['state']:10s} {r['started']:26s} {took}")
    else:
        k8s.logs(args.run, args.namespace, args.stage, args.follow)
    return 0


def _end_progress_bars() -> None:
    """Close the progress bars an error interrupted: one left mid-line would swallow the start of the
    error's line (and a log reader's `grep '^safealign: error'`)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", [])):
        bar.close()


def _quiet_libraries() -> None:
    """Library noise a user of the CLI should not wade through, silenced where the CLI starts (a
    library import must not change its host's warnings or progress bars): `datasets`' per-split
    map/filter bars next to the training bar, and torchdata's StatefulDataLoader warning about an
    internal torch API on every construction."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging()
    _quiet_libraries()
    try:
        if argv is None and args.command in ("run", "sweep"):  # a process of its own: it may re-exec
            use_caching_allocator()
        if args.command == "report":
            return _report(args.run_dir)
        if args.command == "pool":
            return _pool(args.run_dirs, args.json)
        if args.command == "sweep":
            from safealign.orchestration.sweep import run_sweep  # matplotlib (its heat map): only for a sweep

            require_gpu()
            run_sweep(args.recipe, args.overrides, args.run_dir, args.part, args.trial_index)
            return 0
        if args.command in ("submit", "status", "logs"):
            return _kubernetes(args)
        if args.command == "losses":
            from safealign.losses import describe_losses  # torch: only to list the losses

            broken = 0
            for name, summary, loads in describe_losses():
                if loads:
                    print(f"{name:14s} {summary}")
                else:
                    broken += 1
                    print(f"safealign: warning: {summary}", file=sys.stderr)
            return 1 if broken else 0
        return _run(args)
    except SafeAlignError as exc:
        _end_progress_bars()
        print(f"safealign: error: {exc}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, TransientError) else 2
    except OSError as exc:  # outside a stage (the runner names a stage's own): a full disk
        if not disk_full(exc):
            raise
        print(f"safealign: error: {disk_full_error(exc, Path.cwd())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safealign: interrupted; `safealign run` again resumes from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
