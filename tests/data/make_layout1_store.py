"""How tests/data/layout1.zarr was made: a store in layout 1 (tessera 0.2, commit 70cde96), kept to test
`tessera store migrate`. Run with that commit on PYTHONPATH:  PYTHONPATH=<checkout of 70cde96> python
tests/data/make_layout1_store.py tests/data/layout1.zarr. Not collected by pytest; this tessera cannot run it."""
import json, sys
from pathlib import Path
import numpy as np, nibabel
from PIL import Image
from tessera.config import load_config
from data_plane.sample_data import fetch_sample_data as ensure_sample_data
from data_plane.tiff_writer import texture_tile_fn, write_pyramidal_tiff
from data_plane.ingest import ingest, source_for
from data_plane.heatmap import write_heatmap
from data_plane.volumes import write_volume_scores

out = Path(sys.argv[1]); src = out.parent / "src"; src.mkdir(parents=True, exist_ok=True)
data = ensure_sample_data()
texture = np.asarray(Image.open(data.he_target).convert("RGB"))
write_pyramidal_tiff(src / "tiny.svs", 512, 640, texture_tile_fn(texture, lambda r, c: (r - 256) ** 2 + (c - 320) ** 2 < 200 ** 2))
(src / "tiny.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature",
    "properties": {"classification": {"name": "Tumor"}}, "geometry": {"type": "Polygon",
    "coordinates": [[[200, 150], [400, 150], [400, 300], [200, 300], [200, 150]]]}}]}))
rng = np.random.default_rng(0)
vol = rng.random((20, 24, 16)).astype(np.float32); mask = np.zeros(vol.shape, np.uint8); mask[5:9, 6:10, 4:8] = 1
affine = np.diag([1.5, 1.5, 2.0, 1.0]); affine[:3, 3] = [-10, -12, 5]
nibabel.Nifti1Image(vol, affine).to_filename(src / "vol.nii.gz"); nibabel.Nifti1Image(mask, affine).to_filename(src / "vol_mask.nii.gz")
config = load_config(None, ["data.tiles.size=128", "data.tiles.magnification=null", "data.tissue.mask_downsample=16",
                            "data.annotations.downsample=16"]).data
sources = [source_for(src / "tiny.svs", "anomalous", "test", src / "tiny.geojson"), source_for(src / "vol.nii.gz", "anomalous", "test", src / "vol_mask.nii.gz")]
report = ingest(sources, out, config, workers=1, show_progress=False)
assert not report.failed, report.failed
import pandas as pd
tiles = pd.read_parquet(out / "tiles.parquet")
write_heatmap(out, "tiny", "run1", tiles[["y", "x"]].to_numpy(), 128, scores=np.arange(len(tiles), dtype=float))
import zarr
shape = zarr.open_group(str(out / "volumes" / "vol"), mode="r").attrs["tessera"]["shape_zyx"]
write_volume_scores(out, "vol", "run1", np.ones(shape, np.float32) * 0.5, 0.25)
print(report)
