"""Streams over the store's volumes: random 3D patches, 2D slices, and paired slices for FPI.

Same sharding guarantees as the tile stream (:class:`data_plane.stream.ShardedStream`): an epoch's
items are a permutation drawn from (seed, epoch), split by rank then by dataloader worker, each
item read exactly once per epoch. Randomness inside an item (patch position, FPI partner) comes
from (seed, epoch, item), so it is the same whichever rank or worker reads it.

Items are dicts with ``image`` (1, *spatial) float32, ``volume_id``, ``label``, ``target``,
``group``, ``index``, and ``mask`` (1, *spatial) uint8 when the stream's volumes carry masks.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_plane.config import VolumeStreamConfig
from data_plane.store import store_path
from data_plane.stream import TARGETS, ShardedStream, filter_items
from data_plane.volume_cache import VolumeCache, shared_folder
from data_plane.volumes import volume_array, volume_index


def select_volumes(volumes, config: VolumeStreamConfig):
    return filter_items(volumes, config, "volume_id")


class _Volumes:
    """One process's open volume arrays, their attributes and decoded chunk slabs, and its view of the
    stream's whole-volume cache (:mod:`data_plane.volume_cache`, shared by DataLoader workers)."""

    def __init__(self, root: Path, slab_cache_mb: float = 0, volume_cache_mb: float = 0,
                 shared: Path | None = None):
        self.root = root
        self.arrays: dict[tuple[str, str], object] = {}
        self.attrs: dict[str, dict] = {}
        self.slabs: OrderedDict[tuple, np.ndarray] = OrderedDict()  # least recently used first
        self.slab_bytes, self.slab_budget = 0, int(slab_cache_mb * 2**20)
        self.whole = VolumeCache(int(volume_cache_mb * 2**20), shared)

    def region(self, volume_id: str, name: str, region: tuple[slice, ...]) -> np.ndarray:
        """``array[region]``, from the decoded whole volume when it fits the volume cache (decoded once,
        kept LRU), else from the store's chunks."""
        array = self.array(volume_id, name)
        nbytes = int(np.prod(array.shape)) * array.dtype.itemsize
        if nbytes > self.whole.budget:
            return np.asarray(array[region])
        return self.whole.get((volume_id, name), lambda: np.asarray(array[...]))[region]

    def plane(self, volume_id: str, name: str, axis: int, k: int) -> np.ndarray:
        """Plane k along ``axis``. Reading one plane decodes every chunk it crosses, a whole slab one chunk
        deep; the slab is kept (LRU, up to the budget) so that the other planes of those chunks come
        from memory. A miss costs what a direct plane read costs, plus a copy."""
        array = self.array(volume_id, name)
        index = [slice(None)] * 3
        if self.slab_budget <= 0:
            index[axis] = k
            return np.asarray(array[tuple(index)])
        depth = array.chunks[axis]
        key = (volume_id, name, axis, k // depth)
        slab = self.slabs.get(key)
        if slab is None:
            index[axis] = slice(k // depth * depth, (k // depth + 1) * depth)
            slab = np.asarray(array[tuple(index)])
            self.slabs[key] = slab
            self.slab_bytes += slab.nbytes
            while self.slab_bytes > self.slab_budget and len(self.slabs) > 1:
                self.slab_bytes -= self.slabs.popitem(last=False)[1].nbytes
        else:
            self.slabs.move_to_end(key)
        return np.take(slab, k % depth, axis=axis)

    def array(self, volume_id: str, name: str = "image"):
        key = (volume_id, name)
        if key not in self.arrays:
            self.arrays[key] = volume_array(self.root, volume_id, name)
        return self.arrays[key]

    def info(self, volume_id: str) -> dict:
        if volume_id not in self.attrs:
            import zarr

            self.attrs[volume_id] = dict(zarr.open_group(str(self.root / "volumes" / volume_id), mode="r")
                                         .attrs["tessera"])
        return self.attrs[volume_id]


class _VolumeStream(ShardedStream):
    def __init__(self, store, config: VolumeStreamConfig, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 shuffle: bool = True):
        self.store, self.config = str(store), config
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.seed, self.shuffle = config.seed, shuffle
        self.volumes = select_volumes(volume_index(store), config)
        if len(self.volumes) == 0:
            raise ValueError(f"no volume of store '{store}' passes the stream filters (splits={config.splits}, "
                             f"labels={config.labels}, groups={config.groups})")
        self.with_masks = bool(self.volumes["has_mask"].any())
        self._cache = None
        # this process owns the shared decoded volumes its DataLoader workers fill and map
        self._shared = shared_folder(self) if config.volume_cache_mb > 0 else None

    @property
    def cache(self) -> _Volumes:
        if self._cache is None:  # opened lazily, in the worker process
            self._cache = _Volumes(store_path(self.store), self.config.slab_cache_mb, self.config.volume_cache_mb,
                                   self._shared)
        return self._cache

    def _base(self, row, index: int) -> dict:
        return {"volume_id": row.volume_id, "label": row.label, "target": TARGETS.get(row.label, -1),
                "group": row.group, "index": index}

    def __iter__(self):
        yield from self._emit(self.item)


class PatchStream(_VolumeStream):
    """Random 3D patches: ``patches_per_volume`` per volume and epoch, positions from (seed, epoch, item)."""

    def num_items(self) -> int:
        return len(self.volumes) * self.config.patches_per_volume

    def item(self, index: int) -> dict:
        row = self.volumes.iloc[index // self.config.patches_per_volume]
        size = self.config.patch_size
        shape = (int(row.shape_z), int(row.shape_y), int(row.shape_x))
        rng = self.item_rng(index)
        grid = self.config.patch_grid
        origin = [int(rng.integers(0, max(s - size, 0) // grid + 1)) * grid for s in shape]
        region = tuple(slice(o, o + size) for o in origin)
        item = self._base(row, index)
        item["origin_zyx"] = torch.tensor(origin)
        item["image"] = _padded(self.cache.region(row.volume_id, "image", region), size)[None]
        if self.with_masks:
            mask = self.cache.region(row.volume_id, "mask", region) if row.has_mask else np.zeros(1, np.uint8)
            item["mask"] = _padded(mask, size, like=item["image"][0]).to(torch.uint8)[None]
        if self.config.augment == "affine":
            item.update(_augment_3d(item, rng))
        return item


def _padded(block: np.ndarray, size: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """A block padded with zeros to size³ (volumes smaller than the patch)."""
    out = torch.zeros((size,) * 3, dtype=torch.float32) if like is None else torch.zeros_like(like)
    block = np.asarray(block, np.float32)
    if block.ndim == 3:
        with warnings.catch_warnings():
            # a crop of a shared read-only map: torch warns that it cannot write it; it only copies from
            # it (numpy's own strided copy would be 2.5x slower for a 96³ patch)
            warnings.simplefilter("ignore", UserWarning)
            source = torch.as_tensor(block)
        out[: block.shape[0], : block.shape[1], : block.shape[2]] = source
    return out


def _augment_3d(item: dict, rng: np.random.Generator) -> dict:
    from monai.transforms import Compose, RandAffined, RandGaussianNoised

    keys = ["image", "mask"] if "mask" in item else ["image"]
    modes = ["bilinear", "nearest"][: len(keys)]
    transform = Compose([
        RandAffined(keys, prob=0.8, rotate_range=(0.2, 0.2, 0.2), scale_range=(0.1, 0.1, 0.1), mode=modes,
                    padding_mode="zeros"),
        RandGaussianNoised("image", prob=0.3, std=0.02),
    ]).set_random_state(seed=int(rng.integers(2**31)))
    out = transform({k: item[k] for k in keys})
    result = {"image": torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float()}  # not MONAI's MetaTensor
    if "mask" in out:
        result["mask"] = (torch.as_tensor(out["mask"]).as_subclass(torch.Tensor) > 0.5).to(torch.uint8)  # MONAI returns labels as float
    return result


def _square(plane: torch.Tensor, size: int, nearest: bool) -> torch.Tensor:
    """Zero-pad a (H, W) plane to a centred square, then resize to size²."""
    height, width = plane.shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = F.pad(plane, (left, side - width - left, top, side - height - top))
    if side == size:
        return square
    mode = "nearest" if nearest else "bilinear"
    kwargs = {} if nearest else {"align_corners": False, "antialias": side > size}
    return F.interpolate(square[None, None], size=(size, size), mode=mode, **kwargs)[0, 0]


class SliceStream(_VolumeStream):
    """2D slices along ``slice_axis`` of the stored (z, y, x) arrays, padded to a square and resized to
    ``slice_size``²; slices with less than ``min_foreground`` non-zero area are skipped."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        axis = self.config.slice_axis
        pairs = []
        for row_index, volume_id in enumerate(self.volumes["volume_id"]):
            foreground = np.asarray(self.cache.info(volume_id)["slice_foreground"][axis])
            pairs += [(row_index, k) for k in np.nonzero(foreground >= self.config.min_foreground)[0]]
        self._cache = None  # reopen in each worker
        self.slices = np.array(pairs, dtype=np.int64).reshape(-1, 2)

    def num_items(self) -> int:
        return len(self.slices)

    def read_slice(self, row, k: int, name: str = "image") -> torch.Tensor:
        plane = self.cache.plane(row.volume_id, name, self.config.slice_axis, int(k))
        plane = torch.as_tensor(np.asarray(plane, np.float32))
        return _square(plane, self.config.slice_size, nearest=name == "mask")

    def item(self, index: int) -> dict:
        row_index, k = self.slices[index]
        row = self.volumes.iloc[int(row_index)]
        item = self._base(row, index)
        item["slice"] = int(k)
        item["image"] = self.read_slice(row, k)[None]
        if self.with_masks:
            mask = self.read_slice(row, k, "mask") if row.has_mask else torch.zeros_like(item["image"][0])
            item["mask"] = mask.to(torch.uint8)[None]
        return item


class PairedSliceStream(SliceStream):
    """Slice k of volume A with slice k of another volume B (FPI's training pairs).

    B is drawn per epoch and item from the other selected volumes deep enough along the axis, so
    every epoch pairs differently; ``image_b`` and ``partner_id`` describe it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if len(self.volumes) < 2:
            raise ValueError("paired slices need at least two volumes in the stream")
        axis_column = ("shape_z", "shape_y", "shape_x")[self.config.slice_axis]
        self.depths = self.volumes[axis_column].to_numpy()

    def item(self, index: int) -> dict:
        item = super().item(index)
        row_index, k = self.slices[index]
        candidates = np.nonzero((self.depths > k) & (np.arange(len(self.depths)) != row_index))[0]
        partner = self.volumes.iloc[int(self.item_rng(index).choice(candidates))]
        item["partner_id"] = partner.volume_id
        item["image_b"] = self.read_slice(partner, k)[None]
        return item
