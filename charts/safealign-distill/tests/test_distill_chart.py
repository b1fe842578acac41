"""safealign-distill: the run's models come from the shared volumes, the teacher is read from the run."""

from __future__ import annotations

from chart_render import container, job_of, render


def test_distill_reads_the_run_directory_the_align_release_wrote():
    objects = render("distill", {"runName": "mistral", "storage": {"runs": {"existingClaim": "mistral-runs"}}})
    c = container(objects)
    assert c["command"][-2:] == ["--run-dir", "/runs/mistral"]  # the same run directory as align's
    volumes = {v["name"]: v for v in job_of(objects)["spec"]["template"]["spec"]["volumes"]}
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "mistral-runs" for v in volumes.values())
    assert "PersistentVolumeClaim" not in objects or all(
        p["metadata"]["name"] != "demo-runs" for p in objects["PersistentVolumeClaim"]
    )  # an existing claim is used, not created
