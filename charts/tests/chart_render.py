"""Render the stage charts with Helm's own engine (helm-python-sdk: Helm v4's Go SDK, no helm binary)."""

from __future__ import annotations

from pathlib import Path

import yaml

CHARTS = Path(__file__).resolve().parents[1]
REPO = CHARTS.parent
STAGES = ("rm", "align", "distill", "eval")
RECIPE = (REPO / "recipes" / "mistral-7b-beavertails.yaml").read_text()


def render(stage: str, values: dict | None = None, name: str = "demo", namespace: str = "ml") -> dict[str, list[dict]]:
    """Rendered objects by kind (template order), from `values` on top of the chart's defaults."""
    import helm_python as helm

    chart = helm.Chart.load(CHARTS / f"safealign-{stage}")
    manifests = chart.render({"recipe": RECIPE, **(values or {})}, name=name, namespace=namespace)
    objects: dict[str, list[dict]] = {}
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            objects.setdefault("NOTES", []).append({"text": text})
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.setdefault(doc["kind"], []).append(doc)
    return objects
