"""`safealign submit / status / logs` against a local HTTP stand-in for the API server (tests/k8s/k8s_standin.py:
not Kubernetes; it plays a scripted life for each Job). The real-cluster test is test_kubernetes_cluster.py."""

from __future__ import annotations

import pytest
import yaml
from k8s_standin import Server, StandIn
from support import ROOT

from safealign.core.errors import SafeAlignError

pytest.importorskip("helm_python", reason="submit renders the charts with helm-python-sdk")
pytest.importorskip("kubernetes")

from safealign.k8s import submit as k8s  # noqa: E402

RECIPE = ROOT / "recipes" / "mistral-7b-beavertails.yaml"
STAGES = ["rm", "align", "distill", "eval"]
RUN = "mistral-7b-beavertails"
VALUES = RECIPE.parents[1] / "charts" / "examples" / "mistral-7b-beavertails.values.yaml"


def run_submit(state: StandIn, **kwargs):
    kwargs.setdefault("values_files", [VALUES])
    lines: list[str] = []
    with Server(state) as api_client:
        cluster = k8s.Cluster(api_client, namespace="ml")
        try:
            done = k8s.submit(RECIPE, "ml", cluster=cluster, poll=0.01, say=lines.append, **kwargs)
        except SafeAlignError as exc:
            return None, lines, str(exc)
    return done, lines, None


