"""The stage charts, rendered by Helm's engine and checked like helm-unittest does: by path.

Every rendered object is also validated against the Kubernetes OpenAPI schemas of 1.29-1.33 with
kubernetes-validate in strict mode (a misspelt field fails). No API server runs here; the real-cluster
test is tests/test_kubernetes_cluster.py.
"""

from __future__ import annotations

import pytest
from chart_render import CHARTS, RECIPE, STAGES, render

from safealign.errors import SafeAlignError

KUBE_VERSIONS = ("1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0")


@pytest.fixture(scope="module")
def helm():
    return pytest.importorskip("helm_python", reason="helm-python-sdk is a test dependency: pip install -e '.[test]'")


def job_of(objects: dict) -> dict:
    (job,) = objects["Job"]
    return job


def container(objects: dict) -> dict:
    (c,) = job_of(objects)["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "sweep"])
def test_each_stage_renders_a_complete_release(helm, stage):
    objects = render(stage)
    assert sorted(k for k in objects if k != "NOTES") == ["ConfigMap", "Job", "PersistentVolumeClaim", "Pod"]
    c = container(objects)
    run = ["run", "/recipe/recipe.yaml", "--stage", stage, "--run-dir", "/runs/demo"]
    if stage == "eval":  # one process: vLLM takes the pod's 8 GPUs by tensor parallelism
        assert c["command"] == ["safealign", *run]
    else:
        assert c["command"] == ["torchrun", "--standalone", "--nproc-per-node=8", "-m", "safealign.cli", *run]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8" == c["resources"]["requests"]["nvidia.com/gpu"]
    assert objects["ConfigMap"][0]["data"]["recipe.yaml"].strip() == RECIPE.strip()
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/recipe", "/runs", "/models", "/dev/shm", "/tmp"}
    spec = job_of(objects)["spec"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["medium"] == "Memory"
    assert spec["backoffLimit"] == 2 and spec["ttlSecondsAfterFinished"] == 604800
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    assert {p["metadata"]["name"] for p in objects["PersistentVolumeClaim"]} == {"demo-runs", "demo-model-cache"}
    assert all(
        p["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for p in objects["PersistentVolumeClaim"]
    )
    test_pod = objects["Pod"][0]
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test_pod["spec"]["containers"][0]["command"] == ["safealign", "validate", "/recipe/recipe.yaml"]
    assert "helm test demo -n ml" in objects["NOTES"][0]["text"]


@pytest.mark.parametrize(
    "stage, values",
    [("align", {}), ("align", {"job": {"nodes": 2}}), ("eval", {}), ("sweep", {"sweep": {"part": "trial", "trials": 3}})],
    ids=["align", "align-2-nodes", "eval", "sweep-trials"],
)
def test_pods_have_no_api_token_and_a_read_only_root(helm, stage, values):
    """Every container of every pod (init containers and the helm test pod too) runs on a read-only root
    filesystem; what it writes goes to a mounted volume, HOME included; no service-account token."""
    objects = render(stage, values)
    for pod in [job_of(objects)["spec"]["template"]["spec"], *(p["spec"] for p in objects.get("Pod", []))]:
        assert pod["automountServiceAccountToken"] is False
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            home = {e["name"]: e.get("value") for e in c.get("env", [])}.get("HOME")
            assert home is None and c["name"] == "rendezvous" or home in mounts, c["name"]  # rendezvous writes nothing
    main = container(objects)
    writable = {m["mountPath"] for m in main["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/runs", "/models", "/dev/shm", "/tmp"}


def test_multi_node_is_an_indexed_job_with_rendezvous(helm):
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


def test_sweep_trials_are_one_indexed_job_pod_per_grid_point(helm):
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
    with pytest.raises(SafeAlignError, match="the eval stage runs on one node"):
        render("eval", {"job": {"nodes": 2}})


@pytest.mark.parametrize("part", ["all", "shared", "trial", "select"])
def test_every_sweep_part_is_one_driver_process_whatever_the_gpus(helm, part):
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


def test_single_gpu_and_cpu_run_safealign_directly(helm):
    for gpus in (0, 1):
        c = container(render("eval", {"resources": {"gpusPerNode": gpus}}))
        assert c["command"][:2] == ["safealign", "run"]
        assert ("nvidia.com/gpu" in c["resources"]["requests"]) is (gpus == 1)


def test_scheduling_secrets_and_existing_claims(helm):
    objects = render(
        "align",
        {
            "scheduling": {"nodeSelector": {"gpu": "h100"}, "priorityClassName": "training", "kueueQueue": "team-a",
                           "affinity": {"nodeAffinity": {}}},
            "secrets": {"hubToken": {"name": "hf", "key": "token"},
                        "judgeApiKey": {"name": "judge", "key": "api-key", "env": "OPENAI_API_KEY"}},
            "storage": {"runs": {"existingClaim": "shared-runs"}, "modelCache": {"existingClaim": "models"}},
            "runName": "mistral-seed",
            "job": {"activeDeadlineSeconds": 86400},
        },
    )  # fmt: skip
    job = job_of(objects)
    pod = job["spec"]["template"]["spec"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["priorityClassName"] == "training"
    assert job["spec"]["activeDeadlineSeconds"] == 86400
    env = {e["name"]: e for e in container(objects)["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "judge", "key": "api-key"}
    assert all("value" not in e for n, e in env.items() if n in ("HF_TOKEN", "OPENAI_API_KEY"))  # never a value
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    assert claims == {"runs": "shared-runs", "model-cache": "models"}
    assert "PersistentVolumeClaim" not in objects  # existing claims: nothing created
    assert container(objects)["command"][-1] == "/runs/mistral-seed"


def test_existing_recipe_configmap_and_missing_recipe(helm):
    objects = render("rm", {"recipe": "", "recipeConfigMap": "run-42-recipe"})
    assert "ConfigMap" not in objects
    assert {v["name"]: v for v in job_of(objects)["spec"]["template"]["spec"]["volumes"]}["recipe"]["configMap"] == {
        "name": "run-42-recipe"
    }
    with pytest.raises(SafeAlignError, match="recipe is empty: pass the recipe file with --set-file"):
        render("rm", {"recipe": ""})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"jobs": {}}, "jobs"),  # unknown key (misspelt "job")
        ({"resources": {"gpusPerNode": "8"}}, "gpusPerNode"),
        ({"job": {"nodes": -1}}, "nodes"),
        ({"storage": {"runs": {"size": "lots"}}}, "size"),
        ({"secrets": {"judgeApiKey": {"name": "judge", "key": "k"}}}, "judgeApiKey"),
    ],
)
def test_schema_rejects_bad_values(helm, values, message):
    with pytest.raises(SafeAlignError, match=f"^chart values: .*{message}") as caught:
        render("align", values)
    assert "\n" not in str(caught.value)  # one line


@pytest.mark.parametrize("stage", STAGES)
def test_lint_strict(helm, stage):
    report = helm.lint(CHARTS / f"safealign-{stage}", {"recipe": RECIPE}, strict=True)
    assert not report["errors"], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report["messages"]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_rendered_objects_are_valid_kubernetes(helm, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    cases = [(s, {}) for s in STAGES] + [
        ("align", {"job": {"nodes": 2}}),
        ("sweep", {"sweep": {"part": "trial", "trials": 9}}),
    ]
    for stage, values in cases:
        for kind, objects in render(stage, values).items():
            for obj in objects if kind != "NOTES" else []:
                kubernetes_validate.validate(obj, version, strict=True)  # raises on any unknown field


def test_torchrun_stages_check_the_recipe_against_their_world_size_first(helm, tmp_path):
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
