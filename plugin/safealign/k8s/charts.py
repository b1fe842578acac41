"""Render SafeAlign's stage charts offline with Helm's engine (helm-python-sdk, Helm v4's Go SDK).

One function for everyone who needs the objects a release would create: `safealign submit`, the
manifests generator and the chart tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from safealign.core.errors import SafeAlignError
from safealign.core.pipeline import STAGE_ORDER

#: The charts directory (a link to the repository's `charts/`, shipped inside the package).
CHARTS = Path(__file__).resolve().parent / "charts"
#: One chart per pipeline stage, plus the sweep's.
STAGE_CHARTS = {stage: f"safealign-{stage}" for stage in (*STAGE_ORDER, "sweep")}


def _helm():
    try:
        import helm_python
    except ImportError:
        raise SafeAlignError("rendering the charts needs helm-python-sdk: pip install 'safealign[k8s]'") from None
    return helm_python


def load_chart(stage: str):
    """The stage's chart, loaded by Helm."""
    helm = _helm()
    if stage not in STAGE_CHARTS:
        raise SafeAlignError(f"unknown stage {stage!r}: one of {', '.join(STAGE_CHARTS)}")
    return helm.Chart.load(CHARTS / STAGE_CHARTS[stage])


def render_manifests(stage: str, values: dict[str, Any], name: str, namespace: str) -> dict[str, str]:
    """The chart's rendered templates (path -> YAML text), as `helm template` would print them."""
    helm = _helm()
    chart = load_chart(stage)
    try:
        return chart.render(values, name=name, namespace=namespace)
    except helm.HelmValuesError as exc:
        raise SafeAlignError(f"chart values: {' '.join(str(exc).split())}") from None
    except helm.HelmRenderError as exc:
        raise SafeAlignError(f"chart {STAGE_CHARTS[stage]}: {str(exc).strip().splitlines()[-1].strip()}") from None


def render_objects(stage: str, values: dict[str, Any], name: str, namespace: str) -> list[dict]:
    """The Kubernetes objects of a release, in template order (NOTES and empty documents left out)."""
    objects = []
    for path, text in render_manifests(stage, values, name, namespace).items():
        if not path.endswith("NOTES.txt"):
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects
