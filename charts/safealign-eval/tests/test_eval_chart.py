"""safealign-eval: one process on one node, one GPU by default (a 7B's generation and scoring fit it)."""

from __future__ import annotations

import pytest
from chart_render import container, render

from safealign.core.errors import SafeAlignError


def test_eval_defaults_to_one_gpu_and_one_node():
    c = container(render("eval"))
    assert c["command"][:2] == ["safealign", "run"]  # no torchrun
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    with pytest.raises(SafeAlignError, match="the eval stage runs on one node"):
        render("eval", {"job": {"nodes": 2}})
    with pytest.raises(SafeAlignError, match="sweep"):  # a stage chart has only its own values
        render("eval", {"sweep": {"part": "trial"}})


def test_single_gpu_and_cpu_run_safealign_directly():
    for gpus in (0, 1):
        c = container(render("eval", {"resources": {"gpusPerNode": gpus}}))
        assert c["command"][:2] == ["safealign", "run"]
        assert ("nvidia.com/gpu" in c["resources"]["requests"]) is (gpus == 1)
