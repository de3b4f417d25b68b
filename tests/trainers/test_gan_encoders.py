"""pgan_enc and fanogan through the real trainer and evaluation on the sample slide's tiles: the joint
run grows 8² -> 16² (its log records the resolutions and α), evaluation ranks L_n, L_o and their
combination apart in metrics.json and writes reconstructions, and fanogan trains its encoder against the
saved generator of an encoder-less run. Training's progress, printed into a pipe, is plain lines."""

import json

from tests.trainers.test_feature_methods import tessera
from trainers.files import load_file

GAN = "{resolution: 16, z_dim: 16, channel_base: 128, channel_max: 16}"


def sets(store, method, options, *extra):
    values = [f"data.store={store}", "data.stream.crop=random", "data.stream.crop_size=16",
              "data.stream.eval_crop=center", "data.stream.min_tissue_fraction=0.3", f"method.name={method}",
              f"method.options={options}", "train.micro_batch=4", "train.num_workers=0", "train.steps=12",
              "train.checkpoint_every=6", "train.log_every=2", "train.lr=0.001", "train.betas=[0.0, 0.99]",
              "train.clip_grad=null", "train.precision=fp32", *extra]
    return [arg for value in values for arg in ("--set", value)]


def test_pgan_enc_grows_and_reports_its_score_terms_and_fanogan_inverts_a_plain_run(sample_store, tmp_path):
    growing = json.dumps({"start_resolution": 8, "target_resolution": 16, "stable_images": 16, "fade_images": 16})
    joint = tmp_path / "joint"
    printed = tessera("train", "--run-dir", str(joint), *sets(sample_store, "pgan_enc", GAN, f"train.growing={growing}"))
    # stdout is a pipe here, as in a Slurm log: plain lines after the first step and at every tick, with ETA
    lines = [line for line in printed.splitlines() if " step: " in line]
    assert lines[0].startswith("train ") and "step: 1/12 (8%)" in lines[0] and "first step done" in lines[0]
    assert [line.split("step: ")[1].split("/")[0] for line in lines[1:]] == ["2", "4", "6", "8", "10", "12"]
    assert "ETA" in lines[1] and "loss/Dmain=" in lines[1] and "img/s" in lines[1]
    records = [json.loads(line) for line in (joint / "metrics.jsonl").read_text().splitlines()]
    ticks = [(r["resolution"], r["alpha"]) for r in records if "resolution" in r]
    assert ticks[0] == (8, 1.0) and ticks[-1] == (16, 1.0) and any(0 < a < 1 for _, a in ticks)
    assert all(f"loss/{phase}" in records[-1] for phase in ("Dmain", "Gmain", "Emain"))
    assert set(load_file(joint / "final.pt", "tessera-final")["ema"]) == {"G", "E"}

    tessera("eval", str(joint), "--split", "train")  # the sample store has no anomalies: train normals
    metrics = json.loads((joint / "eval-train" / "metrics.json").read_text())
    assert set(metrics["score_terms"]) == {"combined", "residual", "latent_norm"}
    assert all(t["overall"]["n_normal"] == metrics["overall"]["n_normal"] > 0 for t in metrics["score_terms"].values())
    assert (joint / "eval-train" / "reconstructions.png").is_file()
    assert "score term latent_norm" in (joint / "eval-train" / "index.html").read_text()

    plain = tmp_path / "plain"
    tessera("train", "--run-dir", str(plain),
            *sets(sample_store, "pgan_enc", GAN[:-1] + ", encoder_loss: none}", "train.steps=4"))
    izif = tmp_path / "izif"
    tessera("train", "--run-dir", str(izif), *sets(sample_store, "fanogan", f"{{generator: {plain}}}", "train.steps=4"))
    saved = load_file(izif / "final.pt", "tessera-final")
    generator = load_file(plain / "final.pt", "tessera-final")
    for key, value in generator["ema"]["G"].items():  # G_ema of the plain run, frozen inside fanogan's weights
        assert saved["state"][f"G.{key}"].equal(value)
    tessera("eval", str(izif), "--split", "train")
    assert "score_terms" in json.loads((izif / "eval-train" / "metrics.json").read_text())


def test_pgan_enc_on_volume_slices_reports_terms_per_volume(tmp_path):
    from data_plane.benchmarks import make_brain_benchmark
    from data_plane.ingest import ingest, resolve_sources
    from tessera.config import load_config
    from core.scoring import pooled_slice_term

    manifest = make_brain_benchmark(tmp_path / "brain", subjects=6, resolution=2, seed=4, show_progress=False)
    store = tmp_path / "brain.zarr"
    assert not ingest(resolve_sources([], manifest), store, load_config(None).data, show_progress=False).failed
    run_dir = tmp_path / "run"
    values = [f"data.store={store}", "train.data=slices", "data.volume_stream.slice_size=32",
              "data.volume_stream.min_foreground=0.05", "method.name=pgan_enc",
              "method.options={in_channels: 1, resolution: 16, z_dim: 16, channel_base: 128, channel_max: 16}",
              "train.micro_batch=8", "train.num_workers=0", "train.steps=4", "train.checkpoint_every=4",
              "train.betas=[0.0, 0.99]", "train.clip_grad=null", "train.precision=fp32"]
    tessera("train", "--run-dir", str(run_dir), *[a for v in values for a in ("--set", v)])
    tessera("eval", str(run_dir))
    metrics = json.loads((run_dir / "eval-test" / "metrics.json").read_text())
    counts = (metrics["overall"]["n_normal"], metrics["overall"]["n_anomalous"])
    assert counts == (1, 2)  # one value per volume, slices pooled
    assert all((t["overall"]["n_normal"], t["overall"]["n_anomalous"]) == counts
               for t in metrics["score_terms"].values())
    # the pooled value: the mean of the highest tenth of the slices with enough foreground
    assert pooled_slice_term([(0.0, 9.0)] + [(0.5, float(v)) for v in range(20)], 0.05) == 18.5
    assert pooled_slice_term([(0.0, 3.0)], 0.05) == 3.0  # no slice with foreground: all of them
