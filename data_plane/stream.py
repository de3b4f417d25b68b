"""Streams of tiles from the store, for training (:class:`TileStream`) and inference (:class:`GridStream`),
and the sharded base class the volume streams share (:class:`ShardedStream`: epochs, ranks x workers,
batches, resume), which is why this file is past 400 lines: the sharding is one thing, said once.

Sharding: an epoch's order is a permutation of the selected tiles drawn from ``(seed, epoch)``;
rank r takes every world_size-th tile starting at r, and its dataloader worker w every
num_workers-th tile of that share starting at w. So within one epoch every selected tile is read
exactly once across all ranks and workers, and ranks' shares differ by at most one tile. Batched
streams cut the order into global batches instead, rank r taking the r-th micro-batch of each (see
``ShardedStream._batches``), so training on W ranks sees what one rank accumulating W batches sees.

Each item is a dict: ``image`` (3, H, W) uint8 as stored (float32 in [0, 1] only after the
``histology`` augmentation, whose contrast and noise need floats; :func:`on_device` turns a batch's
uint8 images into float32 in [0, 1] on the device that uses them: 4x less to collate, copy between
processes and move), ``slide_id``, ``level0_yx`` (int64 [2],
level-0 pixel of the image's top-left corner), ``label`` ("normal" / "anomalous" / "uncertain"),
``target`` (0 / 1 / -1), ``group``, ``tissue_fraction``, ``index`` (row of the tile index), and,
when any slide of the stream carries annotations, ``mask`` (1, H, W) uint8 with ``has_mask``
telling whether this item's slide does (streams of unannotated slides skip the all-zero masks).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_plane.config import StainConfig, StreamConfig
from data_plane.heap import keep_freed_memory
from data_plane.store import LevelReader, read_tile_index, store_path

TARGETS = {"normal": 0, "anomalous": 1, "uncertain": -1}


def on_device(batch: dict, device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """A batch's tensors on ``device``; a uint8 ``image`` becomes float32 in [0, 1] there (after the
    move, so the copy is of bytes); with ``dtype``, every floating tensor then takes it (the trainer's
    precision). The one place streamed batches are made ready for a method."""
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device, non_blocking=True)
            if key == "image" and value.dtype == torch.uint8:
                value = value.to(torch.float32).mul_(1 / 255)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def select_tiles(tiles, config: StreamConfig):
    """Rows of the tile index that pass the stream's filters (order kept), then the configured share of
    synthetic tiles: ``synthetic_share`` of the result comes from the sets named in ``synthetic`` (a
    seeded choice among their tiles, or all of them with share 1). Synthetic rows are never selected
    otherwise."""
    import pandas as pd

    # Rows of synthetic sets (kind "synthetic", or "reconstruction" from synthesize --project) are not tissue.
    synthetic = tiles["kind"].fillna("") != "" if "kind" in tiles else pd.Series(False, index=tiles.index)
    real = _filter(tiles[~synthetic], config)
    if config.synthetic_share <= 0:
        return real
    pool = tiles[synthetic & tiles["slide_id"].isin(config.synthetic)]
    missing = sorted(set(config.synthetic) - set(pool["slide_id"]))
    if missing:
        raise ValueError(f"synthetic set(s) {', '.join(missing)} are not complete sets of this store "
                         f"(`tessera synthesize RUN --store STORE --name NAME` makes one)")
    share = config.synthetic_share
    wanted = len(pool) if share >= 1 else min(len(pool), round(share / (1 - share) * len(real)))
    chosen = np.sort(np.random.default_rng(config.seed).choice(len(pool), size=wanted, replace=False))
    picked = pool.iloc[chosen]
    return (picked if share >= 1 else pd.concat([real, picked])).reset_index(drop=True)


def filter_items(table, config, id_column: str, keep=None):
    """Rows of a tile or volume index that pass a stream config's split, label, group and id filters (and
    ``keep``, a boolean Series of the caller's own), order kept."""
    keep = table["split"].isin(config.splits) & (True if keep is None else keep)
    if config.labels is not None:
        keep &= table["label"].isin(config.labels)
    if config.groups is not None:
        keep &= table["group"].isin(config.groups)
    if config.ids is not None:
        keep &= table[id_column].isin(config.ids)
    return table[keep].reset_index(drop=True)


