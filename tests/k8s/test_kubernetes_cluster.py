"""The real-cluster test: `safealign submit` runs rm -> align of a tiny CPU recipe as real Jobs.

Runs when a cluster is reachable through the kubeconfig (kind or k3s is enough: no GPU needed) and
SAFEALIGN_TEST_IMAGE names an image built from this repository's Dockerfile that the cluster can
pull (`kind load docker-image ...`). Otherwise it is skipped, and pytest prints why (docs/kubernetes.md).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from support import ROOT

HERE = Path(__file__).resolve().parent


def _cluster_or_skip():
    kubernetes = pytest.importorskip("kubernetes")
    pytest.importorskip("helm_python")
    image = os.environ.get("SAFEALIGN_TEST_IMAGE")
    try:
        kubernetes.config.load_kube_config()
        version = kubernetes.client.VersionApi().get_code(_request_timeout=5)
    except Exception as exc:  # no kubeconfig, no context, unreachable server: all mean "no cluster here"
        pytest.skip(f"no Kubernetes cluster reachable through the kubeconfig ({type(exc).__name__}: {exc})")
    if not image:
        pytest.skip(
            f"cluster {version.git_version} reachable, but SAFEALIGN_TEST_IMAGE (an image built from Dockerfile) is not set"
        )
    return kubernetes, image


@pytest.mark.slow
def test_submit_runs_stages_as_real_jobs(tmp_path):
    kubernetes, image = _cluster_or_skip()
    from safealign.k8s import submit as k8s

    namespace = f"safealign-test-{uuid.uuid4().hex[:6]}"
    core = kubernetes.client.CoreV1Api()
    core.create_namespace({"metadata": {"name": namespace}})
    repository, _, tag = image.rpartition(":")
    values = tmp_path / "image.yaml"
    values.write_text(f"image: {{repository: {repository}, tag: '{tag}', pullPolicy: IfNotPresent}}\n")
    try:
        done = k8s.submit(ROOT / "recipes" / "k8s-smoke.yaml", namespace, values_files=[HERE / "cluster" / "cpu-values.yaml", values],
                          wait=True, poll=3.0)  # fmt: skip
        assert done == ["rm", "align"]
        rows = k8s.status("k8s-smoke", namespace)
        assert [(r["stage"], r["state"]) for r in rows] == [("rm", "Succeeded"), ("align", "Succeeded")]
    finally:
        core.delete_namespace(namespace)
