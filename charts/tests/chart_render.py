"""Render a stage chart into objects by kind, through the same renderer `safealign submit` uses.
Importing it skips the importing test module where Helm's engine (helm-python-sdk) is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from safealign.k8s.charts import CHARTS, STAGE_CHARTS, render_manifests

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is a test dependency: pip install -e '.[test]'")

REPO = Path(__file__).resolve().parents[2]
STAGES = tuple(STAGE_CHARTS)
RECIPE = (REPO / "recipes" / "mistral-7b-beavertails.yaml").read_text()

assert CHARTS.resolve() == (REPO / "charts").resolve(), "the package's charts link must point at charts/"


def chart_defaults(stage: str) -> dict:
    """The stage chart's own values.yaml."""
    return yaml.safe_load((CHARTS / f"safealign-{stage}" / "values.yaml").read_text())


def job_of(objects: dict) -> dict:
    (job,) = objects["Job"]
    return job


def container(objects: dict) -> dict:
    (c,) = job_of(objects)["spec"]["template"]["spec"]["containers"]
    return c


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
