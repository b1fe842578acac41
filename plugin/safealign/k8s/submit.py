"""`safealign submit / status / logs`: a recipe's stages as Kubernetes Jobs, one after the other.

The objects come from the stage charts (`safealign.k8s.charts`), so a submitted run is exactly what
`helm install safealign-<stage>` would create. Naming, for a run `R` (the recipe's name unless given):

- `R-recipe`: ConfigMap with the flattened recipe (`extends:` resolved, `--set` applied);
- `R-runs`, `R-model-cache`: the run-directory and model-cache PVCs (unless the values name existing
  claims), created once, kept afterwards: they hold the run;
- `R-rm`, `R-align`, `R-distill`, `R-eval`: the stage Jobs, labelled `safealign.dev/run=R`.

A stage's Job is created only after the previous stage's Job succeeded. Submitting is idempotent: an
existing Job is adopted (succeeded: skipped; running: waited for; failed: an error naming its pod),
so `safealign submit` without `--wait` advances the run by one stage per call, and with `--wait`
drives it to the end, streaming each stage's pod logs.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from safealign.core.errors import SafeAlignError
from safealign.core.pipeline import STAGE_ORDER
from safealign.k8s.charts import render_objects
from safealign.recipe import check_world_size, flatten_recipe, load_recipe, merge, trial_overrides

RUN_LABEL = "safealign.dev/run"
MANAGED_BY = "app.kubernetes.io/managed-by"
STAGE_LABEL = "app.kubernetes.io/component"


def run_name(name: str) -> str:
    """A recipe name as a DNS-1123 label prefix (Job and ConfigMap names derive from it)."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40].strip("-")
    if not label:
        raise SafeAlignError(f"run name {name!r} has no letters or digits: give --run NAME")
    return label


