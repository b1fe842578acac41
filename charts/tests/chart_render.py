"""Render a stage chart into objects by kind, through the same renderer `safealign submit` uses."""

from __future__ import annotations

from pathlib import Path

import yaml

from safealign.k8s.charts import CHARTS, render_manifests

REPO = Path(__file__).resolve().parents[2]
STAGES = ("rm", "align", "distill", "eval", "sweep")
RECIPE = (REPO / "recipes" / "mistral-7b-beavertails.yaml").read_text()

assert CHARTS.resolve() == (REPO / "charts").resolve(), "the package's charts link must point at charts/"


def render(stage: str, values: dict | None = None, name: str = "demo", namespace: str = "ml") -> dict[str, list[dict]]:
    """Rendered objects by kind (template order), from `values` on top of the chart's defaults."""
    objects: dict[str, list[dict]] = {}
    for path, text in render_manifests(stage, {"recipe": RECIPE, **(values or {})}, name, namespace).items():
        if path.endswith("NOTES.txt"):
            objects.setdefault("NOTES", []).append({"text": text})
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.setdefault(doc["kind"], []).append(doc)
    return objects
