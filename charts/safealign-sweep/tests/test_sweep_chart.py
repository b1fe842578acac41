"""safealign-sweep: the parts of a sweep as Jobs (trials as one Indexed Job pod per grid point)."""

from __future__ import annotations

import pytest
from chart_render import container, job_of, render

from safealign.core.errors import SafeAlignError


def test_sweep_trials_are_one_indexed_job_pod_per_grid_point():
    objects = render(
        "sweep", {"sweep": {"part": "trial", "trials": 9, "parallelism": 3}, "resources": {"gpusPerNode": 1}}
    )
    spec = job_of(objects)["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 9, 3)
    assert spec["backoffLimitPerIndex"] == 2 and "backoffLimit" not in spec  # a failing trial fails alone
    assert spec["podFailurePolicy"]["rules"][0]["action"] == "FailIndex"
    c = container(objects)
    assert c["command"] == ["safealign", "sweep", "/recipe/recipe.yaml", "--run-dir", "/runs/demo",
                            "--part", "trial", "--trial-index", "$(TRIAL_INDEX)"]  # fmt: skip
    assert "TRIAL_INDEX" in {e["name"] for e in c["env"]} and "Service" not in objects
    shared = job_of(render("sweep", {"sweep": {"part": "shared"}}))["spec"]
    assert "completionMode" not in shared and shared["backoffLimit"] == 2
    with pytest.raises(SafeAlignError, match="sweep.trials: set it to the number of grid points"):
        render("sweep", {"sweep": {"part": "trial"}})
    with pytest.raises(SafeAlignError, match="job.nodes > 1 is not supported for a sweep"):
        render("sweep", {"sweep": {"part": "trial", "trials": 9}, "job": {"nodes": 2}})


@pytest.mark.parametrize("part", ["all", "shared", "trial", "select"])
def test_every_sweep_part_is_one_driver_process_whatever_the_gpus(part):
    """With the default 8 GPUs per node a sweep part once rendered as `torchrun --nproc-per-node=8 ...
    safealign sweep`: 8 Ray drivers running the grid into the same trial directories. The training
    inside a trial starts its own torchrun (sweep.gpus_per_trial)."""
    objects = render("sweep", {"sweep": {"part": part, "trials": 9}})
    c = container(objects)
    assert c["command"][:3] == ["safealign", "sweep", "/recipe/recipe.yaml"]
    assert c["command"][c["command"].index("--part") + 1] == part
    assert not any("torchrun" in arg or "nproc" in arg for arg in c["command"])
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 8  # the GPUs are still the pod's, for the trials
    assert [i["name"] for i in job_of(objects)["spec"]["template"]["spec"].get("initContainers", [])] == []
