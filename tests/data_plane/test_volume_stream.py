import os

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from data_plane.config import VolumeStreamConfig
from data_plane.ingest import ingest, resolve_sources
from data_plane.volume_stream import PairedSliceStream, PatchStream, SliceStream


@pytest.fixture(scope="module")
def brain_store(tmp_path_factory):
    """A small real benchmark: 6 subjects from the 2 mm MNI152 template, ingested."""
    from data_plane.benchmarks import make_brain_benchmark
    from tessera.config import load_config

    folder = tmp_path_factory.mktemp("brain")
    manifest = make_brain_benchmark(folder / "bench", subjects=6, resolution=2, seed=1, show_progress=False)
    report = ingest(resolve_sources([], manifest), folder / "s.zarr", load_config(None).data, show_progress=False)
    assert len(report.done) == 6 and not report.failed, report.failed
    return folder / "s.zarr"


def indices(stream, workers):
    return [int(i) for batch in DataLoader(stream, batch_size=3, num_workers=workers) for i in batch["index"]]


@pytest.mark.parametrize("stream_class", [PatchStream, SliceStream, PairedSliceStream])
@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 2), (3, 1), (4, 3)])
def test_volume_streams_cover_each_item_once(brain_store, stream_class, world_size, workers):
    config = VolumeStreamConfig(splits=["train", "test"], patch_size=32, patches_per_volume=3, slice_size=64,
                                slice_axis=0, seed=5)
    seen = []
    for rank in range(world_size):
        stream = stream_class(brain_store, config, rank=rank, world_size=world_size, epoch=2)
        got = indices(stream, workers)
        assert len(got) == len(stream)
        seen += got
    assert sorted(seen) == list(range(stream.num_items()))


def test_patches_are_read_where_they_say(brain_store):
    from data_plane.volumes import volume_array

    stream = PatchStream(brain_store, VolumeStreamConfig(patch_size=24, patches_per_volume=2))
    for item in stream:
        z, y, x = item["origin_zyx"].tolist()
        volume = volume_array(brain_store, item["volume_id"])
        np.testing.assert_array_equal(item["image"][0].numpy(), volume[z:z + 24, y:y + 24, x:x + 24])
    again = [i["origin_zyx"].tolist() for i in PatchStream(brain_store, VolumeStreamConfig(patch_size=24, patches_per_volume=2))]
    first = [i["origin_zyx"].tolist() for i in stream]
    assert again == first  # same seed and epoch, same patches
    stream.set_epoch(1)
    assert [i["origin_zyx"].tolist() for i in stream] != first


@pytest.fixture
def shared_memory(tmp_path, monkeypatch):
    """The shared volume caches of this test under tmp_path, not /dev/shm."""
    import data_plane.volume_cache

    monkeypatch.setattr(data_plane.volume_cache, "SHARED_MEMORY", tmp_path / "shm")
    (tmp_path / "shm").mkdir()
    return tmp_path / "shm"


def test_volume_cache_serves_the_same_patches_and_keeps_to_its_budget(brain_store, shared_memory):
    config = VolumeStreamConfig(patch_size=24, patches_per_volume=3)
    uncached = list(PatchStream(brain_store, config.model_copy(update={"volume_cache_mb": 0})))
    cached_stream = PatchStream(brain_store, config)
    cached = list(cached_stream)
    assert [i["origin_zyx"].tolist() for i in cached] == [i["origin_zyx"].tolist() for i in uncached]
    for a, b in zip(cached, uncached):
        assert torch.equal(a["image"], b["image"])
    cache = cached_stream.cache.whole
    one = next(iter(cache.held.values())).nbytes
    assert len(cache.held) == len(cached_stream.volumes) and cache.nbytes == one * len(cache.held)
    assert len(list(cached_stream._shared.glob("*.npy"))) == len(cached_stream.volumes)
    small = PatchStream(brain_store, config.model_copy(update={"volume_cache_mb": 1.5 * one / 2**20}))
    list(small)
    assert len(small.cache.whole.held) == 1 and small.cache.whole.nbytes <= 1.5 * one  # least recently used out
    assert len(list(small._shared.glob("*.npy"))) == 1
    tiny = PatchStream(brain_store, config.model_copy(update={"volume_cache_mb": 0.5 * one / 2**20}))
    list(tiny)
    assert not tiny.cache.whole.held and not tiny._shared.exists()  # too large: read from its chunks


