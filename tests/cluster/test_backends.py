"""Rendered jobs checked structurally (a 4-node x 8-GPU Slurm script parsed by bash, Kubernetes
manifests read back through the kubernetes client's models), quoting and secrets, clear errors, and
the local backend for real (submit, logs, status, cancel)."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.backends import BackendError, backend_names, get_backend
from cluster.spec import JobSpec

ROOT = Path(__file__).resolve().parents[2]
EVIL = "x'; touch {marker}; echo \"$(touch {marker})\" `touch {marker}`;#x"


def big_training(**kwargs) -> JobSpec:
    return JobSpec(command=["train", "configs/demo.yaml", "--run-dir", "/shared/runs/big"], name="big", nodes=4,
                   gpus_per_node=8, cpus_per_task=6, mem_per_task="32G", partition="gpu", account="lab",
                   time="2-00:00:00", **kwargs)


def sbatch_options(script: str) -> dict:
    return dict(line[len("#SBATCH --"):].split("=", 1) for line in script.splitlines() if line.startswith("#SBATCH --"))


def test_four_node_eight_gpu_slurm_script(tmp_path):
    script = get_backend("slurm").render(big_training(log_dir=tmp_path))
    options = sbatch_options(script)
    assert options["nodes"] == "4" and options["ntasks-per-node"] == "1" and options["gpus-per-node"] == "8"
    assert options["cpus-per-task"] == "48" and options["mem"] == f"{32 * 1024 * 8}M"
    assert options["partition"] == "gpu" and options["account"] == "lab" and options["time"] == "2-00:00:00"
    srun = script[script.index("\nsrun "):].replace("\\\n", " ")
    words = shlex.split(srun.split("\n", 2)[1] if srun.startswith("\n") else srun)
    assert words[:3] == ["srun", "--nodes=4", "--ntasks-per-node=1"]
    tail = words[words.index("tessera.cli"):]
    assert tail[:5] == ["tessera.cli", "train", "configs/demo.yaml", "--run-dir", "/shared/runs/big"]
    assert tail[tail.index("--nproc") + 1] == "8" and tail[tail.index("--nnodes") + 1] == "4"
    assert '--rdzv-endpoint "$head:29400"' in script  # expanded on the node: the first host of the allocation
    assert 'head="${nodes[0]}"' in script and "scontrol show hostnames" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # bash parses it


def test_ray_commands_get_a_ray_cluster_inside_the_allocation(tmp_path):
    spec = JobSpec(command=["tune", "configs/x.yaml"], nodes=3, log_dir=tmp_path)
    script = get_backend("slurm").render(spec)
    assert "ray.scripts.scripts start --head" in script and '--address="$head:6379"' in script
    assert '--ray-address "$head:6379"' in script and "ray.scripts.scripts stop" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_multi_node_training_needs_a_shared_run_dir():
    with pytest.raises(ValueError, match="needs --run-dir"):
        get_backend("slurm").render(JobSpec(command=["train", "configs/x.yaml"], nodes=2))


def _model(data: dict, kind: str):
    """Read a manifest part back through the kubernetes client's models: a wrong field type or a
    missing required field raises."""
    from kubernetes.client import ApiClient

    return ApiClient()._ApiClient__deserialize(data, kind)  # the client's own deserialiser, as for API replies


def test_job_arrays_are_for_plain_commands_on_slurm(tmp_path):
    with pytest.raises(ValueError, match="job array runs one task per share"):
        JobSpec(command=["train", "configs/demo.yaml"], array=4)
    script = get_backend("slurm").render(JobSpec(command=["synthesize", "runs/g", "--count", "100", "--store", "s"],
                                                 array=4, log_dir=tmp_path))
    assert "#SBATCH --array=0-3" in script and "-%A_%a.out" in script
    from typer.testing import CliRunner

    from tessera.cli import app

    result = CliRunner().invoke(app, ["submit", "--backend", "local", "--array", "2", "--dry-run", "--", "doctor"])
    assert result.exit_code == 2 and "job arrays are a Slurm feature" in result.output


def test_every_backend_is_registered():
    assert backend_names() == ["kubernetes", "local", "ray", "slurm"]


def test_kubernetes_pytorchjob_for_multi_node_training():
    manifest = yaml.safe_load(get_backend("kubernetes").render(big_training(image="registry/tessera:1",
                                                                           shared_volume="runs")))
    assert manifest["apiVersion"] == "kubeflow.org/v1" and manifest["kind"] == "PyTorchJob"
    replicas = manifest["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    for role in ("Master", "Worker"):
        template = _model(replicas[role]["template"], "V1PodTemplateSpec")
        container = template.spec.containers[0]
        assert container.name == "pytorch" and container.image == "registry/tessera:1"
        assert container.resources.limits == {"cpu": "48", "memory": "256Gi", "nvidia.com/gpu": "8"}
        args = container.command
        assert args[args.index("--nnodes") + 1] == "4" and args[args.index("--nproc") + 1] == "8"
        assert args[args.index("--rdzv-endpoint") + 1] == "$(MASTER_ADDR):$(MASTER_PORT)"
        assert {m.mount_path for m in container.volume_mounts} == {"/dev/shm", "/shared"} or \
            "/dev/shm" in {m.mount_path for m in container.volume_mounts}
        assert any(v.persistent_volume_claim and v.persistent_volume_claim.claim_name == "runs"
                   for v in template.spec.volumes)
    assert manifest["spec"]["runPolicy"]["activeDeadlineSeconds"] == 2 * 24 * 3600


def test_kubernetes_rayjob_and_batch_job():
    rayjob = yaml.safe_load(get_backend("kubernetes").render(
        JobSpec(command=["tune", "configs/x.yaml"], nodes=3, image="img:1")))
    assert rayjob["kind"] == "RayJob" and rayjob["spec"]["entrypoint"].endswith("--ray-address auto")
    cluster = rayjob["spec"]["rayClusterSpec"]
    _model(cluster["headGroupSpec"]["template"], "V1PodTemplateSpec")
    assert cluster["workerGroupSpecs"][0]["replicas"] == 2
    _model(cluster["workerGroupSpecs"][0]["template"], "V1PodTemplateSpec")
    job = yaml.safe_load(get_backend("kubernetes").render(JobSpec(command=["eval", "runs/x"], image="img:1")))
    parsed = _model(job, "V1Job")
    assert parsed.spec.template.spec.containers[0].command[-3:] == ["tessera.cli", "eval", "runs/x"]
    assert parsed.spec.template.spec.containers[0].working_dir == "/workspace"
    with pytest.raises(BackendError, match="--image"):
        get_backend("kubernetes").render(JobSpec(command=["eval", "runs/x"]))


def test_kubernetes_without_kubeconfig_says_to_use_dry_run(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    with pytest.raises(BackendError, match="no kubeconfig .*--dry-run"):
        get_backend("kubernetes").submit(JobSpec(command=["eval", "runs/x"], image="img:1"))


@pytest.mark.parametrize("backend", ["local", "slurm"])
def test_values_never_reach_a_shell_unquoted(backend, tmp_path):
    marker = tmp_path / "pwned"
    evil = EVIL.format(marker=marker)
    spec = JobSpec(command=["config", "show", "--set", f"name={evil}"], env={"NOTE": evil}, log_dir=tmp_path,
                   workdir=ROOT, python=sys.executable)
    script = get_backend(backend).render(spec)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    if backend == "local":  # run it for real: the value is data, not commands
        done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120)
        assert not marker.exists(), done.stdout + done.stderr
        assert yaml.safe_load(done.stdout)["name"] == evil  # the value arrived intact, as one argument
    # every line that carries the value carries it quoted, so the shell sees one word
    for line in script.splitlines():
        if "pwned" in line and not line.startswith("#"):
            assert shlex.quote(evil) in line or shlex.quote(f"name={evil}") in line, line


def test_secrets_stay_out_of_scripts_and_the_registry(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="look like secrets"):
        JobSpec(command=["doctor"], env={"WANDB_API_KEY": "abc"})
    monkeypatch.setenv("HF_TOKEN", "s3cr3t-value")
    spec = JobSpec(command=["doctor"], pass_env=["HF_TOKEN"], ray_address="http://127.0.0.1:1")
    for name in backend_names():
        try:
            text = get_backend(name).render(spec)
        except BackendError:
            continue  # kubernetes without --image
        assert "s3cr3t-value" not in text, name
    assert "s3cr3t-value" not in json.dumps(spec.model_dump(mode="json"))


def test_missing_tools_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, sinfo, …
    with pytest.raises(BackendError, match="'sbatch' not found"):
        get_backend("slurm").submit(JobSpec(command=["doctor"], log_dir=tmp_path))
    with pytest.raises(BackendError, match="needs the cluster's dashboard address"):
        get_backend("ray").submit(JobSpec(command=["doctor"]))
    with pytest.raises(BackendError, match="cannot reach the Ray cluster"):
        get_backend("ray").submit(JobSpec(command=["doctor"], ray_address="http://127.0.0.1:9"))


def tessera(*args, jobs: Path):
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TESSERA_JOBS": str(jobs)})


def wait_state(job_id, jobs, states, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = tessera("jobs", "status", job_id, jobs=jobs).stdout.strip()
        if state in states:
            return state
        time.sleep(0.3)
    raise AssertionError(f"{job_id} still {state}")


def test_local_backend_submit_logs_status_and_cancel(tmp_path, sample_store):
    jobs = tmp_path / "jobs"
    done = tessera("submit", "--log-dir", str(tmp_path), "--", "config", "show", "--set", "name=hello-job", jobs=jobs)
    assert done.returncode == 0, done.stderr
    job_id = re.search(r"submitted (\S+)", done.stdout).group(1)
    assert wait_state(job_id, jobs, {"COMPLETED", "FAILED"}) == "COMPLETED"
    assert "name: hello-job" in tessera("jobs", "logs", job_id, jobs=jobs).stdout
    refused = tessera("submit", "--log-dir", str(tmp_path), "--", "config", "show", "--set", "nmae=1", jobs=jobs)
    assert refused.returncode == 2 and "nothing was submitted" in refused.stderr  # before any queue
    assert "did you mean 'name'" in refused.stderr and "submitted" not in refused.stdout
    bad = tessera("submit", "--log-dir", str(tmp_path), "--", "eval", str(tmp_path / "no-such-run"), jobs=jobs)
    bad_id = re.search(r"submitted (\S+)", bad.stdout).group(1)
    assert wait_state(bad_id, jobs, {"COMPLETED", "FAILED"}) == "FAILED"
    assert "no-such-run" in tessera("jobs", "logs", bad_id, jobs=jobs).stdout  # the job's own error, in its log
    slow = tessera("submit", "--log-dir", str(tmp_path), "--", "train", "--run-dir", str(tmp_path / "long"),
                   "--set", f"data.store={sample_store}", "--set", "train.steps=100000", "--set", "train.num_workers=0",
                   jobs=jobs)
    slow_id = re.search(r"submitted (\S+)", slow.stdout).group(1)
    deadline = time.time() + 120
    while not (tmp_path / "long" / "log.txt").is_file() and time.time() < deadline:
        time.sleep(0.3)  # training has started
    assert tessera("jobs", "status", slow_id, jobs=jobs).stdout.strip() == "RUNNING"
    assert tessera("jobs", "cancel", slow_id, jobs=jobs).returncode == 0
    assert wait_state(slow_id, jobs, {"CANCELLED"}) == "CANCELLED"
    listing = tessera("jobs", "list", jobs=jobs).stdout
    assert job_id in listing and "COMPLETED" in listing and "FAILED" in listing and "CANCELLED" in listing
    assert "no job 'nope'" in tessera("jobs", "status", "nope", jobs=jobs).stderr
