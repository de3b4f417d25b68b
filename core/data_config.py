"""Config of the data plane: where the store is, how slides are ingested and how tiles are streamed.

Coordinates are level-0 pixels ``(y, x)`` everywhere (see ``data_plane/store.py``).
"""

from typing import Literal

from pydantic import Field, model_validator

from core.config import StrictConfig


class TissueConfig(StrictConfig):
    """Otsu tissue detection on a low-resolution level, with morphological clean-up."""

    mask_downsample: int = Field(32, ge=1)            # mask pixel = this many level-0 pixels per side
    channel: Literal["saturation", "gray"] = "saturation"  # image channel thresholded by Otsu
    min_saturation: float = Field(0.05, ge=0, le=1)   # floor under Otsu's threshold (saturation only): keeps pale blank slides empty
    closing_radius: int = Field(2, ge=0)              # disk radius (mask px) closing small gaps in tissue
    opening_radius: int = Field(1, ge=0)              # disk radius (mask px) removing specks of dust
    min_object_px: int = Field(16, ge=0)              # connected components smaller than this (mask px) are dropped
    fill_holes: bool = True                           # fill holes (e.g. lumens, fat) inside tissue


class TileGridConfig(StrictConfig):
    """The grid of candidate tiles written to ``tiles.parquet``."""

    size: int = Field(256, ge=16)                     # tile edge in pixels at the target resolution
    magnification: float | None = Field(20.0, gt=0)   # target objective power (e.g. 20 = 20x); None = level 0
    mpp: float | None = Field(None, gt=0)             # target microns per pixel; wins over `magnification` when set
    stride: int | None = Field(None, ge=1)            # grid step in target pixels; None = `size` (no overlap)
    min_tissue_fraction: float = Field(0.05, ge=0, le=1)  # tiles with less tissue are not indexed at all


class StainConfig(StrictConfig):
    """Stain normalisation (torchstain), fitted to a reference H&E image."""

    method: Literal["none", "macenko", "reinhard"] = "none"
    reference: str | None = None                      # reference RGB image; None = sample-data target_image.png
    apply: Literal["stream", "ingest"] = "stream"     # normalise tiles when streamed (batched) or once at ingest


class AnnotationConfig(StrictConfig):
    """Rasterisation of ASAP XML / GeoJSON annotations into masks stored beside the slide."""

    downsample: int = Field(4, ge=1)                  # mask pixel = this many level-0 pixels per side
    anomalous_fraction: float = Field(0.5, ge=0, le=1)  # a tile is labelled anomalous when its mask covers this much


class IngestConfig(StrictConfig):
    """How slides are written into the store."""

    chunk: int | None = Field(None, ge=64)            # pyramid chunk edge in pixels; None = data.tiles.size (one tile, one chunk)
    max_levels: int = Field(8, ge=1)                  # pyramid levels kept (smallest level stops at one chunk)
    # Blosc codec of slide chunks. Tissue hardly compresses losslessly: a 256² H&E chunk (192 KiB raw) is
    # 165 KiB with zstd level 5 + bitshuffle, 172 KiB at level 1, 192 KiB with lz4. But zstd costs 0.3 ms
    # to decode (most of a stream item's time) and 0.4-1.7 ms to encode, lz4 0.03 and 0.06 ms: "lz4"
    # trades 12-16 % more disk for reads and ingest at decode speed (bench/tiles.py, bench/ingest.py);
    # "zstd" (bitshuffle, compression_level) keeps the bytes down. Neither is in the ingest digest:
    # changing them re-encodes nothing already ingested, and readers take either.
    codec: Literal["lz4", "zstd"] = "lz4"
    compression_level: int = Field(1, ge=0, le=9)     # zstd's level (slides with codec zstd; volumes)
    threads: int = Field(2, ge=1)                     # threads decoding/encoding chunks within one slide
    workers: int = Field(1, ge=1)                     # slides ingested in parallel (Ray tasks when > 1)
    ray_address: str | None = None                   # join this Ray cluster; None = a local runtime when workers > 1


class VolumeConfig(StrictConfig):
    """How 3D volumes (NIfTI, DICOM series) are written into the store."""

    spacing: list[float] | None = None                # resample to this voxel size in mm (x, y, z); None = keep
    percentiles: tuple[float, float] = (0.5, 99.5)    # intensities clipped to these percentiles, then scaled to [0, 1]
    nonzero_only: bool = True                         # percentiles over non-zero voxels (MRI background is 0)
    chunk: int = Field(64, ge=8)                      # chunk edge in voxels (chunks of chunk³)
    nonfinite: Literal["error", "zero"] = "error"     # NaN/inf voxels: fail the volume naming the first one,
                                                      # or store them as 0 (their count is recorded)