def read_values(paths: list[Path]) -> dict:
    """Helm-style values files, later ones winning (`--values` / `-f`)."""
    values: dict = {}
    for path in paths:
        if not path.is_file():
            raise SafeAlignError(f"--values {path}: file not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise SafeAlignError(f"--values {path}: must be a YAML mapping of chart values")
        values = merge(values, data)
    return values


@dataclass
class Plan:
    """What a run creates: the shared objects once, then one Job per stage, in order."""

    run: str
    namespace: str
    runs_claim: str
    shared: list[dict]
    jobs: list[tuple[str, dict]] = field(default_factory=list)


#: One Job of a run: (name, stage chart, chart values on top of the user's). The Job is `<run>-<name>`.
Step = tuple[str, str, dict]


def stage_steps(stages: list[str]) -> list[Step]:
    return [(stage, stage, {}) for stage in stages]


def sweep_steps(recipe, parallelism: int | None = None) -> list[Step]:
    """A sweep on Kubernetes: its shared stages, one Indexed Job pod per grid point, then the rule."""
    trials = len(trial_overrides(recipe.sweep.grid))
    per_trial = {"part": "trial", "trials": trials, **({"parallelism": parallelism} if parallelism else {})}
    return [
        ("sweep-shared", "sweep", {"sweep": {"part": "shared"}}),
        ("sweep-trials", "sweep", {"sweep": per_trial}),
        ("sweep-select", "sweep", {"sweep": {"part": "select"}}),
    ]


def plan_run(recipe_text: str, run: str, namespace: str, steps: list[Step], values: dict) -> Plan:
    """Render the shared objects (recipe ConfigMap, PVCs) and each step's Job from the charts."""
    if not steps:
        raise SafeAlignError("no stages to submit")
    shared_claims = {
        "runs": values.get("storage", {}).get("runs", {}).get("existingClaim") or f"{run}-runs",
        "modelCache": values.get("storage", {}).get("modelCache", {}).get("existingClaim") or f"{run}-model-cache",
    }
    # Rendered once under the run's own name: the chart names them <run>-recipe, <run>-runs, <run>-model-cache.
    first_chart, first_values = steps[0][1], merge(values, steps[0][2])
    first = render_objects(first_chart, merge(first_values, {"recipe": recipe_text, "runName": run}), run, namespace)
    shared = [o for o in first if o["kind"] in ("ConfigMap", "PersistentVolumeClaim")]
    stage_values = merge(
        values,
        {
            "recipe": "",
            "recipeConfigMap": f"{run}-recipe",
            "runName": run,
            "storage": {key: {"existingClaim": claim} for key, claim in shared_claims.items()},
            "test": {"enabled": False},
        },
    )
    plan = Plan(run, namespace, shared_claims["runs"], shared)
    for step, chart, extra in steps:
        objects = render_objects(chart, merge(stage_values, extra), f"{run}-{step}", namespace)
        plan.jobs.append((step, next(o for o in objects if o["kind"] == "Job")))
        plan.shared += [o for o in objects if o["kind"] == "Service"]  # multi-node stages' headless Services
    for obj in plan.shared + [job for _, job in plan.jobs]:
        _not_helm_managed(obj)
    return plan


def _not_helm_managed(obj: dict) -> None:
    """Objects created outside `helm install` must not claim Helm manages them (Helm would refuse to adopt
    them, and `helm list` would not show them): they are managed by safealign."""
    for labels in (
        obj["metadata"].get("labels"),
        obj.get("spec", {}).get("template", {}).get("metadata", {}).get("labels"),
    ):
        if labels and MANAGED_BY in labels:
            labels[MANAGED_BY] = "safealign"


def check_judge_secret(recipe, stages: list[str], values: dict) -> None:
    """An eval stage with an LLM judge needs its API key in the pod: catch the missing Secret reference
    now, not after days of training when the eval pod starts without it."""
    judge = recipe.eval.llm_judge
    if "eval" not in stages or "llm" not in recipe.eval.judges or judge is None or not judge.api_key_env:
        return
    given = (values.get("secrets") or {}).get("judgeApiKey") or {}
    if given.get("env") != judge.api_key_env:
        raise SafeAlignError(
            f"eval.llm_judge.api_key_env is {judge.api_key_env} but the chart values give no secrets.judgeApiKey "
            f"with env {judge.api_key_env}: add `secrets: {{judgeApiKey: {{name: <secret>, key: <key>, "
            f"env: {judge.api_key_env}}}}}` to a --values file"
        )


def _job_state(job) -> str:
    """Succeeded, Failed, or Running (anything not finished) — from the Job's conditions."""
    for condition in job.status.conditions or []:
        if condition.status == "True" and condition.type in ("Complete", "SuccessCriteriaMet"):
            return "Succeeded"
        if condition.status == "True" and condition.type in ("Failed", "FailureTarget"):
            return "Failed"
    return "Running" if job.status.active else "Pending"


class Cluster:
    """The few Kubernetes API calls a run needs, through the official client."""

    def __init__(self, api_client=None, namespace: str = "default") -> None:
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                try:
                    # $KUBECONFIG as it is now (the client reads it once, at import)
                    config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
                except (config.ConfigException, FileNotFoundError) as exc:
                    raise SafeAlignError(f"no Kubernetes cluster configured ({exc}): set KUBECONFIG") from None
            api_client = client.ApiClient()
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.namespace = namespace
        self._api_exception = client.ApiException

    def _exists(self, exc) -> bool:
        return isinstance(exc, self._api_exception) and exc.status == 409

    def apply_shared(self, obj: dict, say: Callable[[str], None]) -> None:
        """Create a ConfigMap (replace it if present: the recipe may have changed) or a PVC/Service (keep)."""
        name, kind = obj["metadata"]["name"], obj["kind"]
        create = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "PersistentVolumeClaim": self.core.create_namespaced_persistent_volume_claim,
            "Service": self.core.create_namespaced_service,
        }[kind]
        try:
            create(self.namespace, obj)
            say(f"created {kind} {name}")
        except self._api_exception as exc:
            if not self._exists(exc):
                raise
            if kind == "ConfigMap":
                self.core.replace_namespaced_config_map(name, self.namespace, obj)
                say(f"updated {kind} {name}")
            else:
                say(f"{kind} {name} exists: kept")

    def job(self, name: str):
        try:
            return self.batch.read_namespaced_job(name, self.namespace)
        except self._api_exception as exc:
            if exc.status == 404:
                return None
            raise

    def create_job(self, obj: dict) -> None:
        self.batch.create_namespaced_job(self.namespace, obj)

    def pods(self, job_name: str) -> list:
        return self.core.list_namespaced_pod(self.namespace, label_selector=f"job-name={job_name}").items

    def run_jobs(self, run: str) -> list:
        return self.batch.list_namespaced_job(self.namespace, label_selector=f"{RUN_LABEL}={run}").items

    def stream_log(self, pod: str, container: str, follow: bool, emit: Callable[[str], None]) -> None:
        response = self.core.read_namespaced_pod_log(
            pod, self.namespace, container=container, follow=follow, _preload_content=False
        )
        buffer = b""
        for chunk in response.stream(4096):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                emit(line.decode("utf-8", "replace"))
        if buffer:
            emit(buffer.decode("utf-8", "replace"))


