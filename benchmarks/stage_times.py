"""Wall time per stage of a finished run, from the `stage.json` each stage writes when it completes.

    .venv/bin/python benchmarks/stage_times.py runs/quickstart

`make bench` runs the quickstart into a fresh directory first, so every stage's time is this
machine's, now (a stage skipped as up to date keeps the time of the run that produced it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safealign.core.pipeline import STAGE_ORDER
from safealign.stages import STAGE_FILE


def stage_times(run_dir: Path) -> dict[str, float]:
    """Seconds per finished stage of `run_dir`, in pipeline order."""
    times = {}
    for name in STAGE_ORDER:
        path = run_dir / name / STAGE_FILE
        if path.is_file():
            times[name] = json.loads(path.read_text())["seconds"]
    if not times:
        raise SystemExit(f"{run_dir}: no finished stage (no */{STAGE_FILE}); run the recipe first")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    times = stage_times(args.run_dir)
    print("| stage | seconds | share |\n|---|---|---|")
    total = sum(times.values())
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.0f} | {seconds / total:.0%} |")
    print(f"| total | {total:.0f} ({total / 60:.1f} min) | |")


if __name__ == "__main__":
    main()