def test_dataloader_workers_share_one_decoded_copy_removed_with_the_stream(brain_store, shared_memory, tmp_path,
                                                                          monkeypatch):
    import gc

    saves = tmp_path / "saves.txt"  # every write of a decoded volume, from whichever (forked) worker
    real_save = np.save
    monkeypatch.setattr(np, "save", lambda file, array, *a, **k: (
        open(saves, "a").write(f"{os.getpid()}\n"), real_save(file, array, *a, **k))[1])

    # one volume: both workers start by asking for it at once (the race a lock must settle)
    first = [str(PatchStream(brain_store, VolumeStreamConfig()).volumes.volume_id.iloc[0])]
    config = VolumeStreamConfig(patch_size=24, patches_per_volume=8, ids=first)
    expected = {int(i["index"]): i["image"] for i in PatchStream(brain_store, config.model_copy(
        update={"volume_cache_mb": 0}))}
    stream = PatchStream(brain_store, config)
    folder = stream._shared
    seen = {}
    for batch in DataLoader(stream, batch_size=2, num_workers=2):
        seen.update({int(i): image for i, image in zip(batch["index"], batch["image"])})
        # mid-epoch, both workers have read: the folder holds each volume once, whole (no partial files)
        assert not any(p.name.endswith(".partial") for p in folder.iterdir())
    assert seen.keys() == expected.keys() and all(torch.equal(seen[k], expected[k]) for k in seen)
    files = sorted(p.name for p in folder.glob("*.npy"))
    assert files == sorted(f"{v}--image.npy" for v in stream.volumes.volume_id)
    # one decoder per volume (a lock): had both workers written, one would map a copy of its own
    assert len(saves.read_text().split()) == len(stream.volumes)
    del stream
    gc.collect()
    assert not folder.exists()  # the owner let go: the shared memory is freed


def test_shared_cache_sweeps_folders_of_dead_owners_and_falls_back_without_room(tmp_path, shared_memory):
    from data_plane.volume_cache import VolumeCache, shared_folder

    orphan = shared_memory / f"tessera-volumes-{os.getuid()}" / "999999999-deadbeef"  # beyond any pid
    orphan.mkdir(parents=True)
    (orphan / "v--image.npy").write_bytes(b"stale")
    alive = shared_memory / f"tessera-volumes-{os.getuid()}" / f"{os.getpid()}-cafe0000"
    alive.mkdir()

    class Owner:
        pass

    owner = Owner()
    folder = shared_folder(owner)
    assert not orphan.exists() and alive.exists() and folder.parent == alive.parent

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = VolumeCache(2**20, blocker / "cache")  # cannot be created: a file is in the way
    volume = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    with pytest.warns(UserWarning, match="shared volume cache .* unavailable"):
        got = cache.get(("v", "image"), lambda: volume)
    assert np.array_equal(got, volume) and cache.folder is None and cache.get(("v", "image"), None) is got


def test_patch_grid_puts_corners_on_its_multiples(brain_store):
    stream = PatchStream(brain_store, VolumeStreamConfig(patch_size=24, patches_per_volume=4, patch_grid=16))
    origins = np.array([i["origin_zyx"].tolist() for i in stream])
    assert (origins % 16 == 0).all() and len({tuple(o) for o in origins}) > 1


def test_slices_skip_background_and_carry_masks(brain_store):
    config = VolumeStreamConfig(splits=["test"], slice_axis=0, slice_size=128, min_foreground=0.05)
    stream = SliceStream(brain_store, config, shuffle=False)
    items = list(stream)
    assert all(i["image"].shape == (1, 128, 128) and i["mask"].shape == (1, 128, 128) for i in items)
    assert all(float((i["image"] > 0).float().mean()) > 0.02 for i in items)
    anomalous = [i for i in items if i["target"] == 1]
    assert anomalous and any(i["mask"].any() for i in anomalous)
    assert not any(i["mask"].any() for i in items if i["target"] == 0)


def test_paired_slices_pair_the_same_index_of_two_subjects(brain_store):
    config = VolumeStreamConfig(splits=["train", "test"], slice_axis=0, slice_size=96, seed=3)
    stream = PairedSliceStream(brain_store, config)
    single = SliceStream(brain_store, config, shuffle=False)
    for item in list(stream)[:10]:
        assert item["partner_id"] != item["volume_id"]
        row = stream.volumes[stream.volumes["volume_id"] == item["partner_id"]].iloc[0]
        torch.testing.assert_close(item["image_b"][0], single.read_slice(row, item["slice"]))
    partners = {e: [i["partner_id"] for i in (stream.set_epoch(e) or stream)] for e in (0, 1)}
    assert partners[0] != partners[1]  # new pairs every epoch


