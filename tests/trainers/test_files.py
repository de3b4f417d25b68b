"""No file a user is handed runs code when tessera loads it: crafted pickles through `tessera score`,
`tessera eval`, `train.statistics_file` and `--resume` are refused before anything in them runs."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers.files import UnsafeFileError, load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.stream.crop=random", "data.stream.crop_size=32", "train.micro_batch=4", "train.num_workers=0",
         "method.options={width: 8, depth: 3, bottleneck: 8}"]


class Payload:
    """What an attacker pickles: unpickling it calls os.system, which leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft(path: Path, marker: Path, **fields) -> Path:
    """A file that looks like a tessera file of any kind, with the payload inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "tessera-export", "format_version": 2, **fields, "payload": Payload(marker)}, path)
    return path


LAUNCHER = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def tessera(*args, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER}  # in-process tests leave these behind
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**env, "OMP_NUM_THREADS": "1"})


def sets(*values):
    return [arg for value in values for arg in ("--set", value)]


def assert_refused(done, marker: Path):
    assert done.returncode != 0
    assert not marker.exists(), "the crafted file ran its code"
    assert "refused" in done.stderr and "could run code" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_the_crafted_file_calls_os_system():
    """The test's own check, without running it: the crafted file's pickle names os.system (a full unpickle
    would call it), so the marker's absence below means tessera refused it."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = craft(Path(folder) / "evil.pt", Path(folder) / "ran")
        assert {"posix.system", "os.system"} & set(torch.serialization.get_unsafe_globals_in_checkpoint(path))


@pytest.fixture(scope="module")
def trained_run(sample_store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("files") / "run"
    done = tessera("train", "--run-dir", str(run_dir),
                   *sets(f"data.store={sample_store}", *SMALL, "train.steps=2", "train.checkpoint_every=2"))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_score_refuses_a_crafted_export(sample_data, tmp_path):
    marker = tmp_path / "ran"
    evil = craft(tmp_path / "model.pt", marker, method_json="{}", state={}, config_json="{}")
    done = tessera("score", str(evil), str(sample_data.slide), "--out", str(tmp_path / "out"))
    assert_refused(done, marker)
    assert not (tmp_path / "out" / "store.zarr").exists()  # refused before any work


def test_eval_refuses_a_crafted_final_pt(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    marker = tmp_path / "ran"
    craft(run_dir / "final.pt", marker)
    assert_refused(tessera("eval", str(run_dir), "--split", "train"), marker)


def test_training_refuses_a_crafted_statistics_file(sample_store, tmp_path):
    marker = tmp_path / "ran"
    evil = craft(tmp_path / "stats.pt", marker)
    done = tessera("train", "--run-dir", str(tmp_path / "run"),
                   *sets(f"data.store={sample_store}", "method.name=mkd",
                         "method.options={net: efficientnet_lite0, layers: [reduction2, reduction3], cloner_base: 4}",
                         "data.stream.crop=random",
                         "data.stream.crop_size=32", "train.micro_batch=2", "train.num_workers=0", "train.steps=1",
                         f"train.statistics_file={evil}"))
    assert_refused(done, marker)


@pytest.mark.parametrize("target", ["state/{tag}/rank0.pt", "model/{tag}/mp_rank_00_model_states.pt"])
def test_resume_refuses_crafted_checkpoint_files(trained_run, tmp_path, target):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    (run_dir / "final.pt").unlink()
    tag = "step00000002"
    marker = tmp_path / "ran"
    craft(run_dir / "checkpoints" / target.format(tag=tag), marker)
    assert_refused(tessera("train", "--run-dir", str(run_dir), "--resume"), marker)


def test_files_of_another_kind_or_a_newer_version_are_named(tmp_path):
    path = save_file({"statistics": {"lambda": 1.0}}, tmp_path / "stats.pt", "tessera-statistics")
    assert load_file(path, "tessera-statistics")["statistics"] == {"lambda": 1.0}
    with pytest.raises(UnsafeFileError, match="not a tessera-export file .*format: 'tessera-statistics'"):
        load_file(path, "tessera-export")
    torch.save({"lambda": 1.0}, tmp_path / "old.pt")  # tessera 0.1 wrote statistics without a format
    with pytest.raises(UnsafeFileError, match="tessera features stats"):
        load_file(tmp_path / "old.pt", "tessera-statistics")
    save_file({}, tmp_path / "new.pt", "tessera-statistics")
    bundle = torch.load(tmp_path / "new.pt", weights_only=True)
    torch.save({**bundle, "format_version": 99, "tessera": "9.0"}, tmp_path / "new.pt")
    with pytest.raises(UnsafeFileError, match="newer .*upgrade tessera"):
        load_file(tmp_path / "new.pt", "tessera-statistics")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(UnsafeFileError, match="truncated"):
        load_file(tmp_path / "cut.pt", "tessera-statistics")


def _python_sources():
    for folder in ("core", "data_plane", "trainers", "tune", "cluster", "tessera", "bench", "tests"):
        yield from (ROOT / folder).rglob("*.py")


def test_no_full_unpickling_and_no_silenced_errors_in_the_code_base():
    unsafe = "weights_only=" + "False"  # spelled apart so this file does not match itself
    silenced = re.compile(r"except\s+(Exception|BaseException)?\s*(as\s+\w+\s*)?:\s*\n\s*pass\b")
    offenders = []
    for path in _python_sources():
        text = path.read_text()
        if unsafe in text.replace(" ", ""):
            offenders.append(f"{path.relative_to(ROOT)}: {unsafe}")
        if "allow_pickle=" + "True" in text.replace(" ", ""):
            offenders.append(f"{path.relative_to(ROOT)}: numpy's allow_pickle")
        if silenced.search(text):
            offenders.append(f"{path.relative_to(ROOT)}: an exception silenced with pass")
    assert not offenders, "\n".join(offenders)
