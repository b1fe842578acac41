"""`manifests/` is what the charts render for the documented example: regenerate with `make manifests`."""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("helm_python", reason="the manifests are rendered with helm-python-sdk")

from safealign.k8s.manifests import REPO, RUN, render_example  # noqa: E402

OUT = REPO / "manifests" / RUN


def test_manifests_match_the_charts():
    expected = render_example()
    on_disk = {p.name: p.read_text() for p in OUT.glob("*.yaml")}
    assert sorted(on_disk) == sorted(expected), "manifests/ has other files than the generator writes: make manifests"
    stale = [name for name, text in expected.items() if on_disk[name] != text]
    assert not stale, f"manifests drifted from charts/ ({', '.join(stale)}): run `make manifests` and commit"


def test_manifests_are_valid_kubernetes_and_apply_in_order():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    names = sorted(p.name for p in OUT.glob("0*.yaml"))
    assert names[:2] == ["00-shared.yaml", "01-rm.yaml"] and names[-1] == "04-eval.yaml"
    for path in OUT.glob("*.yaml"):
        for obj in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(obj, "1.31.0", strict=True)
            assert obj["metadata"]["namespace"] == "safealign"
