"""The stage charts, rendered by Helm's engine and checked like helm-unittest does: by path.

Every rendered object is also validated against the Kubernetes OpenAPI schemas of 1.29-1.33 with
kubernetes-validate in strict mode (a misspelt field fails). No API server runs here; the real-cluster
test is tests/k8s/test_kubernetes_cluster.py.
"""

from __future__ import annotations

import pytest
from chart_render import RECIPE, STAGES, chart_defaults, container, job_of, render

from safealign.core.errors import SafeAlignError

KUBE_VERSIONS = ("1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0")


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "sweep"])
def test_each_stage_renders_a_complete_release(stage):
    objects = render(stage)
    assert sorted(k for k in objects if k != "NOTES") == ["ConfigMap", "Job", "PersistentVolumeClaim", "Pod"]
    c = container(objects)
    defaults = chart_defaults(stage)  # the chart's own values.yaml: its GPUs and deadline reach the Job
    gpus = defaults["resources"]["gpusPerNode"]
    run = ["run", "/recipe/recipe.yaml", "--stage", stage, "--run-dir", "/runs/demo"]
    if stage == "eval" or gpus == 1:  # one process (eval: vLLM takes the pod's GPUs by tensor parallelism)
        assert c["command"] == ["safealign", *run]
    else:
        assert c["command"] == ["torchrun", "--standalone", f"--nproc-per-node={gpus}", "-m", "safealign.cli", *run]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == str(gpus) == c["resources"]["requests"]["nvidia.com/gpu"]
    assert c["resources"]["requests"]["memory"] == defaults["resources"]["requests"]["memory"]
    assert job_of(objects)["spec"]["activeDeadlineSeconds"] == defaults["job"]["activeDeadlineSeconds"]
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
def test_pods_have_no_api_token_and_a_read_only_root(stage, values):
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


@pytest.mark.parametrize("stage, values", [("align", {"job": {"nodes": 2}}), ("eval", {})], ids=["align-2-nodes", "eval"])
def test_every_container_states_its_resources(stage, values):
    """A namespace with a ResourceQuota or LimitRange admits a pod only if each of its containers states
    requests: the init containers (validate, rendezvous) and the helm test pod too."""
    objects = render(stage, values)
    for pod in [job_of(objects)["spec"]["template"]["spec"], *(p["spec"] for p in objects.get("Pod", []))]:
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], c["name"]
    init = job_of(render("align", {"job": {"nodes": 2}, "resources": {"init": {"requests": {"cpu": "2", "memory": "3Gi"}}}}))
    resources = {c["name"]: c["resources"] for c in init["spec"]["template"]["spec"]["initContainers"]}
    assert resources["validate"]["requests"] == resources["rendezvous"]["requests"] == {"cpu": "2", "memory": "3Gi"}


def test_scheduling_secrets_and_existing_claims():
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
    # Optional references: a missing Secret must not hold the pod (the stage that needs it says so).
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token", "optional": True}
    assert "value" not in env["HF_TOKEN"]  # never a value
    assert "OPENAI_API_KEY" not in env  # the judge key goes only where judges run
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    assert claims == {"runs": "shared-runs", "model-cache": "models"}
    assert "PersistentVolumeClaim" not in objects  # existing claims: nothing created
    assert container(objects)["command"][-1] == "/runs/mistral-seed"


@pytest.mark.parametrize("stage", STAGES)
def test_the_judge_key_reaches_only_the_stages_that_judge(stage):
    secrets = {"hubToken": {"name": "hf", "key": "token"},
               "judgeApiKey": {"name": "judge", "key": "api-key", "env": "OPENAI_API_KEY"}}  # fmt: skip
    env = {e["name"]: e for e in container(render(stage, {"secrets": secrets}))["env"]}
    if stage in ("eval", "sweep"):
        assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "judge", "key": "api-key", "optional": True}
        assert "value" not in env["OPENAI_API_KEY"]
    else:
        assert "OPENAI_API_KEY" not in env
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_the_documented_rdma_values_render():
    """docs/kubernetes.md's multi-node RDMA values pass the schema and reach the container."""
    objects = render("align", {
        "job": {"nodes": 2, "env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}, {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"}]},
        "resources": {"limits": {"rdma/rdma_shared_device_a": 1}},
        "securityContext": {"container": {"capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]}}},
    })  # fmt: skip
    main = container(objects)
    assert main["resources"]["limits"]["rdma/rdma_shared_device_a"] == "1"
    assert main["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert {"NCCL_IB_HCA", "NCCL_SOCKET_IFNAME"} <= {e["name"] for e in main["env"]}


def test_existing_recipe_configmap_and_missing_recipe():
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
        # the pods' hardening is enforced, not a default a values file can switch off
        ({"securityContext": {"container": {"privileged": True}}}, "privileged"),
        ({"securityContext": {"container": {"allowPrivilegeEscalation": True}}}, "allowPrivilegeEscalation"),
        ({"securityContext": {"container": {"capabilities": {"add": ["SYS_ADMIN"], "drop": ["ALL"]}}}}, "add"),
        ({"securityContext": {"container": {"capabilities": {"drop": []}}}}, "drop"),
        ({"securityContext": {"pod": {"runAsNonRoot": False}}}, "runAsNonRoot"),
        ({"securityContext": {"pod": {"runAsUser": 0}}}, "runAsUser"),
    ],
)
def test_schema_rejects_bad_values(values, message):
    with pytest.raises(SafeAlignError, match=f"^chart values: .*{message}") as caught:
        render("align", values)
    assert "\n" not in str(caught.value)  # one line


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_rendered_objects_are_valid_kubernetes(version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    cases = [(s, {}) for s in STAGES] + [
        ("align", {"job": {"nodes": 2}}),
        ("sweep", {"sweep": {"part": "trial", "trials": 9}}),
    ]
    for stage, values in cases:
        for kind, objects in render(stage, values).items():
            for obj in objects if kind != "NOTES" else []:
                kubernetes_validate.validate(obj, version, strict=True)  # raises on any unknown field