class VolumeStreamConfig(StrictConfig):
    """Which volumes a 3D patch / slice stream reads and how."""

    splits: list[str] = ["train"]                     # keep volumes whose split is one of these
    labels: list[str] | None = None                   # keep these labels; None = all
    groups: list[str] | None = None                   # keep these groups; None = all
    ids: list[str] | None = None                      # keep these slides/volumes (ids); None = all
    patch_size: int = Field(64, ge=8)                 # edge of random 3D patches (voxels)
    patches_per_volume: int = Field(8, ge=1)          # random patches drawn from each volume per epoch
    slice_axis: int = Field(0, ge=0, le=2)            # axis of the stored (z, y, x) array that slices cut
    slice_size: int = Field(128, ge=16)               # slices are padded / resized to slice_size²
    min_foreground: float = Field(0.05, ge=0, le=1)   # slices with less non-zero area are skipped
    slab_cache_mb: float = Field(1024, ge=0)          # slices: decoded chunk slabs kept per reading process
                                                      # (LRU); a 2 mm brain is 4.4 MB, 1 mm 35 MB. 0 = off
    volume_cache_mb: float = Field(512, ge=0)         # patches: whole decoded volumes kept per stream
                                                      # (LRU) in shared memory, decoded once and mapped by
                                                      # all its DataLoader workers: a patch is then a crop
                                                      # in memory, as fast as MONAI's CacheDataset; a volume
                                                      # larger than the budget is read chunk by chunk. 0 = off
    patch_grid: int = Field(1, ge=1)                  # patch corners on multiples of this (voxels); with
                                                      # the chunk edge / 2, an uncached patch of chunk size
                                                      # touches 1.5 chunks per axis on average instead of 2
    augment: Literal["none", "affine"] = "none"       # MONAI 3D augmentation preset for patches
    seed: int = 0                                     # shuffling seed; epoch e uses (seed, e)
    # Eval and validation: σ in voxels of a 3D Gaussian over each reassembled score volume, before the
    # volume score and the pixel metrics. Slices are scored one by one, so neighbouring planes' maps
    # disagree; an outlier is a 3D blob. 0 = the raw slice maps.
    score_smoothing: float = Field(0.0, ge=0)
    # Eval: the split (e.g. "train") whose normal volumes give a normative map, the voxel-wise mean of
    # their (smoothed) score volumes, subtracted from every score volume before its volume score. A
    # model's false positives on normal anatomy recur at the same places across subjects; this takes
    # them out of the ranking. Needs volumes registered to one shape. Pixel outputs stay unsubtracted.
    # None = off.
    normal_baseline: str | None = None


class StreamConfig(StrictConfig):
    """Which tiles a stream yields and how each is prepared."""

    splits: list[str] = ["train"]                     # keep tiles whose slide split is one of these
    labels: list[str] | None = None                   # keep these tile labels ("normal", "anomalous"); None = all
    groups: list[str] | None = None                   # keep these groups; None = all
    ids: list[str] | None = None                      # keep these slides/volumes (ids); None = all
    min_tissue_fraction: float = Field(0.5, ge=0, le=1)  # drop tiles with less tissue than this
    max_tiles_per_slide: int | None = Field(None, ge=1)  # cap per slide (chosen by the epoch's shuffle)
    crop: Literal["none", "random", "center"] = "none"   # crop inside each indexed tile
    crop_size: int | None = Field(None, ge=8)         # crop edge in pixels; required unless crop is "none"
    augment: Literal["none", "flips", "histology"] = "none"  # MONAI dictionary-transform preset
    eval_crop: Literal["none", "center"] = "none"     # at eval/validation: whole tiles, or their centre crop_size
                                                      # crop (DPA's Camelyon16 protocol)
    seed: int = 0                                     # shuffling seed; epoch e uses (seed, e)
    synthetic: list[str] = []                         # synthetic sets (`tessera synthesize --name`) to mix in
    synthetic_share: float = Field(0.0, ge=0, le=1)   # their share of the stream's tiles (1 = synthetic only)

    @model_validator(mode="after")
    def _crop_needs_size(self):
        if self.synthetic_share > 0 and not self.synthetic:
            raise ValueError("synthetic_share > 0 needs data.stream.synthetic: the names of synthetic sets")
        if self.crop != "none" and self.crop_size is None:
            raise ValueError(f"crop={self.crop!r} needs crop_size")
        if self.eval_crop != "none" and self.crop_size is None:
            raise ValueError(f"eval_crop={self.eval_crop!r} needs crop_size")
        return self


class DataConfig(StrictConfig):
    """Where the store lives, and how it is filled and read."""

    store: str = "runs/store.zarr"                    # local path (or file://) of the Zarr store: ingest's
                                                      # atomic renames need a local or shared file system
    tissue: TissueConfig = TissueConfig()
    tiles: TileGridConfig = TileGridConfig()
    stain: StainConfig = StainConfig()
    annotations: AnnotationConfig = AnnotationConfig()
    ingest: IngestConfig = IngestConfig()
    stream: StreamConfig = StreamConfig()
    volumes: VolumeConfig = VolumeConfig()
    volume_stream: VolumeStreamConfig = VolumeStreamConfig()
