"""safealign-align: multi-node training (Indexed Job, c10d rendezvous) and the world-size check."""

from __future__ import annotations

from chart_render import container, job_of, render


def test_multi_node_is_an_indexed_job_with_rendezvous():
    objects = render("align", {"job": {"nodes": 2}, "resources": {"gpusPerNode": 4}})
    spec = job_of(objects)["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["template"]["spec"]["subdomain"] == "demo"
    (service,) = objects["Service"]
    assert service["metadata"]["name"] == "demo" and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    c = container(objects)
    assert c["command"][:8] == ["torchrun", "--nnodes=2", "--nproc-per-node=4", "--max-restarts=3",
                                "--rdzv-backend=c10d", "--rdzv-endpoint=demo-0.demo:29400", "--rdzv-id=demo",
                                "--rdzv-conf=join_timeout=900"]  # fmt: skip
    init = {i["name"]: i for i in spec["template"]["spec"]["initContainers"]}
    assert list(init) == ["rendezvous", "validate"]  # pod 0's name resolves first, then the recipe is checked
    wait = init["rendezvous"]["command"]
    assert wait[:2] == ["python", "-c"] and wait[3:] == ["demo-0.demo", "900"]
    import subprocess
    import sys

    for host, code in (("localhost", 0), ("demo-0.nowhere.invalid", 1)):  # the script the pod runs, here
        result = subprocess.run([sys.executable, "-c", wait[2], host, "3"], capture_output=True, text=True, timeout=60)
        assert result.returncode == code, result.stderr
    rank = {e["name"]: e for e in c["env"]}["NODE_RANK"]
    assert (
        rank["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )


def test_torchrun_stages_check_the_recipe_against_their_world_size_first(tmp_path):
    """torchrun reports a worker's exit 2 as its own exit 1, which the Job would retry as a crash. So a
    multi-process stage runs `safealign validate --world-size` in an init container, with the --set items
    of job.extraArgs, and a failure there (exit 2) fails the Job. The rendered command is run here, on
    the seed recipe: 2 nodes × 8 GPUs cannot split its batch of 16 at micro-batch 2."""
    import subprocess
    import sys

    from chart_render import REPO

    values = {"job": {"nodes": 2, "extraArgs": ["--force", "--set", "align.micro_batch_size=1"]},
              "resources": {"gpusPerNode": 8}}  # fmt: skip
    spec = job_of(render("align", values))["spec"]
    init = {i["name"]: i for i in spec["template"]["spec"]["initContainers"]}["validate"]
    assert init["command"] == ["safealign", "validate", "/recipe/recipe.yaml", "--world-size", "16",
                               "--stage", "align", "--set", "align.micro_batch_size=1"]  # fmt: skip
    assert {"action": "FailJob", "onExitCodes": {"containerName": "validate", "operator": "In", "values": [2]}} in (
        spec["podFailurePolicy"]["rules"]
    )
    env = {e["name"]: e.get("value") for e in container(render("align", values))["env"]}
    assert env["SAFEALIGN_REQUIRE_GPU"] == "1"

    seed = str(REPO / "recipes" / "mistral-7b-beavertails.yaml")
    for command, code in ((init["command"], 0), (init["command"][:-2], 2)):
        local = [sys.executable, "-m", "safealign.cli", *[seed if a == "/recipe/recipe.yaml" else a for a in command[1:]]]
        result = subprocess.run(local, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert result.returncode == code, result.stderr

    one_gpu = job_of(render("align", {"resources": {"gpusPerNode": 1}}))["spec"]["template"]["spec"]
    assert "initContainers" not in one_gpu  # one process: `safealign run` exits 2 itself
    cpu = container(render("align", {"resources": {"gpusPerNode": 0}}))
    assert "SAFEALIGN_REQUIRE_GPU" not in {e["name"] for e in cpu["env"]}
