import numpy as np
import openslide
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from data_plane.config import StreamConfig
from data_plane.ingest import Source, ingest
from data_plane.stream import GridStream, TileStream, on_device, shard


def indices(stream, workers):
    loader = DataLoader(stream, batch_size=4, num_workers=workers)
    return [int(i) for batch in loader for i in batch["index"]]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_sharding_covers_each_tile_exactly_once(sample_store, world_size, workers):
    config = StreamConfig(min_tissue_fraction=0.0, seed=3)
    seen = []
    for rank in range(world_size):
        stream = TileStream(sample_store, config, rank=rank, world_size=world_size, epoch=1)
        got = indices(stream, workers)
        assert len(got) == len(stream)
        seen += got
    assert sorted(seen) == list(range(len(stream.tiles)))


def test_epochs_reshuffle_deterministically(sample_store):
    stream = TileStream(sample_store, StreamConfig(min_tissue_fraction=0.0, seed=1))
    again = TileStream(sample_store, StreamConfig(min_tissue_fraction=0.0, seed=1))
    assert (stream.epoch_order(0) == again.epoch_order(0)).all()
    assert not (stream.epoch_order(0) == stream.epoch_order(1)).all()
    assert sorted(stream.epoch_order(1)) == list(range(len(stream.tiles)))


def test_shard_helper_partitions():
    order = np.random.default_rng(0).permutation(103)
    parts = [shard(order, r, 3, w, 2) for r in range(3) for w in range(2)]
    assert sorted(np.concatenate(parts)) == list(range(103))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_filters_and_per_slide_cap(sample_store):
    full = TileStream(sample_store, StreamConfig(min_tissue_fraction=0.0))
    rich = TileStream(sample_store, StreamConfig(min_tissue_fraction=0.9))
    assert 0 < len(rich.tiles) < len(full.tiles) and (rich.tiles["tissue_fraction"] >= 0.9).all()
    capped = TileStream(sample_store, StreamConfig(min_tissue_fraction=0.0, max_tiles_per_slide=5))
    assert len(capped.epoch_order(0)) == 5 and set(capped.epoch_order(0)) != set(capped.epoch_order(1))
    with pytest.raises(ValueError, match="no tile of store"):
        TileStream(sample_store, StreamConfig(splits=["test"]))


def test_items_match_openslide_pixels(sample_store, sample_data):
    stream = TileStream(sample_store, StreamConfig(min_tissue_fraction=0.5), shuffle=False)
    item = next(iter(stream))
    assert item["image"].shape == (3, 256, 256) and item["image"].dtype == torch.uint8  # floats on the device
    y, x = item["level0_yx"].tolist()
    with openslide.OpenSlide(str(sample_data.slide)) as slide:
        direct = np.asarray(slide.read_region((x, y), 0, (256, 256)).convert("RGB"))
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), direct)
    ready = on_device({"image": item["image"][None], "target": torch.tensor([0])}, torch.device("cpu"), torch.bfloat16)
    assert ready["image"].dtype == torch.bfloat16 and ready["target"].dtype == torch.int64
    floats = on_device({"image": item["image"][None]}, torch.device("cpu"))["image"][0]
    assert floats.dtype == torch.float32 and torch.equal(floats, item["image"].to(torch.float32).mul_(1 / 255))
    assert 0 <= float(floats.min()) and float(floats.max()) <= 1
    assert item["slide_id"] == "cmu_small_region" and item["label"] == "normal" and item["target"] == 0
    assert "mask" not in item  # no slide of this store is annotated


@pytest.mark.parametrize("crop", ["random", "center"])
def test_crops_stay_inside_their_tile(sample_store, sample_data, crop):
    stream = TileStream(sample_store, StreamConfig(min_tissue_fraction=0.5, crop=crop, crop_size=96), shuffle=False)
    rows = stream.tiles
    offsets = set()
    with openslide.OpenSlide(str(sample_data.slide)) as slide:
        for item in stream:
            row = rows.iloc[item["index"]]
            y, x = item["level0_yx"].tolist()
            assert row.y <= y <= row.y + 256 - 96 and row.x <= x <= row.x + 256 - 96
            offsets.add((y - row.y, x - row.x))
            direct = np.asarray(slide.read_region((x, y), 0, (96, 96)).convert("RGB"))
            np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), direct)
    assert (len(offsets) > 5) if crop == "random" else offsets == {(80, 80)}