def _filter(tiles, config: StreamConfig):
    return filter_items(tiles, config, "slide_id", tiles["tissue_fraction"] >= config.min_tissue_fraction)


def shard(order: np.ndarray, rank: int, world_size: int, worker: int, num_workers: int) -> np.ndarray:
    """This reader's share of an epoch: the rank's every world_size-th item, then the worker's part of it.

    Sharding by rank first makes a rank's share independent of how many dataloader workers it runs.
    """
    return order[rank::world_size][worker::max(num_workers, 1)]


class _SlideReaders:
    """Per-process cache of open pyramid levels and annotation masks (opened lazily, after fork)."""

    def __init__(self, root: Path):
        self.root = root
        self.levels: dict[tuple[str, int], LevelReader] = {}
        self.masks: dict[str, tuple[np.ndarray, int] | None] = {}

    def level(self, slide_id: str, level: int) -> LevelReader:
        key = (slide_id, level)
        if key not in self.levels:
            import zarr

            folder = self.root / "slides" / slide_id
            if not folder.is_dir():
                folder = self.root / "synthetic" / slide_id  # a synthetic set reads like a slide's level 0
            self.levels[key] = LevelReader(zarr.open_array(str(folder / str(level)), mode="r"))
        return self.levels[key]

    def anomaly_mask(self, slide_id: str) -> tuple[np.ndarray, int] | None:
        """Union of the slide's annotation masks and its downsample, or None when it has none."""
        if slide_id not in self.masks:
            import zarr

            names = slide_annotations(self.root, slide_id)
            labels = [zarr.open_group(str(self.root / "slides" / slide_id / "labels" / n), mode="r") for n in names]
            self.masks[slide_id] = (np.logical_or.reduce([g["0"][:] > 0 for g in labels]),
                                    int(labels[0].attrs["tessera"]["downsample"])) if labels else None
        return self.masks[slide_id]


def has_annotations(store, tiles) -> bool:
    """Whether any slide among these tiles carries annotation masks (else items carry no ``mask``)."""
    root = store_path(store)
    return any(slide_annotations(root, sid) for sid in tiles["slide_id"].unique())


def slide_annotations(root: Path, slide_id: str) -> list[str]:
    """The slide's annotation label names (its labels other than the tissue mask)."""
    import json

    path = root / "slides" / slide_id / "zarr.json"
    if not path.is_file():
        return []  # a synthetic set: no annotations
    attrs = json.loads(path.read_text()).get("attributes", {})
    return list(attrs.get("tessera", {}).get("annotations", []))


