"""How ranks start: the rendered launcher commands, and two real multi-rank forms on loopback — the
DeepSpeed launcher over a one-host hostfile, and two torchrun "nodes" meeting at a c10d rendezvous.
Several real hosts cannot be had here, so the multi-host hostfile is checked as a rendered command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.dist import free_port
from trainers.launch import Launch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.stream.crop=random", "data.stream.crop_size=32", "train.micro_batch=4", "train.num_workers=0",
        "train.steps=4", "method.options={width: 8, depth: 3, bottleneck: 8}"]


def test_per_node_torchrun_command_has_the_rendezvous(tmp_path):
    command = Launch(nproc=8, nnodes=4, rdzv_endpoint="node001:29400").command(tmp_path / "run", resume=True)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=4", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=node001:29400",
            "--rdzv_id=run"} <= set(command)
    assert command[-3:] == ["trainers.worker", str(tmp_path / "run"), "--resume"]


def test_nodes_become_a_hostfile_for_the_deepspeed_launcher(tmp_path):
    command = Launch(nproc=4, nodes=("gpu-a", "gpu-b")).command(tmp_path, resume=False)
    assert (tmp_path / "hostfile").read_text() == "gpu-a slots=4\ngpu-b slots=4\n"
    assert command[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert command[command.index("--hostfile") + 1] == str(tmp_path / "hostfile")
    assert command[command.index("--master_addr") + 1] == "gpu-a"
    assert "--no_ssh_check" not in command  # several hosts: the launcher must reach them over ssh
    assert command[-2:] == ["trainers.worker", str(tmp_path)]


@pytest.mark.parametrize("kwargs,message", [
    ({"nnodes": 2}, "--rdzv-endpoint"),
    ({"nodes": ("a",), "hostfile": Path("/x")}, "not both"),
    ({"nodes": ("a",), "nnodes": 2, "rdzv_endpoint": "a:1"}, "choose one form"),
    ({"hostfile": Path("/no/such/hostfile")}, "does not exist"),
])
def test_inconsistent_launch_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Launch(**kwargs)


def tessera_train(store, run_dir, *args):
    command = [sys.executable, "-m", "tessera.cli", "train", "--run-dir", str(run_dir), *args]
    command += [a for value in [f"data.store={store}", *TINY] for a in ("--set", value)]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished_with_two_ranks(run_dir):
    log = (run_dir / "log.txt").read_text()
    assert "on 2 rank(s)" in log and "finished 4 steps" in log
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == 4


def test_deepspeed_launcher_over_a_one_host_hostfile(sample_store, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    proc = tessera_train(sample_store, tmp_path / "run", "--hostfile", str(hostfile))
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    finished_with_two_ranks(tmp_path / "run")


def test_two_torchrun_nodes_share_one_run_directory(sample_store, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [tessera_train(sample_store, tmp_path / "run", "--nnodes", "2", "--rdzv-endpoint", endpoint)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    finished_with_two_ranks(tmp_path / "run")