def test_augmentation_preset_changes_geometry_but_keeps_content(sample_store):
    plain = TileStream(sample_store, StreamConfig(min_tissue_fraction=0.5), shuffle=False)
    flipped = TileStream(sample_store, StreamConfig(min_tissue_fraction=0.5, augment="flips"), shuffle=False)
    changed = 0
    for a, b in zip(plain, flipped):
        assert a["image"].shape == b["image"].shape and b["image"].dtype == torch.uint8  # flips keep the bytes
        np.testing.assert_allclose(np.sort(a["image"].flatten()), np.sort(b["image"].flatten()), atol=1e-6)
        changed += not torch.equal(a["image"], b["image"])
    assert changed > 5


def test_annotation_masks_label_tiles_and_crop_with_the_image(tmp_path, make_slide, data_config):
    slide = make_slide(tmp_path / "tumour.svs", height=2048, width=2048, centre=(1024, 1024), radius=1000)
    xml = tmp_path / "tumour.xml"
    # A 512-px square of "tumor" with a 128-px exclusion hole (Camelyon16's _2 group) in it.
    square = [(512, 512), (1024, 512), (1024, 1024), (512, 1024)]
    hole = [(700, 700), (828, 700), (828, 828), (700, 828)]
    def polygon(group, points):
        coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(points))
        return f'<Annotation Name="a" Type="Polygon" PartOfGroup="{group}"><Coordinates>{coords}</Coordinates></Annotation>'
    xml.write_text(f"<ASAP_Annotations><Annotations>{polygon('_0', square)}{polygon('_2', hole)}"
                   "</Annotations></ASAP_Annotations>")
    store = tmp_path / "s.zarr"
    config = data_config("data.tiles.magnification=null", "data.tiles.size=256")
    report = ingest([Source(slide, "tumour", "anomalous", "test", xml, "metastasis")], store, config,
                    show_progress=False)
    assert report.done == ["tumour"], report.failed
    tiles = pd.read_parquet(store / ".tessera" / "tiles.parquet")
    anomalous = tiles[tiles["label"] == "anomalous"]
    assert set(zip(anomalous["y"], anomalous["x"])) == {(512, 512), (512, 768), (768, 512), (768, 768)}
    assert (tiles[tiles["label"] == "normal"]["annotation_fraction"] == 0).all()
    stream = TileStream(store, StreamConfig(splits=["test"], labels=["anomalous"], min_tissue_fraction=0),
                        shuffle=False)
    items = {tuple(i["level0_yx"].tolist()): i for i in stream}
    top_left = items[(512, 512)]
    assert top_left["has_mask"] and top_left["target"] == 1 and top_left["group"] == "metastasis"
    mask = top_left["mask"][0].numpy()
    assert mask[:150, :150].all()                  # tumour
    assert not mask[200:250, 200:250].any()        # the exclusion hole starts at 700-512 = 188 px
    assert items[(768, 768)]["mask"][0].numpy()[100:, 100:].all()


def test_geojson_annotations(tmp_path, make_slide, data_config):
    import json

    slide = make_slide(tmp_path / "q.svs", height=2048, width=2048, centre=(1024, 1024), radius=1000)
    ring = [[512, 512], [1024, 512], [1024, 1024], [512, 1024], [512, 512]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
               "properties": {"classification": {"name": "Tumor"}}}
    path = tmp_path / "q.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    store = tmp_path / "s.zarr"
    report = ingest([Source(slide, "q", "anomalous", "test", path, "")], store,
                    data_config("data.tiles.magnification=null"), show_progress=False)
    assert report.done == ["q"]
    assert (store / "slides" / "q" / "labels" / "tumor" / "0" / "zarr.json").is_file()
    assert (pd.read_parquet(store / ".tessera" / "tiles.parquet")["label"] == "anomalous").sum() == 4