def _resize(pixels: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    if pixels.shape[0] == size and pixels.shape[1] == size:
        return pixels
    from PIL import Image

    method = Image.NEAREST if nearest else Image.BILINEAR
    # np.array, not asarray: PIL hands out a read-only buffer, which torch.from_numpy warns about
    return np.array(Image.fromarray(pixels).resize((size, size), method))


class _TileLoader:
    """Reads one indexed tile (optionally a crop of it) with its mask, as the stream's item dict."""

    def __init__(self, store, crop: str, crop_size: int | None, stain: StainConfig | None, with_masks: bool):
        self.readers = _SlideReaders(store_path(store))
        self.with_masks = with_masks
        keep_freed_memory()  # runs in the process that reads and collates (a dataloader worker or the main one)
        self.crop, self.crop_size = crop, crop_size
        self.stain_config = stain
        self._stain = None

    def load(self, row, index: int, rng: np.random.Generator | None) -> dict:
        level, size, out_size = int(row.level), int(row.size), int(row.out_size)
        scale = 2 ** level
        read, out, offset_y, offset_x = size, out_size, 0, 0
        if self.crop != "none":
            out = self.crop_size
            read = max(1, round(self.crop_size * size / out_size))
            if read > size:
                raise ValueError(f"crop_size {self.crop_size} is larger than the tiles ({out_size} px)")
            if self.crop == "random":
                offset_y, offset_x = (int(v) for v in rng.integers(0, size - read + 1, 2))
            else:
                offset_y = offset_x = (size - read) // 2
        y0, x0 = int(row.y) + offset_y * scale, int(row.x) + offset_x * scale
        pixels = self.readers.level(row.slide_id, level).read(y0 // scale, x0 // scale, read, read)  # (C, H, W)
        stain = self.stain_config is not None and self.stain_config.method != "none" and \
            self.stain_config.apply == "stream"
        if read != out or stain:  # PIL and the stain normaliser work on (H, W, C)
            pixels = _resize(pixels.transpose(1, 2, 0), out)
            if stain:
                if self._stain is None:
                    from data_plane.stain import StainNormalizer

                    self._stain = StainNormalizer.from_config(self.stain_config)
                pixels = self._stain.normalize_uint8(pixels)
            image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        else:
            image = torch.from_numpy(pixels)  # the store's chunks are (C, H, W) uint8 already
        item = {
            "image": image,
            "slide_id": row.slide_id,
            "level0_yx": torch.tensor([y0, x0], dtype=torch.int64),
            "label": row.label,
            "target": TARGETS.get(row.label, -1),
            "group": row.group,
            "tissue_fraction": float(row.tissue_fraction),
            "index": index,
        }
        if not self.with_masks:
            return item
        mask = self.readers.anomaly_mask(row.slide_id)
        item["has_mask"] = mask is not None
        crop = np.zeros((out, out), np.uint8)
        if mask is not None:
            array, ds = mask
            span = read * scale
            top, left = y0 // ds, x0 // ds
            extent = max(1, math.ceil(span / ds))
            region = np.zeros((extent, extent), np.uint8)
            piece = array[top:top + extent, left:left + extent]
            region[: piece.shape[0], : piece.shape[1]] = piece
            crop = _resize(region, out, nearest=True)
        item["mask"] = torch.from_numpy(np.ascontiguousarray(crop))[None]
        return item


def augmentation(preset: str, seed: int):
    """MONAI dictionary-transform presets applied to ``image`` (and ``mask`` for geometric ones)."""
    if preset == "none":
        return None
    from monai.transforms import Compose, RandAdjustContrastd, RandFlipd, RandGaussianNoised, RandRotate90d

    keys = ["image", "mask"]
    transforms = [RandFlipd(keys, prob=0.5, spatial_axis=0, allow_missing_keys=True),
                  RandFlipd(keys, prob=0.5, spatial_axis=1, allow_missing_keys=True),
                  RandRotate90d(keys, prob=0.5, spatial_axes=(0, 1), allow_missing_keys=True)]
    if preset == "histology":
        transforms += [RandAdjustContrastd("image", prob=0.3, gamma=(0.8, 1.25)),
                       RandGaussianNoised("image", prob=0.2, std=0.01)]
    return Compose(transforms).set_random_state(seed=seed)


class ShardedStream(IterableDataset):
    """An epoch-shuffled, rank × worker sharded stream over ``num_items()`` items (see module doc).

    ``rank`` / ``world_size`` come from the trainer (the one place that knows them); dataloader
    workers are found with ``get_worker_info``. Call :meth:`set_epoch` before each epoch.
    """

    seed: int = 0
    shuffle: bool = True
    batch_size: int | None = None
    _skip_batches: int = 0

    def num_items(self) -> int:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._skip_batches = 0

    def batched(self, batch_size: int) -> "ShardedStream":
        """Yield collated batches instead of items (use ``DataLoader(stream, batch_size=None)``).

        A rank's share is cut into batches first and workers take every num_workers-th batch, so the
        DataLoader, which takes from its workers in turn, delivers the batches in one fixed order
        whatever the worker count; that makes :meth:`resume_at` exact.
        """
        self.batch_size = batch_size
        return self

    def resume_at(self, batches_done: int) -> None:
        """Continue the current epoch after its first ``batches_done`` batches (batched streams)."""
        if self.batch_size is None:
            raise ValueError("resume_at needs a batched stream (call .batched(batch_size) first)")
        self._skip_batches = batches_done

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """Item indices of one epoch, before sharding (same on every rank and worker)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return np.arange(self.num_items())
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_items())

    def _order(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's order as the ranks share it. The endless training stream pads it by wrapping round
        to a multiple of world_size (as torch's DistributedSampler does), so every rank has as many items,
        hence as many batches, per epoch and an epoch means the same on every rank; a finite stream
        (evaluation) never repeats an item."""
        order = self.epoch_order(epoch)
        if getattr(self, "_endless_from", None) is not None and self.world_size > 1 and len(order):
            order = np.resize(order, -(-len(order) // self.world_size) * self.world_size)
        return order

    def _batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's batches of an epoch. The epoch's order is cut into global batches of
        world_size x batch_size items and rank r takes the r-th slice of each, so W ranks at batch B see
        the same micro-batches as one rank accumulating W batches of B (batch k·W + r there): a run's
        numbers do not depend on how it is split over ranks. A short last global batch is split evenly."""
        order, size, world = self._order(epoch), self.batch_size, self.world_size
        batches = []
        for start in range(0, len(order), size * world):
            part = np.array_split(order[start:start + size * world], world)[self.rank] \
                if len(order) - start < size * world else order[start + self.rank * size:start + (self.rank + 1) * size]
            if len(part):
                batches.append(part)
        return batches[self._skip_batches:] if epoch is None else batches

    def my_share(self) -> list:
        """This reader's work: item indices, or index arrays (one per batch) for batched streams."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.batch_size is not None:
            return self._batches()[worker::workers]
        return shard(self.epoch_order(), self.rank, self.world_size, worker, workers)

    def endless(self, start_batch: int = 0) -> "ShardedStream":
        """Batched, epoch after epoch without end, from global batch ``start_batch`` of this rank.

        The rank's batches of epochs 0, 1, 2, … form one sequence; dataloader worker w takes every
        num_workers-th of them, so one DataLoader delivers the sequence in order across epoch
        boundaries and its workers never restart. Each batch carries ``global_batch`` and ``epoch``.
        """
        if self.batch_size is None:
            raise ValueError("endless needs a batched stream (call .batched(batch_size) first)")
        self._endless_from = start_batch
        return self

    def batches_per_epoch(self) -> int:
        return len(self._batches(0))

    def _emit_endless(self, make_item):
        from torch.utils.data import default_collate

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        per_epoch = self.batches_per_epoch()
        cached_epoch, batches = None, None
        number = self._endless_from + worker
        while True:
            epoch, within = divmod(number, per_epoch)
            if epoch != cached_epoch:
                self.epoch, self._skip_batches = epoch, 0  # this worker's copy follows its own epoch
                cached_epoch, batches = epoch, self._batches()
            batch = default_collate([make_item(int(index)) for index in batches[within]])
            batch["global_batch"], batch["epoch"] = number, epoch
            yield batch
            number += workers

    def _emit(self, make_item):
        """Yield items, or collated batches of them, for this reader's share."""
        from torch.utils.data import default_collate

        if getattr(self, "_endless_from", None) is not None:
            yield from self._emit_endless(make_item)
            return
        for work in self.my_share():
            if self.batch_size is None:
                yield make_item(int(work))
            else:
                yield default_collate([make_item(int(index)) for index in work])

    def __len__(self) -> int:
        """Items (or batches, for batched streams) this rank reads in the current epoch, all workers together."""
        if self.batch_size is not None:
            return len(self._batches())
        return len(shard(self.epoch_order(), self.rank, self.world_size, 0, 1))

    def item_rng(self, index: int) -> np.random.Generator:
        """Randomness of one item in one epoch (crops, patch positions, partners): reproducible anywhere."""
        return np.random.default_rng((self.seed, self.epoch, int(index)))


class TileStream(ShardedStream):
    """Training stream over the store's tile index: filtered, shuffled per epoch, sharded, augmented."""

    def __init__(self, store: str | Path, config: StreamConfig, stain: StainConfig | None = None,
                 rank: int = 0, world_size: int = 1, epoch: int = 0, shuffle: bool = True):
        self.store = str(store)
        self.config = config
        self.stain = stain
        self.rank, self.world_size = rank, world_size
        self.epoch = epoch
        self.seed = config.seed
        self.shuffle = shuffle
        self.tiles = select_tiles(read_tile_index(store), config)
        if len(self.tiles) == 0:
            raise ValueError(f"no tile of store '{store}' passes the stream filters (splits={config.splits}, "
                             f"labels={config.labels}, groups={config.groups}, "
                             f"min_tissue_fraction={config.min_tissue_fraction})")
        self._loader = None

    def num_items(self) -> int:
        return len(self.tiles)

    def _rows(self) -> list:
        # Plain tuples: pandas' per-row indexing costs more than decoding a small tile.
        if not hasattr(self, "_row_tuples"):
            self._row_tuples = list(self.tiles.itertuples(index=False))
        return self._row_tuples

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        order = super().epoch_order(epoch)
        cap = self.config.max_tiles_per_slide
        if cap is not None:
            slides = self.tiles["slide_id"].to_numpy()[order]
            seen: dict[str, int] = {}
            keep = np.zeros(len(order), bool)
            for i, slide in enumerate(slides):
                seen[slide] = seen.get(slide, 0) + 1
                keep[i] = seen[slide] <= cap
            order = order[keep]
        return order

    def __iter__(self):
        if self._loader is None:
            self._loader = _TileLoader(self.store, self.config.crop, self.config.crop_size, self.stain,
                                       has_annotations(self.store, self.tiles))
        transform = augmentation(self.config.augment, seed=0)
        as_float = self.config.augment == "histology"  # its contrast and noise transforms work on floats
        random_crop = self.config.crop == "random"
        rows = self._rows()

        def make_item(index: int) -> dict:
            # a generator per item costs ~3 % of an item: built only for the random crop that uses it
            item = self._loader.load(rows[index], index, self.item_rng(index) if random_crop else None)
            if transform is not None:
                # Seeded per item, so an epoch resumed half way augments its remaining items the same.
                transform.set_random_state(seed=int(np.random.default_rng((self.seed, self.epoch, index, 1))
                                                    .integers(2**31)))
                if as_float:
                    item["image"] = item["image"].to(torch.float32).mul_(1 / 255)
                item.update(transform({k: item[k] for k in ("image", "mask") if k in item}))
                # plain tensors: MONAI's MetaTensor would follow the images into saved files (as features
                # computed from them), which weights_only loading rightly refuses
                item["image"] = torch.as_tensor(item["image"]).as_subclass(torch.Tensor)
                if "mask" in item:
                    item["mask"] = torch.as_tensor(item["mask"]).as_subclass(torch.Tensor).to(torch.uint8)
            return item

        yield from self._emit(make_item)


class GridStream(IterableDataset):
    """Every indexed tile of the chosen slides, in index order, for scoring whole slides."""

    def __init__(self, store: str | Path, slide_ids: list[str] | None = None, stain: StainConfig | None = None,
                 rank: int = 0, world_size: int = 1):
        tiles = read_tile_index(store)
        self.tiles = tiles[tiles["slide_id"].isin(slide_ids)].reset_index(drop=True) if slide_ids else tiles
        self.store, self.stain = str(store), stain
        self.rank, self.world_size = rank, world_size
        self._loader = None

    def __len__(self) -> int:
        return len(shard(np.arange(len(self.tiles)), self.rank, self.world_size, 0, 1))

    def __iter__(self):
        if self._loader is None:
            self._loader = _TileLoader(self.store, "none", None, self.stain, has_annotations(self.store, self.tiles))
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rows = list(self.tiles.itertuples(index=False))
        for index in shard(np.arange(len(self.tiles)), self.rank, self.world_size, worker, workers):
            yield self._loader.load(rows[index], int(index), None)
