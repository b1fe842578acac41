"""safealign-rm: both value models train on the pod's GPUs under torchrun; a day's deadline."""

from __future__ import annotations

from chart_render import container, job_of, render


def test_rm_trains_under_torchrun_on_every_gpu_of_the_pod():
    objects = render("rm", {"resources": {"gpusPerNode": 4}})
    assert container(objects)["command"][:4] == ["torchrun", "--standalone", "--nproc-per-node=4", "-m"]
    assert job_of(objects)["spec"]["activeDeadlineSeconds"] == 86400
    unlimited = job_of(render("rm", {"job": {"activeDeadlineSeconds": None}}))["spec"]
    assert "activeDeadlineSeconds" not in unlimited  # null: no wall-clock limit