def failure_message(cluster: Cluster, stage: str, job) -> str:
    """Which pod failed and how, for the one-line error."""
    name = job.metadata.name
    reason = next((c.message or c.reason for c in job.status.conditions or [] if c.type == "Failed"), "failed")
    details = []
    for pod in cluster.pods(name):
        for status in pod.status.container_statuses or []:
            done = status.state.terminated if status.state else None
            if done and done.exit_code:
                details.append(f"pod {pod.metadata.name} exited {done.exit_code} ({done.reason or 'Error'})")
    where = "; ".join(details) or "no pod reported an exit code"
    return (
        f"stage {stage} failed: Job {name}: {reason}; {where}. "
        f"Logs: safealign logs {(job.metadata.labels or {}).get(RUN_LABEL, 'RUN')} --stage {stage} -n {cluster.namespace}"
    )


class LogFollower:
    """Streams each pod of a Job once it has started, in background threads, lines prefixed by pod."""

    def __init__(self, cluster: Cluster, container: str, say: Callable[[str], None]) -> None:
        self.cluster, self.container, self.say = cluster, container, say
        self.threads: dict[str, threading.Thread] = {}

    def poll(self, job_name: str) -> None:
        for pod in self.cluster.pods(job_name):
            name = pod.metadata.name
            if name not in self.threads and pod.status.phase in ("Running", "Succeeded", "Failed"):
                thread = threading.Thread(target=self._follow, args=(name,), daemon=True)
                self.threads[name] = thread
                thread.start()

    def _follow(self, pod: str) -> None:
        try:
            self.cluster.stream_log(pod, self.container, True, lambda line: self.say(f"[{pod}] {line}"))
        except Exception as exc:  # a log stream that breaks must not stop the run
            self.say(f"[{pod}] (log stream ended: {exc})")

    def join(self, timeout: float = 30.0) -> None:
        for thread in self.threads.values():
            thread.join(timeout)


def wait_for(cluster: Cluster, step: str, name: str, poll: float, say: Callable[[str], None]) -> None:
    """Wait until the step's Job finishes, streaming its pods' logs; raise naming the pod if it failed.
    A sweep's trials Job fails when any trial failed; the run goes on to selection if any succeeded."""
    follower = None
    while True:
        job = cluster.job(name)
        if job is None:
            raise SafeAlignError(f"stage {step}: Job {name} disappeared while running (deleted?)")
        follower = follower or LogFollower(cluster, job.spec.template.spec.containers[0].name, say)
        follower.poll(name)
        state = _job_state(job)
        if state in ("Succeeded", "Failed"):
            follower.join()
            if state == "Failed" and step == "sweep-trials" and (job.status.succeeded or 0) > 0:
                say(f"stage {step}: {job.status.failed or 0} trial pod(s) failed, {job.status.succeeded} succeeded: "
                    "selecting among the finished trials")  # fmt: skip
                return
            if state == "Failed":
                raise SafeAlignError(failure_message(cluster, step, job))
            say(f"stage {step}: succeeded (Job {name})")
            return
        time.sleep(poll)


def job_world_size(job: dict) -> int:
    """Processes a rendered stage Job runs: its pods (an Indexed Job has one per node) × the GPUs each
    asks for (torchrun starts one rank per GPU; a pod without GPUs runs one process)."""
    spec = job["spec"]
    container = spec["template"]["spec"]["containers"][0]
    gpus = int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
    return int(spec.get("completions") or 1) * max(1, gpus)


def check_job_batches(recipe, jobs: list[tuple[str, dict]]) -> None:
    """Refuse, before anything is created, a training stage whose batches cannot split over its Job's
    processes. (A sweep's parts are left to the pods' own check: how they spread over GPUs is the sweep
    chart's, not one torchrun world.)"""
    for stage, job in jobs:
        if stage in ("rm", "align", "distill"):
            world = job_world_size(job)
            try:
                check_world_size(recipe, world, [stage])
            except SafeAlignError as exc:
                raise SafeAlignError(f"stage {stage} ({world} processes from the values): {exc}") from None


