import json

from tessera.config import load_config
from trainers.run_dir import create_run_dir


def test_run_dir_records_what_reproduces_the_run(tmp_path):
    config = load_config(None, ["name=probe", "data.tiles.size=320"])
    run = create_run_dir(config, name=config.name, root=tmp_path, command=["tessera", "train", "x y.yaml"])
    run.log("hello")
    run.metrics({"step": 1, "loss": 0.5})
    run.metrics({"step": 2, "loss": 0.25})
    run.close()
    assert run.path.parent == tmp_path and run.path.name.startswith("probe-")
    assert load_config(run.path / "config.yaml") == config
    assert (run.path / "command.txt").read_text() == "tessera train 'x y.yaml'\n"
    assert "commit:" in (run.path / "git.txt").read_text()
    assert "hello" in (run.path / "log.txt").read_text()
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("time" in r for r in rows)


def test_runs_started_together_get_distinct_directories(tmp_path):
    config = load_config(None)
    paths = {create_run_dir(config, name="same", root=tmp_path).path for _ in range(3)}
    assert len(paths) == 3
