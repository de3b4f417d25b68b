"""``kubernetes``: a Kubeflow ``PyTorchJob`` for training (one pod per node running torchrun; the
operator's MASTER_ADDR/MASTER_PORT are the c10d rendezvous), a KubeRay ``RayJob`` for tune and ingest
(a Ray cluster made for the job), a ``batch/v1`` Job for anything else. Applied with the kubernetes
client when a kubeconfig is present; ``--dry-run`` prints the manifest instead."""

from __future__ import annotations

import copy
import os
import re
import shlex
import time
from pathlib import Path

from cluster.backends import Backend, BackendError, register_backend
from cluster.spec import JobSpec

RAY_VERSION = "2.60.0"
# (group, version, plural) of the custom resources this backend creates
RESOURCES = {"PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs"), "RayJob": ("ray.io", "v1", "rayjobs")}


def _quantity(size: str, times: int) -> str:
    number, unit = re.fullmatch(r"(\d+)([KMGT]?)", size).groups()
    return f"{int(number) * times}{unit + 'i' if unit else ''}"


def _seconds(limit: str) -> int:
    days, _, clock = limit.rpartition("-")
    hours, minutes, seconds = (int(x) for x in clock.split(":"))
    return ((int(days) if days else 0) * 24 + hours) * 3600 + minutes * 60 + seconds


def kube_name(spec: JobSpec) -> str:
    base = re.sub(r"[^a-z0-9-]", "-", spec.name.lower()).strip("-")[:40] or "tessera"
    return f"{base}-{time.strftime('%m%d%H%M%S')}"


def kubeconfig() -> Path | None:
    path = Path(os.environ.get("KUBECONFIG", Path.home() / ".kube" / "config"))
    return path if path.is_file() else None


