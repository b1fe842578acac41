"""A local HTTP stand-in for the Kubernetes API server — NOT Kubernetes.

No API server can run on the CI machine, so `safealign submit` is tested against this: it speaks the
REST paths and JSON shapes the official client uses for ConfigMaps, PVCs, Services, Jobs, Pods and pod
logs, keeps objects in memory, and plays a scripted life for every Job (pending → running → succeeded,
or failed with a chosen exit code) advanced by the client's own polling. What it cannot tell: whether
a real scheduler, kubelet or Job controller would behave the same — the real-cluster test does that.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

COLLECTIONS = {
    "configmaps": "ConfigMap",
    "persistentvolumeclaims": "PersistentVolumeClaim",
    "services": "Service",
    "jobs": "Job",
    "pods": "Pod",
}
PATH = re.compile(
    r"^/(?:api/v1|apis/batch/v1)/namespaces/(?P<ns>[^/]+)/(?P<coll>[a-z]+)(?:/(?P<name>[^/]+))?(?P<log>/log)?$"
)


@dataclass
class StandIn:
    """Objects by (collection, namespace, name); `outcomes[job] = exit code` (0 succeeds); the request log."""

    outcomes: dict[str, int] = field(default_factory=dict)
    objects: dict[tuple[str, str, str], dict] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (method, collection, object name)
    polls: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def posted(self, collection: str) -> list[str]:
        """Names of the objects created in `collection`, in creation order."""
        return [name for method, coll, name in self.events if method == "POST" and coll == collection]

    def _advance(self, ns: str, name: str) -> None:
        """One poll of a Job moves it one step: pending → running (pod started) → finished."""
        job = self.objects[("jobs", ns, name)]
        step = self.polls[name] = self.polls.get(name, 0) + 1
        pod_key = ("pods", ns, f"{name}-0-x1")
        if step == 1:
            job["status"] = {"active": 1, "startTime": "2026-11-22T10:00:00Z"}
            self.objects[pod_key] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"{name}-0-x1", "namespace": ns, "labels": {"job-name": name}},
                "status": {"phase": "Running"},
            }
        elif step >= 2 and "conditions" not in job["status"]:
            code = self.outcomes.get(name, 0)
            kind = "Complete" if code == 0 else "Failed"
            job["status"] = {
                "startTime": "2026-11-22T10:00:00Z",
                "completionTime": "2026-11-22T10:05:00Z" if code == 0 else None,
                "succeeded" if code == 0 else "failed": 1,
                "conditions": [{"type": kind, "status": "True", "reason": "BackoffLimitExceeded" if code else None,
                                "message": "Job has reached the specified backoff limit" if code else None}],
            }  # fmt: skip
            self.objects[pod_key]["status"] = {
                "phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [{"name": "main", "image": "x", "imageID": "x", "ready": False, "restartCount": 0,
                                       "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}}}],
            }  # fmt: skip


def _handler(state: StandIn):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, code: int, body: dict | str) -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self, method: str) -> None:
            url = urlparse(self.path)
            match = PATH.match(url.path)
            with state.lock:
                state.requests.append((method, url.path))
                if not match or match["coll"] not in COLLECTIONS:
                    return self._send(404, {"kind": "Status", "code": 404, "message": f"stand-in: no route {url.path}"})
                ns, coll, name = match["ns"], match["coll"], match["name"]
                if method in ("POST", "PUT"):
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    key = (coll, ns, body["metadata"]["name"])
                    if method == "POST" and key in state.objects:
                        return self._send(
                            409, {"kind": "Status", "code": 409, "reason": "AlreadyExists", "message": "exists"}
                        )
                    if coll == "jobs":
                        body.setdefault("status", {})
                    state.events.append((method, coll, key[2]))
                    state.objects[key] = body
                    return self._send(201 if method == "POST" else 200, body)
                if match["log"]:
                    return self._send(200, f"[safealign] {name}: line one\n[safealign] {name}: line two\n")
                if name is None:
                    selector = parse_qs(url.query).get("labelSelector", [""])[0]
                    want = dict(part.split("=", 1) for part in selector.split(",") if part)
                    items = [o for (c, n, _), o in state.objects.items() if c == coll and n == ns
                             and want.items() <= o["metadata"].get("labels", {}).items()]  # fmt: skip
                    return self._send(
                        200, {"kind": f"{COLLECTIONS[coll]}List", "apiVersion": "v1", "metadata": {}, "items": items}
                    )
                key = (coll, ns, name)
                state.events.append((method, coll, name))
                if key not in state.objects:
                    return self._send(
                        404, {"kind": "Status", "code": 404, "reason": "NotFound", "message": "not found"}
                    )
                if coll == "jobs":
                    state._advance(ns, name)
                return self._send(200, state.objects[key])

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PUT(self) -> None:
            self._route("PUT")

    return Handler


class Server:
    """`with Server(state) as api_client:` — an official-client ApiClient pointed at the stand-in."""

    def __init__(self, state: StandIn) -> None:
        self.state = state
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))

    def __enter__(self):
        from kubernetes import client

        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        config = client.Configuration()
        config.host = f"http://127.0.0.1:{self.httpd.server_port}"
        return client.ApiClient(config)

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
