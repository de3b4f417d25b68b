import json
import subprocess
import sys

from typer.testing import CliRunner

from tessera.cli import app

runner = CliRunner()


def test_help_lists_only_working_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("config", "doctor", "sample-data", "demo"):
        assert command in result.output


def test_help_does_not_import_heavy_libraries():
    # `tessera --help` must stay fast: the heavy stack is imported by commands, never at import time.
    code = ("import sys; from typer.testing import CliRunner; from tessera.cli import app; "
            "CliRunner().invoke(app, ['--help']); "
            "print(sorted(m for m in ('torch', 'monai', 'deepspeed', 'ray', 'zarr', 'openslide') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_config_show_prints_resolved_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: shown\n")
    result = runner.invoke(app, ["config", "show", str(recipe), "--set", "data.tiles.size=512"])
    assert result.exit_code == 0, result.output
    assert "name: shown" in result.output
    assert "size: 512" in result.output
    assert "min_tissue_fraction" in result.output  # defaults are spelled out


def test_config_show_reports_errors_with_exit_code_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  tiles:\n    sise: 3\n")
    result = runner.invoke(app, ["config", "show", str(recipe)])
    assert result.exit_code == 2
    assert "did you mean 'data.tiles.size'" in result.output


def test_doctor_reports_the_stack():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for name in ("torch", "deepspeed", "ray", "monai", "openslide", "zarr", "gloo"):
        assert name in result.output


def test_sample_data_prints_paths(sample_data):
    result = runner.invoke(app, ["sample-data", "--dest", str(sample_data.slide.parent)])
    assert result.exit_code == 0, result.output
    assert str(sample_data.slide) in result.output
    assert str(sample_data.mni152_t1) in result.output


def test_demo_writes_a_run_directory(tmp_path, sample_data):
    result = runner.invoke(app, ["demo", "--set", f"runs_dir={tmp_path}", "--set", f"data.store={tmp_path}/store.zarr"])
    assert result.exit_code == 0, result.output
    (run,) = tmp_path.glob("demo-*")
    for name in ("config.yaml", "command.txt", "git.txt", "log.txt", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert "aperio" in (run / "log.txt").read_text()
    stages = {r["stage"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert list(stages)[4:] == ["mkd", "train", "eval", "fpi", "synthesize", "pgan_enc", "finished"]
    # the headline: a detector that detects, with a figure where the anomaly lights up
    assert stages["mkd"]["ihc_tissue_auroc"] > 0.9, stages["mkd"]
    assert (run / "mkd" / "eval-test" / "heatmaps" / "test_ihc_tissue.pixels.png").stat().st_size > 1000
    assert "test_ihc_tissue.pixels.png" in result.output and "demo finished in" in result.output
    assert "stage '5. a detector that works" in (run / "log.txt").read_text()
    assert 0 <= stages["fpi"]["pixel_auroc"] <= 1 and list((run / "fpi" / "eval-test" / "mood" / "pixel").glob("*.nii.gz"))
    assert 0 <= stages["eval"]["image_auroc"] <= 1 and (run / "mkd" / "feature_stats.pt").is_file()
    assert stages["synthesize"]["complete"] and (run / "stylegan2" / "synthetic-grid.png").stat().st_size > 1000
    assert all(0 <= stages["pgan_enc"][f"{t}_auroc"] <= 1 for t in ("combined", "residual", "latent_norm"))
    assert (run / "pgan_enc" / "eval-test" / "reconstructions.png").stat().st_size > 1000
    overlays = [p for p in (run / "mkd" / "eval-test" / "heatmaps").glob("*.png") if not p.name.endswith(".pixels.png")]
    from data_plane.benchmarks import SLIDE_GROUPS

    slides = 1 + len(SLIDE_GROUPS)  # every test slide of the benchmark: the normal mosaic and one per group
    assert len(overlays) == slides
    exported = list((run / "mkd" / "eval-test" / "annotations").glob("*.geojson"))
    assert len(exported) == slides and all(json.loads(p.read_text())["features"] for p in exported)


def test_resume_with_a_corrupt_config_and_submit_of_a_bad_config_fail_in_one_message(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("train: [unclosed\n")
    done = subprocess.run([sys.executable, "-m", "tessera.cli", "train", "--run-dir", str(run_dir), "--resume"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"cannot resume '{run_dir}'" in done.stderr and "not valid YAML" in done.stderr
    result = CliRunner().invoke(app, ["submit", "--dry-run", "--", "train", "configs/demo.yaml",
                                      "--set", "train.steps=true"])
    assert result.exit_code == 2 and "nothing was submitted" in result.output
    assert "train.steps: expected a number, not a boolean" in result.output and "#!/" not in result.output
    result = CliRunner().invoke(app, ["submit", "--dry-run", "--", "train", "configs/demo.yaml",
                                      "--set", "train.steps=3"])
    assert result.exit_code == 0 and "train.steps=3" in result.output
