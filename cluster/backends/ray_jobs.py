"""``ray``: the Ray Jobs API of a running Ray cluster (``--ray-address http://head:8265``). The job's
entrypoint is the tessera command; its runtime env carries the working directory's path, the job's
environment and, by name, ``pass_env`` variables. Tune and ingest get ``--ray-address auto`` so their
trials and tasks use the cluster they run on."""

from __future__ import annotations

import os
import shlex

from cluster.backends import Backend, BackendError, register_backend
from cluster.spec import JobSpec

STATES = {"PENDING": "PENDING", "RUNNING": "RUNNING", "SUCCEEDED": "COMPLETED", "FAILED": "FAILED",
          "STOPPED": "CANCELLED"}


def _client(address: str | None):
    if not address:
        raise BackendError("the ray backend needs the cluster's dashboard address: --ray-address http://HEAD:8265 "
                           "(or $RAY_ADDRESS)")
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:
        raise BackendError(f"the Ray Jobs API is not importable ({exc}): install ray[default]") from None
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # connection refused, wrong address, auth: Ray raises several kinds
        raise BackendError(f"cannot reach the Ray cluster at {address}: {exc}") from None


@register_backend("ray")
class RayJobsBackend(Backend):
    def entrypoint(self, spec: JobSpec) -> str:
        args = spec.tessera_args(ray_address="auto")
        return shlex.join([spec.python, "-m", "tessera.cli", *args])

    def runtime_env(self, spec: JobSpec) -> dict:
        env = dict(spec.env)
        env.update({key: os.environ[key] for key in spec.pass_env if key in os.environ})  # sent, never written
        return {"env_vars": env}

    def render(self, spec: JobSpec) -> str:
        import json

        shown = {**spec.env, **{key: "<from the submitting environment>" for key in spec.pass_env}}
        return json.dumps({"entrypoint": f"cd {shlex.quote(str(spec.workdir.resolve()))} && {self.entrypoint(spec)}",
                           "runtime_env": {"env_vars": shown}, "submission_id": None,
                           "address": spec.ray_address or os.environ.get("RAY_ADDRESS")}, indent=1)

    def submit(self, spec: JobSpec) -> dict:
        address = spec.ray_address or os.environ.get("RAY_ADDRESS")
        client = _client(address)
        entrypoint = f"cd {shlex.quote(str(spec.workdir.resolve()))} && {self.entrypoint(spec)}"
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=self.runtime_env(spec),
                                   metadata={"tessera_job": spec.name})
        return {"backend_id": job_id, "address": address, "log": f"ray job logs --address {address} {job_id}"}

    def status(self, record: dict) -> str:
        state = str(_client(record["address"]).get_job_status(record["backend_id"]))
        state = state.split(".")[-1]
        return STATES.get(state, state)

    def logs(self, record: dict) -> str:
        return _client(record["address"]).get_job_logs(record["backend_id"])

    def follow(self, record: dict):
        """Yield log text as the job writes it (Ray's streaming tail)."""
        import asyncio

        client = _client(record["address"])

        async def tail():
            async for chunk in client.tail_job_logs(record["backend_id"]):
                yield chunk

        generator = tail()
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(generator.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.close()

    def cancel(self, record: dict) -> None:
        _client(record["address"]).stop_job(record["backend_id"])