def test_benchmark_manifest_follows_the_split(tmp_path):
    from data_plane.benchmarks import split_counts

    assert split_counts(20) == (12, 2, 6)
    assert split_counts(10) == (6, 1, 3)


def test_slide_benchmark_ingests_into_labelled_groups(tmp_path, sample_data):
    from data_plane.benchmarks import SLIDE_GROUPS, make_slide_benchmark
    from data_plane.config import StreamConfig
    from data_plane.stream import TileStream
    from tessera.config import load_config

    manifest = make_slide_benchmark(tmp_path / "bench", tile=128, per_group=6, seed=2, val_kinds=["ihc_tissue"],
                                    val_per_group=3)
    config = load_config(tmp_path / "bench" / "recipe.yaml").data
    report = ingest(resolve_sources([], manifest), tmp_path / "s.zarr", config, show_progress=False)
    assert not report.failed and len(report.done) == 2 + len(SLIDE_GROUPS) + 2  # + val normals, val IHC
    tiles = pd.read_parquet(tmp_path / "s.zarr" / ".tessera" / "tiles.parquet")
    assert set(tiles[tiles["split"] == "train"]["label"]) == {"normal"}
    test = tiles[tiles["split"] == "test"]
    counts = test[test["label"] == "anomalous"].groupby("group").size()
    assert set(counts.index) == set(SLIDE_GROUPS) and (counts >= 4).all()
    # the few known anomalies: their own normals and one kind; every other kind is only in test
    val = tiles[tiles["split"] == "val"]
    assert set(val[val["label"] == "anomalous"]["group"]) == {"ihc_tissue"} and (val["label"] == "normal").sum() >= 4
    with pytest.raises(ValueError, match="unknown anomaly kind"):
        make_slide_benchmark(tmp_path / "bad", kinds=["ihc_tissue", "tumour"])
    stream = TileStream(tmp_path / "s.zarr", StreamConfig(splits=["test"], groups=["he_tissue"], labels=["anomalous"]),
                        shuffle=False)
    masks = [item["mask"] for item in stream]
    assert all(m.shape == (1, 128, 128) for m in masks)
    assert all(0.05 < m.float().mean() < 0.35 for m in masks)  # one disc of radius 0.15-0.3 tile per tile


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slab_cache_gives_the_planes_a_direct_read_gives(brain_store, axis):
    """Slices through the decoded-slab cache equal direct plane reads of the store (images and masks),
    here with a budget below one slab, so that slabs are evicted and read again."""
    config = VolumeStreamConfig(splits=["test"], slice_axis=axis, slice_size=64, slab_cache_mb=1)
    stream = SliceStream(brain_store, config, shuffle=False)
    for item in list(stream)[::3]:
        row = stream.volumes[stream.volumes["volume_id"] == item["volume_id"]].iloc[0]
        direct = SliceStream(brain_store, config.model_copy(update={"slab_cache_mb": 0}), shuffle=False)
        torch.testing.assert_close(item["image"][0], direct.read_slice(row, item["slice"]), rtol=0, atol=0)
        torch.testing.assert_close(item["mask"][0].float(), direct.read_slice(row, item["slice"], "mask"),
                                   rtol=0, atol=0)


def test_slab_cache_evicts_the_least_recently_used(brain_store):
    from data_plane.volume_stream import _Volumes

    ids = list(SliceStream(brain_store, VolumeStreamConfig(splits=["train", "test"])).volumes.volume_id[:3])
    probe = _Volumes(brain_store, slab_cache_mb=1024)
    probe.plane(ids[0], "image", 0, 0)
    slab_mb = probe.slab_bytes / 2**20  # the first slab along z of a volume; all are the same shape
    volumes = _Volumes(brain_store, slab_cache_mb=2.5 * slab_mb)  # room for two slabs
    for volume_id in (ids[0], ids[1], ids[0], ids[2]):  # ids[0] used again, so ids[1] is the oldest
        volumes.plane(volume_id, "image", 0, 1)
    assert [key[0] for key in volumes.slabs] == [ids[0], ids[2]]
    assert volumes.slab_bytes == sum(slab.nbytes for slab in volumes.slabs.values()) <= 2.5 * slab_mb * 2**20