def test_grid_stream_and_heatmap_stitch_back(sample_store, tmp_path):
    import zarr

    from data_plane.heatmap import render_overlay, write_heatmap

    grid = GridStream(sample_store, ["cmu_small_region"])
    items = list(grid)
    assert len(items) == len(grid.tiles)
    yx = torch.stack([i["level0_yx"] for i in items]).numpy()
    scores = yx[:, 0].astype(float)  # a score that grows down the slide
    heat = write_heatmap(sample_store, "cmu_small_region", "probe", yx, 256, scores=scores)
    stored = zarr.open_group(str(sample_store / "slides" / "cmu_small_region" / "heatmaps" / "probe"), mode="r")
    np.testing.assert_array_equal(stored["0"][:], heat)
    ds = stored.attrs["tessera"]["downsample"]
    for (y, x), score in zip(yx, scores):
        assert heat[y // ds + 1, x // ds + 1] == score
    assert np.isnan(heat[0, 0])  # glass was never scored
    png = render_overlay(sample_store, "cmu_small_region", tmp_path / "heat.png", heatmap="probe")
    assert png.stat().st_size > 10_000


def stain_signature(method, image):
    """What each method matches: Macenko's fitted H&E stain vectors, Reinhard's LAB mean and std."""
    import torchstain
    from skimage.color import rgb2lab

    if method == "macenko":
        normalizer = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        normalizer.fit(image)
        return normalizer.HERef.ravel()
    lab = rgb2lab(image).reshape(-1, 3)
    return np.concatenate([lab.mean(0), lab.std(0)])


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_stain_normalisation_moves_tiles_towards_the_reference(sample_store, texture, method):
    from data_plane.config import StainConfig
    from data_plane.stain import StainNormalizer

    def mosaic(stain):
        stream = TileStream(sample_store, StreamConfig(min_tissue_fraction=0.9), shuffle=False, stain=stain)
        return np.concatenate([i["image"].permute(1, 2, 0).numpy() for i in stream], axis=1)

    reference = stain_signature(method, texture)
    before = np.abs(stain_signature(method, mosaic(None)) - reference).sum()
    after = np.abs(stain_signature(method, mosaic(StainConfig(method=method))) - reference).sum()
    assert after < 0.25 * before  # measured: Macenko 0.58 -> 0.04, Reinhard 22 -> 0.3
    # A tile of blank glass cannot be fitted; it passes through unchanged.
    normalizer = StainNormalizer(method, texture)
    glass = np.full((64, 64, 3), 245, np.uint8)
    out = normalizer.normalize_uint8(glass)
    assert out.shape == glass.shape and out.dtype == np.uint8


def test_batched_stain_normalisation_matches_per_tile(sample_store, texture):
    from data_plane.stain import StainNormalizer

    normalizer = StainNormalizer("reinhard", texture)
    tiles = torch.stack([item["image"] for item, _ in zip(TileStream(sample_store, StreamConfig()), range(4))])
    together = normalizer.normalize_batch(on_device({"image": tiles}, torch.device("cpu"))["image"])
    for image, normalised in zip(tiles, together):
        tile = image.permute(1, 2, 0).numpy()
        expected = normalizer.normalize_uint8(tile)
        np.testing.assert_allclose(normalised.permute(1, 2, 0).numpy() * 255, expected, atol=1e-3)


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.parametrize("done", [0, 1, 4, 7])
def test_resume_mid_epoch_continues_with_the_same_batches(sample_store, workers, done):
    config = StreamConfig(min_tissue_fraction=0.0, seed=4, augment="flips")
    def loader(stream):
        return list(DataLoader(stream, batch_size=None, num_workers=workers))
    full = loader(TileStream(sample_store, config, rank=1, world_size=2, epoch=3).batched(2))
    reference = loader(TileStream(sample_store, config, rank=1, world_size=2, epoch=3).batched(2))
    stream = TileStream(sample_store, config, rank=1, world_size=2, epoch=3).batched(2)
    stream.resume_at(done)
    rest = loader(stream)
    assert len(full) == len(stream) + done
    # The batch order does not depend on the worker count, and resuming continues it exactly.
    assert [b["index"].tolist() for b in full] == [b["index"].tolist() for b in reference]
    assert [b["index"].tolist() for b in rest] == [b["index"].tolist() for b in full[done:]]
    for a, b in zip(rest, full[done:]):
        assert torch.equal(a["image"], b["image"])  # same augmentation after resuming


def test_batched_order_is_the_same_for_any_worker_count(sample_store):
    config = StreamConfig(min_tissue_fraction=0.0, seed=4)
    orders = [[b["index"].tolist() for b in DataLoader(TileStream(sample_store, config).batched(5), batch_size=None,
                                                        num_workers=w)] for w in (0, 1, 3)]
    assert orders[0] == orders[1] == orders[2]
    assert sorted(i for batch in orders[0] for i in batch) == list(range(len(TileStream(sample_store, config).tiles)))


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_endless_stream_is_the_epochs_in_order_and_resumes_anywhere(sample_store, workers):
    from itertools import islice

    config = StreamConfig(min_tissue_fraction=0.0, seed=6)
    def epoch_batches(epoch):
        stream = TileStream(sample_store, config, rank=0, world_size=2, epoch=epoch).batched(4)
        return [b["index"].tolist() for b in DataLoader(stream, batch_size=None)]
    expected = epoch_batches(0) + epoch_batches(1) + epoch_batches(2)
    def endless(start, count):
        stream = TileStream(sample_store, config, rank=0, world_size=2).batched(4).endless(start)
        return list(islice(DataLoader(stream, batch_size=None, num_workers=workers), count))
    got = endless(0, len(expected))
    assert [b["index"].tolist() for b in got] == expected
    assert [int(b["global_batch"]) for b in got] == list(range(len(expected)))
    per_epoch = len(epoch_batches(0))
    assert [int(b["epoch"]) for b in got] == [i // per_epoch for i in range(len(expected))]
    resumed = endless(per_epoch + 2, 5)
    assert [b["index"].tolist() for b in resumed] == expected[per_epoch + 2: per_epoch + 7]


def test_endless_ranks_stay_in_the_same_epoch_when_shares_straddle_a_batch(sample_store):
    """47 tiles on 2 ranks with micro batch 23: shares of 24 and 23 tiles would give 2 and 1 batches per
    epoch, and the ranks would drift into different epochs. Padding by wrapping keeps them together."""
    from itertools import islice

    config = StreamConfig(min_tissue_fraction=0.0, seed=3)
    tiles = len(TileStream(sample_store, config).tiles)
    assert tiles == 47
    per_rank = []
    for rank in (0, 1):
        stream = TileStream(sample_store, config, rank=rank, world_size=2).batched(23).endless(0)
        per_rank.append(list(islice(DataLoader(stream, batch_size=None), 12)))
    for a, b in zip(*per_rank):
        assert int(a["epoch"]) == int(b["epoch"]) and int(a["global_batch"]) == int(b["global_batch"])
    assert [int(b["epoch"]) for b in per_rank[0]] == [i // 2 for i in range(12)]
    for epoch in range(6):  # every tile in every epoch, one repeated to even the shares
        seen = [i for rank in per_rank for b in rank[2 * epoch: 2 * epoch + 2] for i in b["index"].tolist()]
        assert len(seen) == 48 and set(seen) == set(range(47))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_the_micro_batches_one_rank_accumulating_would(sample_store, world_size):
    """W ranks at micro-batch B: rank r's k-th batch is one rank's batch k·W + r (same global batches, so
    a run's numbers do not depend on how it is split over ranks); a short last global batch is shared."""
    from itertools import islice

    config = StreamConfig(min_tissue_fraction=0.9, seed=2)
    assert len(TileStream(sample_store, config).tiles) == 24
    one = [b["index"].tolist() for b in islice(DataLoader(
        TileStream(sample_store, config).batched(4).endless(0), batch_size=None), 12)]
    for rank in range(world_size):
        stream = TileStream(sample_store, config, rank=rank, world_size=world_size).batched(4)
        got = [b["index"].tolist() for b in islice(DataLoader(stream.endless(0), batch_size=None), 12)]
        if world_size == 2:  # 24 tiles = 3 global batches of 8: exactly one rank's batches, interleaved
            assert got[:6] == one[rank::2]
        epoch0 = [i for b in got[:stream.batches_per_epoch()] for i in b]
        assert len(epoch0) == 24 // world_size
    if world_size == 3:  # 24 tiles, global batches of 12: two per epoch, every tile once
        shares = [[i for b in islice(DataLoader(TileStream(sample_store, config, rank=r, world_size=3).batched(4)
                                                .endless(0), batch_size=None), 2) for i in b["index"].tolist()]
                  for r in range(3)]
        assert sorted(sum(shares, [])) == sorted(i for b in one[:6] for i in b)


def test_augmented_items_are_plain_tensors_that_save_safely(sample_store, tmp_path):
    """MONAI's transforms return MetaTensors; one reaching a saved file (features computed from a batch)
    makes weights_only loading refuse it. The stream hands out plain tensors."""
    stream = TileStream(sample_store, StreamConfig(min_tissue_fraction=0.0, augment="histology", seed=1)).batched(2)
    batch = next(iter(DataLoader(stream, batch_size=None)))
    assert type(batch["image"]) is torch.Tensor and batch["image"].dtype == torch.float32  # contrast, noise: floats
    torch.save({"x": batch["image"] * 2}, tmp_path / "f.pt")
    torch.load(tmp_path / "f.pt", weights_only=True)