def submit(
    recipe_path: Path,
    namespace: str,
    *,
    stages: list[str] | None = None,
    overrides: list[str] = (),
    values_files: list[Path] = (),
    run: str | None = None,
    wait: bool = False,
    poll: float = 10.0,
    cluster: Cluster | None = None,
    say: Callable[[str], None] = print,
) -> list[str]:
    """Submit (or advance) a run; returns the stages that have succeeded when it returns."""
    recipe = load_recipe(recipe_path, list(overrides))
    unknown = sorted(set(stages or ()) - set(recipe.stages))
    if unknown:
        raise SafeAlignError(f"--stages {', '.join(unknown)}: not in the recipe's stages ({', '.join(recipe.stages)})")
    if recipe.sweep is not None and stages is not None:
        raise SafeAlignError("--stages: a sweep recipe is submitted whole (shared stages, trials, selection)")
    selected = [s for s in recipe.stages if stages is None or s in stages]
    name = run_name(run or recipe.name)
    values = read_values(list(values_files))
    check_judge_secret(recipe, selected, values)
    steps = sweep_steps(recipe) if recipe.sweep is not None else stage_steps(selected)
    plan = plan_run(flatten_recipe(recipe_path, list(overrides)), name, namespace, steps, values)
    check_job_batches(recipe, plan.jobs)
    cluster = cluster or Cluster(namespace=namespace)
    for obj in plan.shared:
        cluster.apply_shared(obj, say)
    done = []
    for stage, job_obj in plan.jobs:
        job_name = job_obj["metadata"]["name"]
        existing = cluster.job(job_name)
        state = _job_state(existing) if existing is not None else None
        if state == "Succeeded":
            say(f"stage {stage}: already succeeded (Job {job_name})")
            done.append(stage)
            continue
        if state == "Failed":
            raise SafeAlignError(
                failure_message(cluster, stage, existing)
                + f" Delete the Job to retry: kubectl -n {namespace} delete job {job_name}"
            )
        if existing is None:
            cluster.create_job(job_obj)
            say(f"stage {stage}: created Job {job_name}")
        else:
            say(f"stage {stage}: Job {job_name} is already {state.lower()}")
        if not wait:
            say(
                f"not waiting: `safealign submit {recipe_path} -n {namespace}` again starts the next stage once this one succeeds"
            )
            return done
        wait_for(cluster, stage, job_name, poll, say)
        done.append(stage)
    say(f"run {name}: {', '.join(done)} succeeded; the run directory is /runs/{name} on PVC {plan.runs_claim}")
    return done


def status(run: str, namespace: str, cluster: Cluster | None = None) -> list[dict[str, Any]]:
    """One row per stage Job of the run, in pipeline order."""
    cluster = cluster or Cluster(namespace=namespace)
    rows = []
    for job in cluster.run_jobs(run):
        stage = (job.metadata.labels or {}).get(STAGE_LABEL, "?")
        start, end = job.status.start_time, job.status.completion_time
        rows.append(
            {
                "stage": stage,
                "job": job.metadata.name,
                "state": _job_state(job),
                "started": start.isoformat() if start else "",
                "seconds": round((end - start).total_seconds()) if start and end else None,
            }
        )
    return sorted(rows, key=lambda r: STAGE_ORDER.index(r["stage"]) if r["stage"] in STAGE_ORDER else len(STAGE_ORDER))


def logs(run: str, namespace: str, stage: str | None, follow: bool, cluster: Cluster | None = None, say=print) -> None:
    """Print the logs of the run's stage pods (all stages, in order, unless one is named)."""
    cluster = cluster or Cluster(namespace=namespace)
    rows = status(run, namespace, cluster)
    if stage is not None:
        rows = [r for r in rows if r["stage"] == stage]
    if not rows:
        raise SafeAlignError(f"no Jobs for run {run!r}{f' stage {stage}' if stage else ''} in namespace {namespace}")
    for row in rows:
        for pod in cluster.pods(row["job"]):
            say(f"==> {row['stage']} / {pod.metadata.name} <==")
            cluster.stream_log(pod.metadata.name, row["stage"], follow, say)