class _Pods:
    """Pod templates shared by every manifest kind."""

    def __init__(self, spec: JobSpec):
        if not spec.image:
            raise BackendError("the kubernetes backend runs containers: give --image (an image with tessera installed)")
        self.spec = spec
        # Inside the container a relative --workdir is taken from /workspace (the image's checkout).
        self.workdir = str(spec.workdir if spec.workdir.is_absolute() else Path("/workspace") / spec.workdir)
        self.workdir = self.workdir.rstrip("/.") if self.workdir.endswith("/.") else self.workdir

    def container(self, name: str, command: list[str] | None, ranks: int) -> dict:
        spec = self.spec
        limits = {"cpu": str(spec.cpus_per_task * ranks)}
        if spec.mem_per_task:
            limits["memory"] = _quantity(spec.mem_per_task, ranks)
        if spec.gpus_per_node:
            limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
        container = {"name": name, "image": spec.image, "workingDir": self.workdir,
                     "env": [{"name": k, "value": v} for k, v in spec.env.items()]
                     + [{"name": "OMP_NUM_THREADS", "value": "1"}],
                     "resources": {"limits": limits, "requests": dict(limits)},
                     "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}]}
        if command is not None:
            container["command"] = command
        if spec.shared_volume:
            container["volumeMounts"].append({"name": "work", "mountPath": self.workdir})
        return container

    def template(self, container: dict, restart: str) -> dict:
        volumes = [{"name": "shm", "emptyDir": {"medium": "Memory"}}]  # DataLoader workers share memory here
        if self.spec.shared_volume:
            volumes.append({"name": "work", "persistentVolumeClaim": {"claimName": self.spec.shared_volume}})
        return {"metadata": {"labels": {"app.kubernetes.io/managed-by": "tessera"}},
                "spec": {"restartPolicy": restart, "containers": [container], "volumes": volumes}}


@register_backend("kubernetes")
class KubernetesBackend(Backend):
    def manifest(self, spec: JobSpec, name: str | None = None) -> dict:
        name = name or kube_name(spec)
        pods = _Pods(spec)
        metadata = {"name": name, "namespace": spec.namespace, "labels": {"app.kubernetes.io/managed-by": "tessera"}}
        python = [spec.python, "-m", "tessera.cli"]
        if spec.kind == "train":
            # Kubernetes expands $(VAR) in command arguments from the container's environment, which the
            # training operator fills with the master pod's address and port.
            command = python + spec.tessera_args(rendezvous="$(MASTER_ADDR):$(MASTER_PORT)")
            replica = {"replicas": 1, "restartPolicy": "OnFailure",
                       "template": pods.template(pods.container("pytorch", command, spec.ranks_per_node), "OnFailure")}
            replicas = {"Master": replica}
            if spec.nodes > 1:
                replicas["Worker"] = {**copy.deepcopy(replica), "replicas": spec.nodes - 1}
            return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": metadata,
                    "spec": {"runPolicy": {"backoffLimit": 3, "activeDeadlineSeconds": _seconds(spec.time),
                                           "cleanPodPolicy": "None"},
                             "pytorchReplicaSpecs": replicas}}
        if spec.kind == "ray":
            head = pods.container("ray-head", None, 1)
            head["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                             {"containerPort": 10001, "name": "client"}]
            ray_spec = {"rayVersion": RAY_VERSION,
                        "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0"},
                                          "template": pods.template(head, "Never")}}
            if spec.nodes > 1:
                ray_spec["workerGroupSpecs"] = [{
                    "groupName": "workers", "replicas": spec.nodes - 1, "minReplicas": spec.nodes - 1,
                    "maxReplicas": spec.nodes - 1, "rayStartParams": {},
                    "template": pods.template(pods.container("ray-worker", None, 1), "Never")}]
            entrypoint = shlex.join(python + spec.tessera_args(ray_address="auto"))
            return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": metadata,
                    "spec": {"entrypoint": entrypoint, "shutdownAfterJobFinishes": True,
                             "ttlSecondsAfterFinished": 3600, "activeDeadlineSeconds": _seconds(spec.time),
                             "rayClusterSpec": ray_spec}}
        if spec.nodes > 1:
            raise BackendError(f"'{spec.command[0]}' runs on one node: --nodes must be 1")
        container = pods.container("tessera", python + spec.tessera_args(), 1)
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
                "spec": {"backoffLimit": 0, "activeDeadlineSeconds": _seconds(spec.time),
                         "template": pods.template(container, "Never")}}

    def render(self, spec: JobSpec) -> str:
        import yaml

        return yaml.safe_dump(self.manifest(spec), sort_keys=False)

    def _api(self):
        if kubeconfig() is None:
            raise BackendError("no kubeconfig ($KUBECONFIG or ~/.kube/config): add --dry-run to print the manifest "
                               "and apply it yourself (kubectl apply -f -)")
        from kubernetes import client, config

        config.load_kube_config()
        return client

    def submit(self, spec: JobSpec) -> dict:
        manifest = self.manifest(spec)
        client = self._api()
        kind, name, namespace = manifest["kind"], manifest["metadata"]["name"], spec.namespace
        if kind == "Job":
            client.BatchV1Api().create_namespaced_job(namespace, manifest)
        else:
            group, version, plural = RESOURCES[kind]
            client.CustomObjectsApi().create_namespaced_custom_object(group, version, namespace, plural, manifest)
        return {"backend_id": name, "kind": kind, "namespace": namespace,
                "log": f"kubectl logs -n {namespace} -l {self._selector(kind, name)}"}

    @staticmethod
    def _selector(kind: str, name: str) -> str:
        # Job pods carry job-name; the training operator labels its pods; KubeRay runs the entrypoint
        # in a submitter Job named after the RayJob.
        return {"Job": f"job-name={name}", "PyTorchJob": f"training.kubeflow.org/job-name={name}",
                "RayJob": f"job-name={name}"}[kind]

    def status(self, record: dict) -> str:
        client = self._api()
        kind, name, namespace = record["kind"], record["backend_id"], record["namespace"]
        if kind == "Job":
            status = client.BatchV1Api().read_namespaced_job_status(name, namespace).status
            return "COMPLETED" if status.succeeded else "FAILED" if status.failed else \
                "RUNNING" if status.active else "PENDING"
        group, version, plural = RESOURCES[kind]
        body = client.CustomObjectsApi().get_namespaced_custom_object(group, version, namespace, plural, name)
        if kind == "RayJob":
            state = body.get("status", {}).get("jobStatus", "PENDING")
            return {"SUCCEEDED": "COMPLETED", "STOPPED": "CANCELLED"}.get(state, state)
        conditions = [c["type"] for c in body.get("status", {}).get("conditions", []) if c.get("status") == "True"]
        for state, name_ in (("Succeeded", "COMPLETED"), ("Failed", "FAILED"), ("Running", "RUNNING")):
            if state in conditions:
                return name_
        return "PENDING"

    def logs(self, record: dict) -> str:
        client = self._api()
        core = client.CoreV1Api()
        pods = core.list_namespaced_pod(record["namespace"], label_selector=self._selector(record["kind"],
                                                                                       record["backend_id"])).items
        return "\n".join(f"==> {p.metadata.name} <==\n" + core.read_namespaced_pod_log(p.metadata.name, record["namespace"])
                         for p in pods)

    def cancel(self, record: dict) -> None:
        client = self._api()
        kind, name, namespace = record["kind"], record["backend_id"], record["namespace"]
        if kind == "Job":
            client.BatchV1Api().delete_namespaced_job(name, namespace, propagation_policy="Foreground")
        else:
            group, version, plural = RESOURCES[kind]
            client.CustomObjectsApi().delete_namespaced_custom_object(group, version, namespace, plural, name)