def test_stages_run_in_order_each_after_the_previous_succeeded():
    state = StandIn()
    done, lines, error = run_submit(state, wait=True)
    assert error is None and done == STAGES
    assert state.posted("configmaps") == [f"{RUN}-recipe"]
    assert state.posted("persistentvolumeclaims") == [f"{RUN}-runs", f"{RUN}-model-cache"]
    assert state.posted("jobs") == [f"{RUN}-{s}" for s in STAGES]
    # Each Job is created only after the previous one was last polled (and seen Complete).
    jobs = [(method, name) for method, coll, name in state.events if coll == "jobs"]
    for before, after in zip(STAGES, STAGES[1:]):
        last_poll = max(i for i, event in enumerate(jobs) if event == ("GET", f"{RUN}-{before}"))
        assert last_poll < jobs.index(("POST", f"{RUN}-{after}"))
        assert state.objects[("jobs", "ml", f"{RUN}-{before}")]["status"]["conditions"][0]["type"] == "Complete"
    job = state.objects[("jobs", "ml", f"{RUN}-align")]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-3:] == ["align", "--run-dir", f"/runs/{RUN}"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["recipe"]["configMap"]["name"] == f"{RUN}-recipe"
    assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == f"{RUN}-runs"
    assert f"[{RUN}-align-0-x1] [safealign] {RUN}-align-0-x1: line one" in lines  # pod logs streamed


def test_a_failed_stage_stops_the_run_naming_stage_and_pod():
    state = StandIn(outcomes={f"{RUN}-align": 2})
    done, lines, error = run_submit(state, wait=True)
    assert done is None
    assert error.startswith(f"stage align failed: Job {RUN}-align: Job has reached the specified backoff limit; "
                            f"pod {RUN}-align-0-x1 exited 2 (Error)")  # fmt: skip
    assert state.posted("jobs") == [f"{RUN}-rm", f"{RUN}-align"]  # distill and eval never created
    # Submitting again does not retry a failed Job behind the user's back.
    _, _, again = run_submit(state, wait=True)
    assert "Delete the Job to retry: kubectl -n ml delete job" in again
    assert state.posted("jobs") == [f"{RUN}-rm", f"{RUN}-align"]


def test_without_wait_each_call_advances_one_stage_and_is_idempotent():
    state = StandIn()
    done, lines, _ = run_submit(state)
    assert done == [] and state.posted("jobs") == [f"{RUN}-rm"]
    done, lines, _ = run_submit(state)  # rm still running: adopted, nothing new created
    assert state.posted("jobs") == [f"{RUN}-rm"] and any("already running" in x for x in lines)
    done, lines, _ = run_submit(state)  # rm has finished by now: align starts
    assert done == ["rm"] and state.posted("jobs") == [f"{RUN}-rm", f"{RUN}-align"]
    assert state.posted("configmaps") == [f"{RUN}-recipe"]  # replaced (PUT), not re-created
    assert ("PUT", f"/api/v1/namespaces/ml/configmaps/{RUN}-recipe") in state.requests


def test_stage_selection_values_and_status(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text("resources: {gpusPerNode: 2}\nstorage: {runs: {existingClaim: team-runs}}\n")
    state = StandIn()
    done, _, error = run_submit(state, stages=["rm", "align"], values_files=[values], wait=True)
    assert done == ["rm", "align"] and error is None
    assert state.posted("persistentvolumeclaims") == [f"{RUN}-model-cache"]  # the runs claim exists already
    job = state.objects[("jobs", "ml", f"{RUN}-rm")]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    with Server(state) as api_client:
        rows = k8s.status(RUN, "ml", k8s.Cluster(api_client, namespace="ml"))
    assert [(r["stage"], r["state"], r["seconds"]) for r in rows] == [
        ("rm", "Succeeded", 300),
        ("align", "Succeeded", 300),
    ]
    _, _, error = run_submit(StandIn(), stages=["sweep"])
    assert error.startswith("--stages sweep: not in the recipe's stages")


def test_an_llm_judge_without_its_secret_is_refused_before_anything_is_created():
    state = StandIn()
    _, _, error = run_submit(state, values_files=[])
    assert error.startswith(
        "eval.llm_judge.api_key_env is OPENAI_API_KEY but the chart values give no secrets.judgeApiKey"
    )
    assert state.events == []  # nothing reached the API server


def test_a_sweep_recipe_is_shared_stages_then_an_indexed_trials_job_then_selection(tmp_path):
    recipe = RECIPE.parents[1] / "recipes" / "sweep-lambda-w.yaml"
    state = StandIn(outcomes={"sweep-lambda-w-sweep-trials": 1})  # some trial failed: the Job fails
    lines: list[str] = []
    with Server(state) as api_client:
        cluster = k8s.Cluster(api_client, namespace="ml")
        with pytest.raises(SafeAlignError, match="stage sweep-trials failed"):  # no trial succeeded
            k8s.submit(recipe, "ml", cluster=cluster, poll=0.01, say=lines.append, wait=True)
    assert state.posted("jobs") == ["sweep-lambda-w-sweep-shared", "sweep-lambda-w-sweep-trials"]
    trials = state.objects[("jobs", "ml", "sweep-lambda-w-sweep-trials")]["spec"]
    assert trials["completions"] == 9 and trials["completionMode"] == "Indexed"
    assert trials["template"]["spec"]["containers"][0]["command"][-2:] == ["--trial-index", "$(TRIAL_INDEX)"]
    with Server(StandIn()) as api_client:
        done = k8s.submit(
            recipe, "ml", cluster=k8s.Cluster(api_client, namespace="ml"), poll=0.01, say=lines.append, wait=True
        )
    assert done == ["sweep-shared", "sweep-trials", "sweep-select"]


def test_an_unreachable_cluster_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from safealign.cli import main

    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "x", "cluster": {"server": "http://127.0.0.1:9"}}],  # nothing listens on port 9
        "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}], "users": [{"name": "x", "user": {}}],
    }))  # fmt: skip
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert main(["status", "some-run", "-n", "ml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("safealign: error: cannot reach the Kubernetes API server") and err.count("\n") == 1


def test_an_api_refusal_is_a_one_line_error(capsys, monkeypatch):
    from kubernetes.client import ApiException

    from safealign.cli import main

    def refuse(*args, **kwargs):
        raise ApiException(status=403, reason="Forbidden", http_resp=None)

    monkeypatch.setattr(k8s, "status", refuse)
    assert main(["status", "some-run", "-n", "ml"]) == 2
    assert capsys.readouterr().err == "safealign: error: Kubernetes API (403 Forbidden): Forbidden\n"


def test_batches_that_cannot_split_over_the_jobs_processes_are_refused_before_anything_is_created(tmp_path):
    """Two nodes × 8 GPUs = 16 ranks: the seed's batch 16 at micro-batch 2 cannot split; submit says so
    before creating any object (a 2-node align Job would otherwise fail at once, on the cluster)."""
    two_nodes = tmp_path / "two-nodes.yaml"
    two_nodes.write_text("job: {nodes: 2}\nresources: {gpusPerNode: 8}\n")
    state = StandIn()
    _, _, error = run_submit(state, stages=["align"], values_files=[VALUES, two_nodes])
    assert error == (
        "stage align (16 processes from the values): align.batch_size=16 does not split over 16 processes × "
        "micro_batch_size 2: use a multiple of 32 (e.g. 32), or micro_batch_size 1"
    )
    assert state.events == []
    done, _, error = run_submit(state, stages=["align"], values_files=[VALUES, two_nodes],
                                overrides=["align.micro_batch_size=1"], wait=True)  # fmt: skip
    assert error is None and done == ["align"]
